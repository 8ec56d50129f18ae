"""Mixed batches: one call of the model in which each sample runs its own adapter.

``peft_model(**batch, adapter_names=["a", "b", "__base__", ...])`` (peft's argument) computes row i
of the batch with adapter ``adapter_names[i]`` alone, as if it were the only active adapter
(``"__base__"``: no adapter at all). Serving several fine-tunes of one base model then takes one
batch, not one per adapter: every layer sees the whole batch and reads the frozen weights once,
and each adapter layer adds each adapter's term to that adapter's rows only
(``AdapterLayer.apply_adapters``); a module trained whole (``modules_to_save``, LN tuning) runs
each group of rows through that adapter's copy (``TrainedCopies``). ``generate(..., adapter_names=...)`` keeps each sample's adapter
on all of its beams.

How: for the length of the call, every adapter layer of the model holds the same ``RowRouting``
(``tuners/base.py``), the list of names, and asks it which rows are whose. Each layer must see
the samples along its input's first dim, which holds for the linear, embedding and conv layers
of transformers' models; a layer whose first dim is something else (a sequence-first attention,
an MoE expert fed the tokens routed to it) is caught only when its row count does not fit. A
layer that cannot split its work by rows at all (a bottleneck adapter, LoRA on
``nn.MultiheadAttention`` or on a bare parameter) refuses an adapter named in the list before
anything runs; holding none of them, it runs its base module alone, as every layer does for the
rows of ``"__base__"``.

As in peft, this is for inference: the model must be in eval mode, with no adapter merged into
its weights (a merged adapter would be in every row). The routing is state on the layers, so a
model runs one mixed batch at a time (not from several threads at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .injection import adapter_layers, known_adapter_names
from .tuners.base import BASE_MODEL_NAME, RowRouting
from .tuners.virtual_tokens import hooked_prompt_encoders


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], follows_repeats: bool = False) -> Iterator[None]:
    """Inside the block, each call of ``model`` (a model with adapters in it: a PeftModel's base
    model, or one from ``inject_adapter_in_model``) runs row i of its batch with adapter
    ``adapter_names[i]``. ``follows_repeats``: for ``generate()``, whose decoding repeats each
    sample once per beam (``RowRouting``); pass it to use beams on such a model within the block
    (``PeftModel.generate(..., adapter_names=...)`` does)."""
    layers = list(adapter_layers(model))
    check_mixed_batch(model, adapter_names, layers)
    routing = RowRouting(adapter_names, follows_repeats)
    before = [layer.row_routing for _, layer in layers]  # restored as found: blocks may nest
    for _, layer in layers:
        layer.row_routing = routing
    try:
        yield
    finally:
        for (_, layer), old in zip(layers, before):
            layer.row_routing = old


def check_mixed_batch(model: nn.Module, adapter_names: object, layers: list[tuple[str, nn.Module]]) -> None:
    """The errors of a mixed batch, raised before the model runs: ``adapter_names`` not a list of
    names, a model in training mode, virtual tokens (named or active), a name the model does not
    hold, a merged adapter, or an adapter on a layer that cannot split its work by rows."""
    if (isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence)
            or not all(isinstance(name, str) for name in adapter_names)):
        raise TypeError(
            f"adapter_names is a list with one adapter name per sample of the batch ({BASE_MODEL_NAME!r} for the base "
            f"model alone), got {adapter_names!r}"
        )
    if not adapter_names:
        raise ValueError(f"adapter_names is empty; name one adapter per sample of the batch (or {BASE_MODEL_NAME!r})")
    if model.training:
        raise ValueError(
            "mixed batches (adapter_names) are for inference, as in peft: call model.eval() first, and train one "
            "adapter per batch"
        )
    virtual = [name for encoders in hooked_prompt_encoders(model) for name in encoders
               if name in adapter_names or encoders.active_encoder() is encoders[name]]
    if virtual:
        raise ValueError(
            f"adapter(s) {virtual} put virtual tokens into every row (prompt tuning, P-tuning or prefix tuning), so "
            "they cannot take part in a mixed batch (adapter_names), whether named or active; activate a layer "
            "adapter (set_adapter) and name only those"
        )
    known = known_adapter_names(model)
    unknown = sorted(set(adapter_names) - set(known) - {BASE_MODEL_NAME})
    if unknown:
        raise ValueError(
            f"adapter_names names adapter(s) the model does not have: {unknown}; it has {known}, and {BASE_MODEL_NAME!r} "
            "runs a row on the base model alone"
        )
    merged = {a for _, layer in layers for a in layer.merged_here()}
    if merged:
        raise ValueError(
            f"adapter(s) {sorted(merged)} are merged into the weights, so every row of a mixed batch would carry them; "
            "call unmerge_adapter() first"
        )
    named = set(adapter_names)
    refused = [f"{name!r} ({type(layer).__name__})" for name, layer in layers
               if not layer.supports_mixed_batch and named & set(layer.adapter_names)]
    if refused:
        raise ValueError(
            f"these layers cannot split a batch by rows, and hold adapters that adapter_names names: "
            f"{', '.join(refused)}. Mixed batches work with LoRA (also DoRA) on linear, embedding and conv layers, "
            "AdaLoRA, LoHa, LoKr, OFT, BOFT, HRA, MiSS, RoAd, C3A, FourierFT, (IA)^3, VeRA, LN tuning, trainable tokens "
            "and modules_to_save; run these adapters in a batch of their own"
        )

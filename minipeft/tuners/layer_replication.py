"""Layer replication (peft's ``LoraConfig.layer_replication``): a deeper model built from a
transformer's own layers, repeated with their weights shared, each copy then adapted on its own.

``layer_replication=[[0, 4], [2, 5]]`` on a model of layers 0..4 lists the ranges ``[start, end)``
to lay end to end: 0 1 2 3 then 2 3 4, seven layers whose frozen weights are those of five. The
copies share the original ``nn.Parameter`` objects, so the model grows by its adapters alone,
and LoRA then gives every one of the seven its own adapter: the copies start equal and train
apart (depth up-scaling, as in LLaMA-Pro, at the cost of an adapter per layer).

Which layers: peft's rule, so that the layer names, and with them the checkpoints, agree: the
``nn.ModuleList`` at ``model(.model)*.layers`` (Llama and most decoders), at
``(.bert).encoder.layer`` (BERT) or at ``.h`` (``GPT2Model``, ``FalconModel``); minipeft also
finds ``.transformer.h`` (``GPT2LMHeadModel``, which peft refuses). A copy is a deep copy whose
parameters are the original's (its buffers are copied); the ``layer_idx`` its attention keeps,
the slot of its KV cache, is set to its new position, and the config's ``num_hidden_layers`` and
``layer_types`` (transformers 5: which layers slide their attention window) follow the new
order, so that the forward and generation run on every copy.

What follows from the sharing:

* an adapter cannot be folded into a weight its copies share (the other copies would change
  with it), so merging into one is refused. peft 0.21 means to refuse it too, but its check
  never fires, and its merge changes the outputs;
* ``unload()`` and ``disable_adapter()`` give the replicated model, which transformers'
  ``save_pretrained`` refuses to save whole (shared tensors), as with peft;
* a model replicated by one adapter is not replicated again by the next with the same map, and
  another map is refused; peft replicates again for every adapter, which re-shares the copies'
  adapters of the adapters before it;
* torch's ``set_overwrite_module_params_on_conversion(True)`` makes ``.to()`` give each copy a
  parameter of its own: the sharing (and the memory it saves) is gone, and merges stay refused.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

from torch import nn

_APPLIED_MAP = "_minipeft_layer_replication"  # attribute of a replicated model: its layer map
# Attribute of each module, in the copies, that holds a weight other copies share: merges into it
# are refused. On the module, so it survives what keeps the sharing (deepcopy, pickling).
_SHARES_WEIGHTS = "_minipeft_shares_replicated_weights"


def replicate_for(model: nn.Module, layer_map: list[list[int]] | None) -> Callable[[], None] | None:
    """Replicate ``model``'s layers by ``layer_map`` unless that map is applied already. Returns
    the undo (for an injection that fails afterwards), or None when nothing changed."""
    if not layer_map:
        return None
    applied = getattr(model, _APPLIED_MAP, None)
    if applied is not None:
        if applied != layer_map:
            raise ValueError(f"the model's layers are replicated by layer_replication={applied} already; another map "
                             f"({layer_map}) would replicate the copies again: use the same one, or a fresh model")
        return None
    return replicate_layers(model, layer_map)


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> Callable[[], None]:
    """Lay the ranges of ``layer_map`` end to end in place of the model's layers (module
    docstring). Returns a function that puts the original layers back."""
    holder, attribute = _layer_list(model)
    layers = getattr(holder, attribute)
    for pair in layer_map:
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] <= len(layers):
            raise ValueError(f"layer_replication={layer_map}: each entry is a range [start, end) of the model's "
                             f"{len(layers)} layers, with 0 <= start < end <= {len(layers)}; got {pair}")
    copies = []
    for start, end in layer_map:
        for i in range(start, end):
            clone = _shared_copy(layers[i])
            for module in clone.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(copies)
            copies.append(clone)
    uses = Counter(id(p) for layer in copies for p in layer.parameters())
    for layer in copies:
        for module in layer.modules():
            if any(uses[id(p)] > 1 for p in module.parameters(recurse=False)):
                setattr(module, _SHARES_WEIGHTS, True)
    config = getattr(model, "config", None)
    before = {key: getattr(config, key) for key in ("num_hidden_layers", "layer_types") if hasattr(config, key)}
    setattr(holder, attribute, nn.ModuleList(copies))
    if "num_hidden_layers" in before:
        config.num_hidden_layers = len(copies)
    if isinstance(before.get("layer_types"), list) and len(before["layer_types"]) == len(layers):
        config.layer_types = [before["layer_types"][i] for start, end in layer_map for i in range(start, end)]
    setattr(model, _APPLIED_MAP, [list(pair) for pair in layer_map])

    def undo() -> None:
        setattr(holder, attribute, layers)
        for key, value in before.items():
            setattr(config, key, value)
        delattr(model, _APPLIED_MAP)

    return undo


def shares_replicated_weight(module: nn.Module) -> bool:
    """Whether ``module`` is part of a replicated layer and holds a weight other copies share."""
    return getattr(module, _SHARES_WEIGHTS, False)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the layers' ``nn.ModuleList``, its attribute name), by peft's rule."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    candidates = [(inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h"),
                  (getattr(inner, "transformer", None), "h")]
    for holder, attribute in candidates:
        if holder is not None and isinstance(getattr(holder, attribute, None), nn.ModuleList):
            return holder, attribute
    raise ValueError(f"layer_replication repeats a transformer's layers, but {type(model).__name__} has no "
                     "nn.ModuleList at model(.model)*.layers, (.bert).encoder.layer, .h or .transformer.h")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are ``layer``'s own objects (deepcopy's memo
    hands back each parameter itself instead of copying it)."""
    return copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})

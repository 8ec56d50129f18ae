"""What every adapter wrapper shares: a frozen module plus named adapters beside it.

A wrapper keeps the module it adapts as ``base_layer`` and its trainable parts in
``nn.ModuleDict`` / ``nn.ParameterDict`` attributes keyed by adapter name, e.g.
``lora_A["default"]``. That keeps the original parameter names one level down
(``q_lin.base_layer.weight``), which is also the layout ``peft`` uses, so state dicts map
one to one. Method files subclass ``AdapterLayer`` and implement ``update_layer`` (create a
new adapter's parameters) and ``forward``. Callers add an adapter with ``add_adapter``, which
refuses a name the layer holds already and then runs ``update_layer``.

Merging is a template here: ``merge(adapter_names, safe_merge)`` and ``first_nonfinite_merge``
(``safe_merge``'s dry run into copies) fold adapters in one at a time through a single hook,
``merged_tensors(adapter_name, tensors)``: the base layer's weight (and bias) with that adapter
folded in. ``unmerge`` runs it backwards through the inverse hook, ``unmerged_tensors``. A
mergeable method (``mergeable = True``) implements both hooks, unless its merge has nothing to
write into a weight (``folds_into_weight = False``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..targeting import innermost, is_wrapper
from .layer_replication import shares_replicated_weight
from .quantized import dequantized_weight, quantization, set_quantized_weight


# Every merge of an adapter into a layer takes the next number (process-wide), so that unmerging a
# whole model can undo merges newest first across its layers (injection.unmerge): two layers may
# write one weight, and their merges need not commute.
_merge_numbers = itertools.count()


def adapter_placement(reference: torch.Tensor | None) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for a new adapter's parameters, given a tensor of the module it adapts.

    Adapters live on the base weights' device. An fp32 or fp64 base gives adapters of its own
    dtype; a half-precision (or any other) base gives fp32 adapters, because small trainable
    tensors optimise poorly in fp16/bf16 (peft's ``autocast_adapter_dtype``); each method's
    forward reconciles the two dtypes. No reference tensor (a module with neither parameters
    nor buffers): CPU, fp32.
    """
    if reference is None:
        return torch.device("cpu"), torch.float32
    dtype = reference.dtype if reference.dtype in (torch.float32, torch.float64) else torch.float32
    return reference.device, dtype


def dropout_or_identity(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` at p = 0: forwards then skip a copy of the input (and
    the layers can tell, by type, that there is no dropout to apply)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64): the precision updates are computed in."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def plus(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``weight + sign * delta`` computed in at least fp32 and rounded once to the weight's dtype: a
    half-precision weight is not rounded twice (delta to bf16 first, then the sum). (peft's merge of
    linear layers rounds once too; its embedding merge and safe_merge round the delta first.)"""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    return (weight.to(dtype) + sign * delta.to(device=weight.device, dtype=dtype)).to(weight.dtype)


def check_distinct(adapter_names: list[str]) -> None:
    """A ValueError when a name appears twice in ``adapter_names``: merging folds each adapter's
    update in once per name, so a repeat would add it twice."""
    repeated = list(dict.fromkeys(n for n in adapter_names if adapter_names.count(n) > 1))
    if repeated:
        distinct = list(dict.fromkeys(adapter_names))
        raise ValueError(f"adapter_names lists {repeated} more than once; name each adapter once: {distinct}")


def embed_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The scalar some embeddings multiply their lookup by (transformers' Gemma-3
    ``ScaledWordEmbedding`` keeps it as the buffer ``embed_scale``; a plain number counts too,
    as a tensor of the table's dtype), or None. Whatever an adapter adds to such a lookup is
    scaled by it as well, as peft does. A tensor of more than one entry is not a scale peft
    recognises, and is left alone."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        weight = embedding.weight
        return torch.tensor(scale, device=weight.device, dtype=weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


# In a mixed batch's adapter_names, the name that runs a sample on the base model alone (peft's).
BASE_MODEL_NAME = "__base__"


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; after it, every module back in its own mode. (A
    model that trains may hold modules its user keeps in eval, a batch norm with pretrained
    statistics: ``model.train(was_training)`` would put those in training mode too.)"""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class RowRouting:
    """A mixed batch: the adapter each sample of the batch runs, ``BASE_MODEL_NAME`` for none.

    Every adapted layer must see the samples along its input's first dim, one row each. The row
    count is all a layer can check: one that does not fit the samples is an error, but a layer
    whose first dim means something else (a sequence-first attention, an MoE expert that sees
    the tokens routed to it) and happens to have as many rows would be routed wrongly.

    ``generate()`` repeats every sample k times in a row (``repeat_interleave``: k beams, or k
    sequences sampled per prompt) before decoding, while an encoder-decoder model's encoder still
    sees the samples once. With ``follows_repeats`` a layer that sees ``k * len(names)`` rows
    gives each sample's name to its k rows.
    """

    def __init__(self, names: Sequence[str], follows_repeats: bool = False) -> None:
        self.names = list(names)
        self.follows_repeats = follows_repeats
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor]]] = {}

    def groups(self, batch: int, device: torch.device, layer: str = "layer") -> list[tuple[str, torch.Tensor]]:
        """``(name, the indices of its rows)`` per name, for an input of ``batch`` rows on ``device``;
        built once per row count and device, since every adapted layer of the model asks the same."""
        key = (batch, device)
        if key not in self._groups:
            samples = len(self.names)
            repeats, extra = divmod(batch, samples)
            if extra or not repeats or (repeats > 1 and not self.follows_repeats):
                raise ValueError(
                    f"a {layer} got an input of {batch} rows in a mixed batch of {samples} samples (adapter_names "
                    "names one adapter per sample); mixed batches need every adapted layer to see the samples along "
                    "its input's first dim, one row each"
                    + (" (or, in generate(), each sample repeated for its beams)" if self.follows_repeats else "")
                )
            indices: dict[str, list[int]] = {}
            for row in range(batch):
                indices.setdefault(self.names[row // repeats], []).append(row)
            self._groups[key] = [(name, torch.tensor(i, device=device)) for name, i in indices.items()]
        return self._groups[key]


# The hooks of an nn.Module (and, prefixed "_global", torch's for every module) that see its output.
OUTPUT_HOOKS = ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


class AdapterLayer(nn.Module):
    """Base class of every wrapper. Subclasses list their per-adapter containers."""

    # Containers (ModuleDict / ParameterDict) that hold trainable tensors, keyed by adapter name.
    adapter_layer_names: tuple[str, ...] = ()
    # Plain dicts of per-adapter hyper-parameters (rank, scaling, ...), also keyed by adapter name.
    other_param_names: tuple[str, ...] = ()
    # Attribute under which the wrapped module is stored.
    base_layer_name: str = "base_layer"
    # One per-adapter container (of the two lists above) that holds every adapter of this layer,
    # e.g. LoRA's ``r``: what adapters_to_apply, run in every forward, asks instead of rebuilding
    # ``adapter_names`` from all the containers. None: ask ``adapter_names``.
    adapter_key_name: str | None = None
    # Containers (of adapter_layer_names) whose tensors are scales, not weights: (IA)^3's vectors,
    # DoRA's magnitudes, AdaLoRA's singular values, VeRA's lambdas. The training loop leaves them
    # out of weight decay, which would pull them towards 0 where they mean "unchanged" at 1.
    scale_names: tuple[str, ...] = ()
    # Whether the layer lets the model's adapters be merged (merge_adapter, merge_and_unload): most
    # methods' layers do (LoRA, (IA)^3, OFT, ..., modules trained whole); a bottleneck MLP, which is
    # no linear map of a weight, blocks it.
    mergeable: bool = False
    # Whether the wrapper works on a bitsandbytes quantized linear layer (quantized.py): its
    # forward calls the base layer and never reads its weight as a matrix.
    takes_quantized_base: bool = False
    # Whether the forward can run a mixed batch, each row with its own adapter (row_routing):
    # every layer whose forward goes through apply_adapters, and the wrappers of whole modules.
    # The others (bottleneck, LoRA on nn.MultiheadAttention or on bare parameters) refuse one.
    supports_mixed_batch: bool = False
    # Whether merging writes this layer's adapters into its base weights. False where a mergeable
    # layer has nothing to write: a module trained whole (unloading swaps in the adapter's copy), a
    # module tied to trainable tokens (the embedding's layer writes the table both share).
    folds_into_weight: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        setattr(self, self.base_layer_name, base_layer)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # Per merged adapter: its merge's number (_merge_numbers), and what unmerging needs that
        # the merged weights no longer hold.
        self.merge_number: dict[str, int] = {}
        self.unmerge_state: dict[str, torch.Tensor] = {}
        self.disable_adapters = False
        # A mixed batch (minipeft.mixed_batch): which adapter each row of the batch runs, set on
        # every layer for the length of one call of the model; None: all rows run the active adapters.
        self.row_routing: RowRouting | None = None

    # -- bookkeeping --------------------------------------------------------------------------
    def take_mode_of(self, module: nn.Module) -> None:
        """Take the train/eval mode of ``module``, which this wrapper replaces: the wrapper and what
        it adds (dropout, the adapters' layers) follow it, while the wrapped module's submodules and
        trained copies of it keep theirs (a batch norm its user put in eval stays there, which
        ``self.train(mode)``, recursive, would undo)."""
        kept = {id(m) for m in getattr(self, self.base_layer_name).modules()}
        if isinstance(self, TrainedCopies):
            kept |= {id(m) for m in self.copies().modules()} - {id(self.copies())}
        for m in self.modules():
            if id(m) not in kept:
                m.training = module.training

    def get_base_layer(self) -> nn.Module:
        """The original module, unwrapping nested adapter wrappers."""
        return innermost(getattr(self, self.base_layer_name))

    def merged_here(self) -> list[str]:
        """The adapters whose merge this layer's weights hold (a layer that shares another's
        weight, a tied head, reports that layer's merges)."""
        return self.merged_adapters

    def module_in_use(self) -> nn.Module:
        """The module whose weights the layer runs on: the base layer (a method that trains its own
        copy of the module says which copy)."""
        return self.get_base_layer()

    # Model code reads its layers' tensors directly (T5's feed-forward checks `self.wo.weight.dtype`
    # before calling `self.wo`), and the wrapper sits where the layer was: it answers for it, as
    # peft's layers do. (A property that raises AttributeError falls back to nn.Module's lookup,
    # whose error names the wrapper.)
    @property
    def weight(self) -> torch.Tensor:
        return self.module_in_use().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module_in_use().bias

    def __getattr__(self, name: str):
        """Any other attribute of the adapted module that model code reads (an embedding's
        ``embedding_dim`` and ``padding_idx``, a convolution's ``out_channels``): the original
        module's, so that wrapping it breaks no forward. Never an inner wrapper's: that adapter's
        attributes are not this layer's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or self.base_layer_name not in self.__dict__.get("_modules", {}):
                raise  # (not built yet, or torch's own lookups)
        base = self.get_base_layer()
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}, and neither has the "
                                 f"{type(base).__name__} it adapts") from None

    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            names.update(dict.fromkeys(getattr(self, attr, {})))
        return list(names)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapters_to_apply(self, candidates: list[str] | None = None) -> list[str]:
        """Adapters whose term the forward adds: of ``candidates`` (default: the active adapters),
        those present here and not merged into the weight; none while the layer is disabled.
        In a mixed batch the default is none: each row runs the adapter it names, and a layer
        applies the active ones to no row."""
        if self.disable_adapters:
            return []
        if candidates is None:
            candidates = self.active_adapters if self.row_routing is None else []
        # On small layers the Python work of rebuilding adapter_names showed up in the step time.
        have = self.adapter_names if self.adapter_key_name is None else getattr(self, self.adapter_key_name)
        merged = self.merged_here()
        return [a for a in candidates if a in have and a not in merged]

    def apply_adapters(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        with_adapter: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor],
        adapters: list[str] | None = None,
    ) -> torch.Tensor:
        """``result`` after ``with_adapter(result, x, name)`` for each adapter in turn, which adds
        (or multiplies in) one adapter's term given the layer's input ``x``: for the active
        adapters (or ``adapters``, when the caller has them already) on every row; in a mixed
        batch, for each adapter that some row names, on those rows only, the others left as they
        are. There, without autograd, the rows are written into ``result`` in place (one pass over
        them, not a copy of the whole output per adapter): ``result`` must be the layer's own new
        tensor, never its input."""
        if self.row_routing is None:
            for name in self.adapters_to_apply() if adapters is None else adapters:
                result = with_adapter(result, x, name)
            return result
        in_place = not torch.is_grad_enabled() and self.base_output_is_private()
        for name, rows in self.row_groups(x):
            part = with_adapter(result[rows], x[rows], name).to(result.dtype)
            result = result.index_copy_(0, rows, part) if in_place else result.index_copy(0, rows, part)
        return result

    def base_output_is_private(self) -> bool:
        """Whether the base layer's output reached no one but this layer, so that writing onto it in
        place changes nothing another holds: no hook on the base layers saw it (a forward hook may
        keep it, or have used it in a graph that in-place writes would break; a backward hook has
        it wrapped in a view of its own, which refuses them), none of torch's global ones either,
        and no torch.func transform runs (under vmap over the adapter's parameters the output is
        unbatched, the term not). A quantized layer's output is not written onto either: it comes
        from bitsandbytes' own autograd functions (peft copies it too, at Dettmers' advice)."""
        everywhere = nn.modules.module
        if any(getattr(everywhere, "_global" + hooks) for hooks in OUTPUT_HOOKS) \
                or torch._C._are_functorch_transforms_active() or quantization(self.get_base_layer()):
            return False
        module = getattr(self, self.base_layer_name)
        while not any(getattr(module, hooks) for hooks in OUTPUT_HOOKS):
            if not is_wrapper(module):
                return True
            module = getattr(module, module.base_layer_name)  # (a trained copy's wrapper: original_module)
        return False

    def row_groups(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """In a mixed batch, ``(adapter, the indices of its rows)`` for each adapter of this layer
        that some row of ``x`` (the batch along dim 0) names."""
        groups = self.row_routing.groups(len(x), x.device, type(self).__name__)
        here = self.adapters_to_apply([name for name, _ in groups])
        return [(name, rows) for name, rows in groups if name in here]

    def unmerge_if_disabled(self) -> None:
        """peft semantics: a merged layer whose adapters are disabled unmerges itself first. The
        forward of every layer that can hold merged adapters starts with this call. Disabling a
        whole model unmerges every layer beforehand, in the right order (``injection.unmerge``);
        this catches a layer disabled by hand, or merged while disabled."""
        if self.disable_adapters and self.merged:
            self.unmerge()

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())

    def place_adapter(self, adapter_name: str, reference: torch.Tensor | None) -> None:
        """Move adapter ``adapter_name``'s tensors beside ``reference``, a tensor of the adapted
        module: its device, and its dtype or fp32 (``adapter_placement``)."""
        device, dtype = adapter_placement(reference)
        for p in self.adapter_parameters(adapter_name):
            moved = p.data.to(device, dtype)
            if (moved.device.type == "meta") == (p.device.type == "meta"):
                p.data = moved
            else:  # (a base built on the meta device; set_data does not cross to or from it)
                torch.utils.swap_tensors(p, nn.Parameter(moved, requires_grad=p.requires_grad))

    def set_adapter(self, adapter_names: list[str], trainable: bool = True) -> None:
        """Activate ``adapter_names``; only active adapters train (when ``trainable``)."""
        self.active_adapters = list(adapter_names)
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(trainable and name in adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weights; unmerge it before deleting it")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def add_adapter(self, adapter_name: str, config=None, key: str = "", **options) -> None:
        """Add adapter ``adapter_name`` described by ``config`` to this layer (``key``: the module's
        qualified name, for messages; ``options``: what a method's ``update_layer`` takes beyond
        the config). A name the layer holds already is refused: ``update_layer`` would replace that
        adapter's parameters."""
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists on {key!r}")
        self.update_layer(adapter_name, config, key, **options)

    # -- what subclasses provide --------------------------------------------------------------
    def update_layer(self, adapter_name: str, config, key: str) -> None:
        """Create the parameters of a new adapter (``key``: the module's qualified name); called by
        ``add_adapter``, which has checked the name is new here."""
        raise TypeError(f"{type(self).__name__} does not implement update_layer")

    def merged_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The one hook of a mergeable method. ``tensors``: the base layer's, by attribute name
        ("weight", and "bias" where it has one). Returns the ones adapter ``adapter_name``
        changes, with it folded in, as new tensors; and what ``unmerge`` will need that the merged
        tensors no longer hold (DoRA's row factor), or None. Writes nothing."""
        raise TypeError(f"{type(self).__name__} sets mergeable = True but does not implement merged_tensors")

    def unmerged_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The inverse of ``merged_tensors``: ``tensors``, the base layer's with adapter
        ``adapter_name`` merged last, with that adapter taken out again, as new tensors. ``kept``:
        what ``merged_tensors`` returned for unmerging, or None. Writes nothing."""
        raise TypeError(f"{type(self).__name__} sets mergeable = True but does not implement unmerged_tensors")

    def merge_is_addition(self, adapter_name: str) -> bool:
        """Whether merging adapter ``adapter_name`` adds an update that does not depend on the
        weight (e.g. LoRA without DoRA, LoHa, VeRA, FourierFT; ``AddedUpdate``). Such merges commute with each
        other, so nested wrappers of these may merge in any order; any other merge transforms
        the weight the layers inside it hold, and must wait for them (``PeftModel``'s merge plan)."""
        return False

    def merge_blocker(self, adapter_name: str) -> str | None:
        """Why adapter ``adapter_name`` cannot be folded into this layer's weights, or None.
        Asked of every layer before any is merged, so that a merge that could not finish does
        not start (a half-merged model would compute neither the base nor the adapted model)."""
        return None

    # -- merging: a template over merged_tensors ----------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, checked: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights, in order. ``safe_merge``:
        first merge into copies and raise if a weight would hold NaN or inf (nothing written).
        ``checked``: the caller has run ``check_merge_blockers`` (an unload, with its own rules).
        An adapter merged already stays as it is, with a warning."""
        if not self.mergeable:
            raise self._not_mergeable()
        if not self.folds_into_weight:
            return
        names = self._check_mergeable(adapter_names, checked)
        if safe_merge:
            self.check_merge_is_finite(names)
        for name in names:
            merged, kept = self.merged_tensors(name, self._base_tensors())
            self._write_base(merged)
            if kept is not None:
                self.unmerge_state[name] = kept
            self.merged_adapters.append(name)
            self.merge_number[name] = next(_merge_numbers)

    def unmerge(self) -> None:
        """Take the merged adapters out of the base weights again, newest first (the merges need
        not commute: DoRA's and (IA)^3's rescale what earlier ones wrote)."""
        while self.merged_adapters:
            self.unmerge_newest()

    def unmerge_newest(self) -> None:
        """Take the adapter merged last out of the base weights again."""
        name = self.merged_adapters[-1]
        self._write_base(self.unmerged_tensors(name, self._base_tensors(), self.unmerge_state.get(name)))
        self.merged_adapters.pop()  # after the write: a refused unmerge leaves the adapter merged
        self.merge_number.pop(name)
        self.unmerge_state.pop(name, None)

    def unmerged_base_tensors(self) -> dict[str, torch.Tensor]:
        """The base layer's tensors as they were before any adapter was merged: the merged ones
        taken out of copies, newest first (the live tensors themselves when none is merged). For
        a merge whose math reads the base weight, as the unmerged forward sees it."""
        tensors = self._base_tensors()
        for name in reversed(self.merged_adapters):
            tensors = {**tensors, **self.unmerged_tensors(name, tensors, self.unmerge_state.get(name))}
        return tensors

    def first_nonfinite_merge(self, adapter_names: list[str]) -> str | None:
        """The first of ``adapter_names`` after whose merge (in order, into copies of the base
        weights) a weight holds NaN or inf; ``None`` when all stay finite. Writes nothing."""
        if not self.mergeable:
            raise self._not_mergeable()
        if not self.folds_into_weight:
            return None
        tensors = self._base_tensors()
        for name in adapter_names:
            merged, _ = self.merged_tensors(name, tensors)
            if not all(torch.isfinite(t).all() for t in merged.values()):
                return name
            tensors = {**tensors, **merged}
        return None

    def _where(self, layer_name: str) -> str:
        """How a merge error names this layer: by its name in the model, when the caller knows it."""
        return repr(layer_name) if layer_name else f"this {type(self).__name__}"

    def check_merge_is_finite(self, adapter_names: list[str], layer_name: str = "") -> None:
        """safe_merge's check: a ValueError naming the adapter and the layer when merging
        ``adapter_names`` would put NaN or inf into the weights."""
        bad = self.first_nonfinite_merge(adapter_names)
        if bad is not None:
            where = self._where(layer_name)
            raise ValueError(
                f"merging adapter {bad!r} into {where} gives non-finite weights (NaN or inf), so nothing was merged; "
                "the adapter's weights are probably broken"
            )

    def _not_mergeable(self) -> TypeError:
        return TypeError(
            f"{type(self).__name__} cannot be merged: its adapter is not a linear map folded into a weight. "
            "Use unload() to remove it instead."
        )

    @torch.no_grad()
    def _write_base(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the base layer's tensors of those names, in place: whatever shares
        a tensor (a tied head) sees the new values."""
        base = self.get_base_layer()
        for attr, tensor in tensors.items():
            if attr == "weight" and quantization(base):
                warnings.warn(f"merging into (or out of) a {quantization(base)} weight rounds the result to its "
                              "quantization grid: the outputs differ a little from the unmerged adapter's, and "
                              "unmerging does not give back the original weights exactly", stacklevel=4)
                set_quantized_weight(base, tensor)
            else:
                getattr(base, attr).copy_(tensor)

    def _computed_base_tensors(self) -> list[str]:
        """The tensors merging writes that the base layer does not hold but computes (a
        parametrization's weight, or weight_norm's recomputed attribute): a write would be lost."""
        if not self.folds_into_weight:
            return []
        base = self.get_base_layer()
        return [attr for attr in self._base_tensors() if attr not in base._parameters and attr not in base._buffers]

    def _base_tensors(self) -> dict[str, torch.Tensor]:
        """The base layer's weight and (where it has one) bias, detached: what merging changes
        (a quantized weight dequantized, ``quantized.py``)."""
        base = self.get_base_layer()
        tensors = {"weight": dequantized_weight(base) if quantization(base) else base.weight.detach()}
        if getattr(base, "bias", None) is not None:
            tensors["bias"] = base.bias.detach()
        return tensors

    def unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """The module that replaces this wrapper on unload: with ``adapter_names`` (default: the
        active adapters) folded in when ``merge``, else with any earlier ``merge_adapter`` undone
        (the original weights). Adapters merged earlier stay merged."""
        if merge:
            wanted = self.active_adapters if adapter_names is None else adapter_names
            names = [a for a in wanted if a in self.adapter_names and a not in self.merged_adapters]
            self.check_merge_blockers(names, unloading=True)
            self.merge(names, checked=True)
        else:
            self.unmerge()
        return getattr(self, self.base_layer_name)

    def _check_mergeable(self, adapter_names: list[str] | None, checked: bool = False) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        check_distinct(names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown}; this layer has {self.adapter_names}")
        twice = [n for n in names if n in self.merged_adapters]
        if twice:
            # As PeftModel.merge_adapter and peft's layers: merging again would add them twice.
            warnings.warn(f"adapter(s) {twice} are merged into this layer already and stay as they are; "
                          "unmerge() first to merge them anew", stacklevel=3)
            names = [n for n in names if n not in twice]
        if not checked:
            self.check_merge_blockers(names)
        return list(names)

    def check_merge_blockers(self, adapter_names: list[str], layer_name: str = "", unloading: bool = False) -> None:
        """A ValueError naming the first of ``adapter_names`` that ``merge_blocker`` refuses here.
        ``unloading``: the merge ends in an unload, which drops the adapters it does not merge."""
        computed = self._computed_base_tensors() if adapter_names else []
        if computed:
            where = self._where(layer_name)
            raise ValueError(
                f"cannot merge into {where}, so nothing was merged: its base layer computes {computed} from other "
                "parameters at each call (torch.nn.utils.parametrize, weight_norm, spectral_norm), so the merged "
                "values would have nowhere to stay. Remove the parametrization first "
                "(parametrize.remove_parametrizations(module, 'weight')), or use unload() to drop the adapter"
            )
        if adapter_names and shares_replicated_weight(self.get_base_layer()):
            raise ValueError(
                f"cannot merge into {self._where(layer_name)}, so nothing was merged: its weights are shared by the "
                "copies of a replicated layer (layer_replication), which would all change; use the adapters unmerged "
                "(peft 0.21 merges here, and its outputs change)"
            )
        for name in adapter_names:
            reason = self.merge_blocker(name)
            if reason is not None:
                where = self._where(layer_name)
                raise ValueError(f"cannot merge adapter {name!r} into {where}, so nothing was merged: {reason}")
        ordered = self.merge_order()
        if ordered is not None:
            self.check_merge_order(adapter_names, ordered, layer_name, unloading)

    def merge_order(self) -> list[str] | None:
        """The active adapters whose merges do not commute, in the order the forward applies them,
        or None where every merge here commutes with the others (``check_merge_order``)."""
        return None

    def check_merge_order(self, adapter_names: list[str], ordered: list[str], layer_name: str, unloading: bool) -> None:
        """For adapters whose merges do not commute (each changes the weight the next one acts on),
        ``ordered`` being the active ones in the order the forward applies them: a merge must keep
        the model, so the merged adapters come first in that order (the others still act after
        them). An unload drops the others: the merged ones need only keep their order."""
        merged = [a for a in [*self.merged_adapters, *adapter_names] if a in ordered]
        expected = [a for a in ordered if a in merged] if unloading else ordered[: len(merged)]
        if merged != expected:
            where = self._where(layer_name)
            raise ValueError(
                f"cannot merge adapter(s) {list(adapter_names)} into {where}, so nothing was merged: its active "
                f"adapters {ordered} change its weight in that order and do not commute, so merging {merged} would "
                f"change the model; merge them in order ({expected} first)"
            )


class AddedUpdate:
    """The merge of a method whose update is a matrix of the weight's shape, ``delta_weight(name)``
    (at least fp32), added to it: ``W + Delta W`` and back (LoHa, LoKr, AdaLoRA, C3A, FourierFT, VeRA,
    LoRA on a bare parameter or an attention's in_proj). Mixed into an AdapterLayer, before it."""

    merged_name = "weight"  # the base tensor the update is added to (a key of _base_tensors())

    def merge_is_addition(self, adapter_name: str) -> bool:
        return True

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        return {self.merged_name: plus(tensors[self.merged_name], self.delta_weight(adapter_name))}, None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        return {self.merged_name: plus(tensors[self.merged_name], self.delta_weight(adapter_name), -1)}


def layers_a_copy_would_copy(module: nn.Module, own_class: type) -> list[str]:
    """The adapter layers inside ``module`` (by name; ``""`` for ``module`` itself) that a trained
    copy of it would copy along, and save under the wrong adapter's name: all of them but
    ``module`` itself when it is a wrapper of ``own_class``, which adds the copy beside the others."""
    return [name for name, m in module.named_modules()
            if isinstance(m, AdapterLayer) and not (name == "" and isinstance(m, own_class))]


class TrainedCopies(AdapterLayer):
    """A wrapper whose adapters are whole trained copies of the module it wraps: each adapter
    trains its own copy in the ModuleDict named ``copies_name``, the original stays frozen, and
    the forward runs the active adapter's copy (the original when none is active). Merging has
    nothing to write; unloading puts the merged adapter's copy in the original's place.
    ``ModulesToSaveWrapper`` (a classifier head trained beside an adapter) and LN tuning's layer."""

    copies_name: str = ""
    supports_mixed_batch = True
    mergeable = True
    folds_into_weight = False  # the adapter's copy replaces the original on unload (unwrap)

    def copies(self) -> nn.ModuleDict:
        return getattr(self, self.copies_name)

    def __getattr__(self, name: str):
        """What code around the module reads of it (a head's ``out_features``, a norm's ``eps``,
        nn.TransformerEncoderLayer's checks) comes from the module that runs in its place, as
        from peft's wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or self.copies_name not in modules or self.base_layer_name not in modules:
                raise  # (not built yet, or torch's own lookups: never a loop through module_in_use)
        return getattr(self.module_in_use(), name)

    def update_layer(self, adapter_name: str, config=None, key: str = "") -> None:
        self.copies()[adapter_name] = copy.deepcopy(getattr(self, self.base_layer_name))

    def module_in_use(self) -> nn.Module:
        """The active adapter's copy, else the original (as in peft)."""
        active = self.adapters_to_apply()
        return self.copies()[active[0]] if active else getattr(self, self.base_layer_name)

    def forward(self, *args, **kwargs):
        if self.row_routing is None:
            return self.module_in_use()(*args, **kwargs)
        # A mixed batch: each group of rows through its adapter's copy (the original for rows
        # whose adapter has none here), the outputs put back in the rows' order.
        x, *rest = args
        out = None
        here = self.adapters_to_apply(self.row_routing.names)
        for name, rows in self.row_routing.groups(len(x), x.device, type(self).__name__):
            module = self.copies()[name] if name in here else getattr(self, self.base_layer_name)
            part = module(x[rows], *rest, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise TypeError(
                    f"a mixed batch splits this {type(module).__name__}'s rows by adapter, which needs a tensor "
                    f"output to put back together; it returned a {type(part).__name__}"
                )
            out = part.new_empty((len(x), *part.shape[1:])) if out is None else out
            out.index_copy_(0, rows, part)  # autograd records it: out is the wrapper's own tensor
        return out

    def copy_of(self, adapter_names: list[str], name: str = "") -> str | None:
        """The one of ``adapter_names`` that trains its own copy of this module (``name``), or None.
        Two is a ValueError: merging or combining adapters keeps a single copy, and which one
        would be a guess."""
        have = [a for a in dict.fromkeys(adapter_names) if a in self.copies()]
        if len(have) > 1:
            where = repr(name) if name else "this module"
            raise ValueError(
                f"adapters {have} each train their own copy of {where}; merging or combining adapters keeps a "
                "single copy, so choose adapters of which at most one trains it"
            )
        return have[0] if have else None

    def unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """Merging: the copy of the adapter being merged (default: the active one); else, or when
        that adapter has no copy here, the original."""
        wanted = (self.active_adapters if adapter_names is None else adapter_names) if merge else []
        have = [a for a in wanted if a in self.copies()]
        return self.copies()[have[0]] if have else getattr(self, self.base_layer_name)


class ModulesToSaveWrapper(TrainedCopies):
    """Trains a whole module (a classifier head, say) as part of an adapter: the original stays
    frozen as ``original_module``, each adapter's copy is ``modules_to_save[name]``."""

    adapter_layer_names = ("modules_to_save",)
    base_layer_name = "original_module"
    adapter_key_name = copies_name = "modules_to_save"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.modules_to_save = nn.ModuleDict()

    def unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """As in peft, ``unload()`` too keeps the active adapter's copy (the head trained for the
        task, which the model needs to mean anything); merging keeps the merged adapter's."""
        return super().unwrap(True, adapter_names if merge else None)

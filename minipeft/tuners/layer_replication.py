"""Layer replication (peft's ``LoraConfig.layer_replication``): a deeper model built from a
transformer's own layers, repeated with their weights shared, each copy then adapted on its own.

``layer_replication=[[0, 4], [2, 5]]`` on a model of layers 0..4 lists the ranges ``[start, end)``
to lay end to end: 0 1 2 3 then 2 3 4, seven layers whose frozen weights are those of five. The
copies share the original ``nn.Parameter`` objects, so the model grows by its adapters alone,
and LoRA then gives every one of the seven its own adapter: the copies start equal and train
apart (depth up-scaling, as in LLaMA-Pro, at the cost of an adapter per layer).

Which layers: peft's rule, so that the layer names, and with them the checkpoints, agree: the
``nn.ModuleList`` at ``model(.model)*.layers`` (Llama and most decoders), at
``(.bert).encoder.layer`` (BERT) or at ``.h`` (GPT-2, Falcon). A copy is a deep copy whose
parameters are the original's (its buffers are copied); the ``layer_idx`` its attention keeps,
the slot of its KV cache, is set to its new position, and ``config.num_hidden_layers`` to the
new depth, so that generation keeps one cache slot per layer.

What follows from the sharing: an adapter cannot be folded into a weight its copies share (the
other copies would change with it), so merging is refused, as in peft; ``unload()`` and
``disable_adapter()`` give the replicated model. A model replicated by one adapter is not
replicated again by the next with the same map; another map is refused.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Callable

from torch import nn

# The parameters that replicated layers share, to refuse merges into them (see the docstring):
# id -> a weak reference (a WeakSet would compare tensors with ==, elementwise).
_SHARED: dict[int, weakref.ref] = {}
_APPLIED_MAP = "_minipeft_layer_replication"  # attribute of a replicated model: its layer map


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
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    setattr(holder, attribute, nn.ModuleList(copies))
    if depth is not None:
        config.num_hidden_layers = len(copies)
    setattr(model, _APPLIED_MAP, [list(pair) for pair in layer_map])
    uses = Counter(id(p) for layer in copies for p in layer.parameters())
    for p in (p for layer in copies for p in layer.parameters() if uses[id(p)] > 1):
        _SHARED[id(p)] = weakref.ref(p, lambda _, key=id(p): _SHARED.pop(key, None))

    def undo() -> None:
        setattr(holder, attribute, layers)
        if depth is not None:
            config.num_hidden_layers = depth
        delattr(model, _APPLIED_MAP)

    return undo


def shares_replicated_weight(module: nn.Module) -> bool:
    """Whether ``module`` holds a parameter that replicated layers share."""
    return any(id(p) in _SHARED and _SHARED[id(p)]() is p for p in module.parameters(recurse=False))


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the layers' ``nn.ModuleList``, its attribute name), by peft's rule."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    inner = getattr(inner, "bert", inner)
    candidates = [(inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")]
    for holder, attribute in candidates:
        if holder is not None and isinstance(getattr(holder, attribute, None), nn.ModuleList):
            return holder, attribute
    raise ValueError(f"layer_replication repeats a transformer's layers, found (as in peft) at model(.model)*.layers, "
                     f"(.bert).encoder.layer or .h; {type(model).__name__} has none of them")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` whose parameters are ``layer``'s own objects (deepcopy's memo
    hands back each parameter itself instead of copying it)."""
    return copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})

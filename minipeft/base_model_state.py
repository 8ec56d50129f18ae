"""The base model's own tensors under its own names, from a model holding adapters (peft's
``get_base_model_state_dict`` / ``set_base_model_state_dict``).

Wrapping a layer renames its weights: ``fc1.weight`` is ``fc1.base_layer.weight`` once LoRA
wraps ``fc1``, and a module trained whole (``modules_to_save``) keeps its original under
``original_module``. These two functions read and write the base model as if it were unwrapped:
the keys are those of the model before any adapter was added, and no adapter tensor is among
them. This is what loading pretrained weights into a model that is already adapted needs (after
FSDP wrapping, say), or saving the base model beside its adapters.

The tensors are the base layers' as they stand: an adapter merged into the weights is in them.
So writing them is refused while one is merged (unmerging would then subtract the adapter from
weights that never held it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys  # what load_state_dict returns, and so peft

from .checkpoint import describe_keys
from .injection import adapter_layers
from .targeting import logical_name


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s base-model state dict (a PeftModel, or a model with adapters injected), keyed
    as the model was before adapters wrapped it; adapter tensors left out."""
    base = _base_model(model)
    return {original: tensor for key, tensor in base.state_dict().items()
            if (original := logical_name(base, key)) is not None}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                              strict: bool = True) -> _IncompatibleKeys:
    """Load ``state_dict``, keyed as ``get_base_model_state_dict`` keys it, into the base model.

    strict: every base tensor must be given and no other key (as ``load_state_dict``). Either
    way, unknown keys and shapes that differ are reported before anything is written, so a failed
    call leaves the model as it was. Returns ``(missing_keys, unexpected_keys)`` in the original
    names."""
    base = _base_model(model)
    merged = sorted({name for name, layer in adapter_layers(base) if layer.merged_adapters and layer.folds_into_weight})
    if merged:
        raise ValueError(f"adapters are merged into {merged[:3]}{' ...' if len(merged) > 3 else ''}: writing base "
                         "weights now would leave the merged update out of them, and unmerging would subtract it from "
                         "weights that never held it. unmerge_adapter() first")
    targets = {}  # original key -> (key in the wrapped model, tensor)
    for key, tensor in base.state_dict(keep_vars=True).items():
        original = logical_name(base, key)
        if original is not None:
            targets[original] = (key, tensor)
    missing = [k for k in targets if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    problems = []
    if strict and missing:
        problems.append(f"missing key(s): {describe_keys(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected key(s): {describe_keys(unexpected)} (the keys are the model's before adapters "
                        f"wrapped it, e.g. {describe_keys(list(targets)[:3])})")
    problems += [f"{k!r} is a {type(v).__name__}, not a tensor" for k, v in state_dict.items()
                 if k in targets and not isinstance(v, torch.Tensor)]
    problems += [f"{k!r} has shape {tuple(v.shape)}, the model's is {tuple(targets[k][1].shape)}"
                 for k, v in state_dict.items()
                 if k in targets and isinstance(v, torch.Tensor) and v.shape != targets[k][1].shape]
    if problems:
        raise RuntimeError("cannot load the base model's state dict: " + "; ".join(problems))
    base.load_state_dict({targets[k][0]: v for k, v in state_dict.items() if k in targets}, strict=False)
    return _IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)


def _base_model(model: nn.Module) -> nn.Module:
    """The model the adapters live in: a PeftModel's wrapped model, else ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model

"""Putting adapters into any ``nn.Module`` and taking them out again.

These functions work on a plain model, in place; ``PeftModel`` is a thin owner around them.
Injection is all-or-nothing: wrappers are built first, the model is changed only once every
target has been checked, and any error restores what was there before.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

from torch import nn

from .config import PeftConfig, check_adapter_name
from .targeting import find_targets, is_under, logical_name
from .tuners import AdapterLayer, ModulesToSaveWrapper, method_for
from .tuners.virtual_tokens import PromptEncoderDict


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter wrapper in the model with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def known_adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name some wrapper in ``model`` holds, in the order first met."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def check_new_adapter_name(adapter_name: str) -> None:
    """Refuse a name that cannot name an adapter: one ``config.check_adapter_name`` refuses (not a
    non-empty string, or holding '.', a path separator or a control character), or one that is
    already an attribute of the ``nn.ModuleDict`` containers it keys ("train", "to", "keys", ...),
    which torch refuses as a key."""
    check_adapter_name(adapter_name)
    if adapter_name in _module_dict_attributes():
        raise ValueError(
            f"invalid adapter name {adapter_name!r}: adapters are kept in nn.ModuleDicts keyed by name, and "
            f"{adapter_name!r} is already an attribute of those (as 'train', 'to' and 'keys' are), so it cannot be a "
            f"key. Choose another name, e.g. '{adapter_name}_adapter'"
        )


@functools.cache
def _module_dict_attributes() -> frozenset[str]:
    """Attribute names of an ``nn.ModuleDict`` and an ``nn.ParameterDict`` (every ``nn.Module``
    attribute and the dict methods) and of the PeftModel's ``ModuleDict`` of prompt encoders,
    read from real instances."""
    prompt_encoders = PromptEncoderDict(nn.Identity())
    prompt_encoders.remove_hooks()
    return frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict())) | frozenset(dir(prompt_encoders))


def _adapter_internals(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names a new adapter must not target: the containers inside wrappers (``...q_lin.lora_A``,
    with everything below them) and the wrapped modules themselves (``...q_lin.base_layer``:
    the wrapper, under the original name, stands for it). Modules *inside* a wrapped module stay
    targetable: LoRA on ``down_proj`` inside a bottleneck-wrapped ``mlp`` is fine."""
    containers, wrapped = [], []
    for name, layer in adapter_layers(model):
        prefix = f"{name}." if name else ""
        containers += [prefix + attr for attr in layer.adapter_layer_names if hasattr(layer, attr)]
        wrapped.append(prefix + layer.base_layer_name)
    return containers, wrapped


def targets_of(model: nn.Module, config: PeftConfig) -> list[str]:
    """Qualified names of the modules a new adapter with ``config`` would adapt in ``model`` now."""
    skip, wrapped = _adapter_internals(model)
    return find_targets(model, config, skip=skip, skip_exact=wrapped)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_adapter_in_model(
    config: PeftConfig, model: nn.Module, adapter_name: str = "default", activate: bool = True
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``config`` to ``model``, in place.

    Wraps every module ``config`` selects (or adds the adapter to an existing wrapper of the
    same method), wraps ``config.modules_to_save`` for training, freezes the base model and
    makes the new adapter trainable when it is activated. Returns ``model``.
    """
    method = method_for(config)
    if method.wrap is None:
        raise ValueError(
            f"{type(config).__name__} adds virtual tokens instead of wrapping layers, so it needs a PeftModel "
            "to hold them: use get_peft_model(model, config)"
        )
    check_new_adapter_name(adapter_name)
    if adapter_name in known_adapter_names(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists in this model; choose another name")

    skip, wrapped = _adapter_internals(model)
    targets = find_targets(model, config, skip=skip, skip_exact=wrapped)
    replaced: list[tuple[str, nn.Module]] = []  # (name, original module) to restore on error
    updated: list[AdapterLayer] = []  # existing wrappers that received the adapter
    try:
        plan = []
        for name in targets:
            module = model.get_submodule(name)
            # Per-module settings (rank_pattern, feedforward_modules, ...) match the name as it
            # reads without other adapters' wrappers, as the targets themselves do.
            key = logical_name(model, name) or name
            if isinstance(module, method.layer_class):
                updated.append(module)  # before the update, so a half-done update is rolled back too
                module.update_layer(adapter_name, config, key)
            else:
                plan.append((name, module, method.wrap(module, adapter_name, config, key)))
        plan += _plan_modules_to_save(model, config, adapter_name, skip + wrapped, targets, updated)
        for name, module, wrapper in plan:
            wrapper.train(module.training)  # a wrapper follows the mode of the module it replaces
            parent, child = _get_parent(model, name)
            setattr(parent, child, wrapper)
            replaced.append((name, module))
    except BaseException:
        for name, module in reversed(replaced):
            parent, child = _get_parent(model, name)
            setattr(parent, child, module)
        for layer in updated:
            layer.delete_adapter(adapter_name)
        raise

    _freeze_base(model)
    if activate:
        set_adapter(model, [adapter_name], trainable=not config.inference_mode)
        set_biases_trainable(model, config, adapter_name, trainable=not config.inference_mode)
    return model


def _plan_modules_to_save(model, config, adapter_name, skip, targets, updated) -> list:
    """Wrap the modules trained whole. peft matches these by plain suffix (``key.endswith``),
    so ``"classifier"`` also selects DistilBERT's ``pre_classifier``; we do the same so that
    checkpoints line up."""
    plan = []
    names = getattr(config, "modules_to_save", None) or []
    for name, module in model.named_modules():
        if not name or is_under(name, skip) or not any(name.endswith(target) for target in names):
            continue
        if name in targets:
            raise ValueError(
                f"{name!r} is selected both by target_modules and by modules_to_save={names} (which match "
                f"by plain name suffix, as in peft); a module is either adapted or trained whole. "
                f"Add it to exclude_modules, or narrow target_modules."
            )
        if isinstance(module, ModulesToSaveWrapper):
            updated.append(module)
            module.update_layer(adapter_name)
        elif not any(name.startswith(p + ".") for p, _, _ in plan):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.update_layer(adapter_name)
            plan.append((name, module, wrapper))
    return plan


def _freeze_base(model: nn.Module) -> None:
    """Everything that is not an adapter parameter stops training."""
    adapter_params = {
        id(p) for _, layer in adapter_layers(model) for a in layer.adapter_names for p in layer.adapter_parameters(a)
    }
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def trained_biases(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
    """Qualified names of the base-model biases ``config`` trains (and checkpoints save) with
    adapter ``adapter_name``: every bias for ``bias="all"`` (except the adapters' own and the
    frozen originals kept by ``modules_to_save``), or those of the layers that hold the adapter
    for ``bias="lora_only"``."""
    bias = getattr(config, "bias", "none")
    layers = list(adapter_layers(model))
    join = lambda *parts: ".".join(p for p in parts if p)  # noqa: E731
    if bias == "all":
        inside = [join(n, c) for n, layer in layers for c in layer.adapter_layer_names]
        inside += [join(n, layer.base_layer_name) for n, layer in layers if isinstance(layer, ModulesToSaveWrapper)]
        return [n for n, _ in model.named_parameters() if n.endswith("bias") and not is_under(n, inside)]
    names = []
    if bias.endswith("_only"):
        for name, layer in layers:
            if isinstance(layer, ModulesToSaveWrapper) or adapter_name not in layer.adapter_names:
                continue
            module = layer
            while isinstance(module, AdapterLayer):  # down to the original module
                name, module = join(name, module.base_layer_name), getattr(module, module.base_layer_name)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                names.append(join(name, "bias"))
    return names


def set_biases_trainable(model: nn.Module, config: PeftConfig, adapter_name: str, trainable: bool = True) -> None:
    params = dict(model.named_parameters())
    for name in trained_biases(model, config, adapter_name):
        params[name].requires_grad_(trainable)


def set_adapter(model: nn.Module, adapter_names: list[str], trainable: bool = True) -> None:
    """Make ``adapter_names`` the active adapters in every wrapper (of every method)."""
    known = known_adapter_names(model)
    unknown = [a for a in adapter_names if a not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    for _, layer in adapter_layers(model):
        layer.set_adapter(adapter_names, trainable=trainable)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    layers = [layer for _, layer in adapter_layers(model) if adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {known_adapter_names(model)}")
    for layer in layers:
        layer.delete_adapter(adapter_name)
    # A wrapper left with no adapter at all goes back to being its base module.
    for name, layer in list(adapter_layers(model)):
        if not layer.adapter_names:
            parent, child = _get_parent(model, name)
            setattr(parent, child, getattr(layer, layer.base_layer_name))


def unload(model: nn.Module, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
    """Replace every wrapper by its base module (merging ``adapter_names``, default the active
    adapters, first when ``merge``), innermost wrappers first so nested wrappers unwind cleanly."""
    layers = list(adapter_layers(model))
    if merge:
        blocking = [f"{name} ({type(layer).__name__})" for name, layer in layers if not layer.mergeable]
        if blocking:
            raise TypeError(
                f"cannot merge: {', '.join(blocking[:3])}{' ...' if len(blocking) > 3 else ''} hold adapters that are "
                "not linear maps of a weight; call unload() to remove them without merging"
            )
    for name, layer in reversed(layers):
        replacement = layer.unwrap(merge, adapter_names)
        if name == "":
            return replacement
        parent, child = _get_parent(model, name)
        setattr(parent, child, replacement)
    return model

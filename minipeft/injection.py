"""Putting adapters into any ``nn.Module`` and taking them out again.

These functions work on a plain model, in place; ``PeftModel`` is a thin owner around them.

Injection goes in three steps. ``_check_all`` raises every refusal the method knows, for every
target, before anything changes. ``_build_plan`` builds the new wrappers, and already changes the
model in two ways: a target that a wrapper of the method holds gets the new adapter in that
wrapper, in place, and an init defined by rewriting the base weight (LoRA's PiSSA / OLoRA)
rewrites it as the adapter is created. ``_apply_plan`` then puts the new wrappers in place of
their modules. An error in the last two steps puts the replaced modules back and takes the
adapter out of the wrappers that got it in place; a rewritten base weight stays rewritten, which
is why the refusals come first.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import PeftConfig, check_config_type
from .targeting import (
    TASK_HEAD_NAMES, candidate_names, find_targets, innermost, is_bias, is_under, join_name, logical_name, nearest_names,
    trained_whole, wrapper_chain,
)
from .tuners import AdapterLayer, ModulesToSaveWrapper, PeftMethod, method_for
from .tuners.base import BASE_MODEL_NAME, layers_a_copy_would_copy
from .tuners.layer_replication import replicate_for
from .tuners.quantized import QUANTIZED_LINEARS, is_bitsandbytes, quantization
from .tuners.trainable_tokens import TrainableTokensWrapper
from .tuners.virtual_tokens import PromptEncoderDict


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter wrapper in the model with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def innermost_first(layers: list[tuple[str, AdapterLayer]]) -> list[tuple[str, AdapterLayer]]:
    """``layers`` (in model order) with every wrapper after the wrappers nested inside it, other
    layers keeping their order: the order merges must take, since a wrapper's merge writes the
    weight its inner wrappers' base layer holds (OFT rotates what an inner LoRA added to)."""
    ordered, open_wrappers = [], []
    for name, layer in layers:
        while open_wrappers and open_wrappers[-1][0] != "" and not is_under(name, [open_wrappers[-1][0]]):
            ordered.append(open_wrappers.pop())
        open_wrappers.append((name, layer))
    return ordered + open_wrappers[::-1]


def known_adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name some wrapper in ``model`` holds, in the order first met."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update(dict.fromkeys(layer.adapter_names))
    return list(names)


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it can name an adapter, else raise an error saying what is wrong.

    The one rule for adapter names, used wherever a name comes in (adding, loading, saving).
    A name keys ``nn.ModuleDict`` / ``nn.ParameterDict`` containers (``lora_A["default"]``),
    which refuse a ``'.'`` and any key that is already an attribute of the container ("train",
    "to", "keys", ...); and it names the subfolder an adapter other than ``default`` is saved to
    (``<folder>/<name>/``), which must stay inside ``<folder>``: no path separators, no absolute
    path, no ``..`` (already ruled out by the ``'.'``).
    """
    if not isinstance(name, str):
        raise TypeError(f"an adapter name must be a string, got {type(name).__name__} {name!r}")
    if not name.strip():
        problem = "it is empty"
    elif "." in name:
        problem = "it contains '.', which nn.ModuleDict keys cannot hold and which could leave the save folder ('..')"
    elif "/" in name or "\\" in name or os.path.isabs(name):
        problem = "it contains a path separator, and the adapter is saved to a subfolder of that name"
    elif any(ord(c) < 32 for c in name):
        problem = "it contains a control character"
    elif name == BASE_MODEL_NAME:
        problem = "in a mixed batch (adapter_names) it stands for the base model alone, with no adapter"
    else:
        problem = None
    if problem:
        raise ValueError(f"invalid adapter name {name!r}: {problem}. Use letters, digits, '_' and '-', e.g. 'sst2_lora'")
    if name in _container_attributes():
        raise ValueError(
            f"invalid adapter name {name!r}: adapters are kept in nn.ModuleDicts keyed by name, and {name!r} is "
            f"already an attribute of those (as 'train', 'to' and 'keys' are), so it cannot be a key. Choose "
            f"another name, e.g. '{name}_adapter'"
        )
    return name


def check_new_adapter_name(adapter_name: object, existing: Iterable[str] = ()) -> str:
    """Return ``adapter_name`` if a new adapter may take it: a valid name (``check_adapter_name``)
    that none of the ``existing`` adapters has. Cheap, so callers check before any work."""
    check_adapter_name(adapter_name)
    existing = list(existing)
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {existing}. Choose another name")
    return adapter_name


def _container_attributes() -> frozenset[str]:
    """Names torch refuses as keys of the containers adapter names key, because they are attributes
    already: those of ``nn.ModuleDict``, ``nn.ParameterDict`` (inside wrappers) and the PeftModel's
    ``PromptEncoderDict``.

    Methods and properties are read from the classes. Instance attributes matter too, and
    ``dir()`` of a class misses them: every ``nn.Module`` sets "training", "_modules", ... in
    ``__init__`` and ``nn.ParameterDict`` sets "_keys", so those are read from an empty
    ``nn.ParameterDict`` (no model, no hooks); ``PromptEncoderDict`` declares its own
    ("active_adapter", "disable_adapters", ...) on the class so that ``dir()`` lists them.
    Read at each call, not cached: libraries add to nn.Module at run time (transformers'
    ``smart_apply``, once a model is built).
    """
    classes = (nn.ModuleDict, nn.ParameterDict, PromptEncoderDict)
    return frozenset().union(*map(dir, classes), vars(nn.ParameterDict()))


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _place_of(model: nn.Module, name: str) -> str:
    """Where the module that replaces the adapter layer ``name`` goes: ``name``, or the name of the
    ``TrainableTokensWrapper`` holding that layer, which is there only to hold it (peft's module
    tree for LoRA's trainable tokens) and goes with it."""
    parent = name.rpartition(".")[0]
    return parent if name and isinstance(model.get_submodule(parent), TrainableTokensWrapper) else name


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
    *,
    activate: bool = True,
) -> nn.Module:
    """Add adapter ``adapter_name`` described by ``peft_config`` to ``model``, in place.

    Wraps every module the config selects (or adds the adapter to an existing wrapper of the
    same method), wraps its ``modules_to_save`` for training, freezes the base model and
    makes the new adapter trainable when it is activated. Returns ``model``.

    peft's arguments: ``low_cpu_mem_usage`` changes nothing (adapters are small and built where
    they live); ``state_dict``, a checkpoint's tensors, selects the modules it holds adapter
    tensors for in place of ``peft_config.target_modules`` (its keys only: load its values with
    ``set_peft_model_state_dict``), for a checkpoint whose config does not say.
    """
    config = peft_config  # (peft's argument name; the config below)
    check_config_type(config)
    method = method_for(config)
    if method.wrap is None:
        raise ValueError(
            f"{type(config).__name__} adds virtual tokens instead of wrapping layers, so it needs a PeftModel "
            "to hold them: use get_peft_model(model, config)"
        )
    check_new_adapter_name(adapter_name, known_adapter_names(model))
    if state_dict is not None:
        config = copy.copy(config)  # (the caller's config keeps its own targets)
        config.target_modules = _targets_in(state_dict, method)

    if getattr(config, "target_modules", "") is None and method.default_targets is not None:
        config.target_modules = method.default_targets(model, config)  # recorded in the config, as peft does
    if method.prepare_config is not None:
        method.prepare_config(model, config)
    # LoRA's layer_replication changes the model before its targets are found; undone on an error.
    undo_replication = replicate_for(model, getattr(config, "layer_replication", None))
    try:
        targets = find_targets(model, config)  # never adapter internals nor the modules wrappers hold
        # Per-module settings (rank_pattern, feedforward_modules, ...) match the name as it reads
        # without other adapters' wrappers, as the targets themselves do.
        keys = {name: logical_name(model, name) or name for name in targets}
        _check_all(model, config, method, keys)
        with _taken_back_on_error(adapter_name) as updated:
            _apply_plan(model, _build_plan(model, config, method, adapter_name, keys, updated))
    except BaseException:
        if undo_replication is not None:
            undo_replication()
        raise
    _freeze_base(model)
    if activate:
        set_adapter(model, [adapter_name], trainable=not config.inference_mode)
        set_biases_trainable(model, config, adapter_name, trainable=not config.inference_mode)
    return model


def _targets_in(state_dict: dict, method: PeftMethod) -> str:
    """The modules a checkpoint holds ``method``'s adapter tensors for, as a regex that matches
    their names in full: each key's name up to the first of the layer's adapter parts
    (``encoder.layer.0.attention.self.query.lora_A.weight`` -> ``encoder.layer.0.attention.self.query``)."""
    parts_of_layer = set(method.layer_class.adapter_layer_names)
    names: dict[str, None] = {}
    for key in state_dict:
        parts = key.removeprefix("base_model.model.").split(".")  # (a PeftModel's state_dict has the prefix)
        cut = next((i for i, part in enumerate(parts) if part in parts_of_layer), None)
        if cut:
            names[".".join(parts[:cut])] = None
    if not names:
        raise ValueError(f"state_dict holds no tensor of a {method.config_class.__name__} adapter (keys with "
                         f"{sorted(parts_of_layer)}); its keys: {list(state_dict)[:3]}")
    return "|".join(re.escape(name) for name in names)


def wrap_modules_to_save(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Wrap the modules ``config.modules_to_save`` selects, so that each trains a copy with adapter
    ``adapter_name`` (a module wrapped already gets the adapter in its wrapper). For virtual-token
    methods, which wrap nothing else; ``inject_adapter_in_model`` does this inside its own plan."""
    _check_modules_to_save(model, config)
    with _taken_back_on_error(adapter_name) as updated:
        _apply_plan(model, _plan_modules_to_save(model, config, adapter_name, updated))


def _check_all(model: nn.Module, config: PeftConfig, method: PeftMethod, keys: dict[str, str]) -> None:
    """The method's refusals (the registry's ``check`` on each target, then ``check_model``), and
    those of the modules trained whole, raised before anything changes (an init such as PiSSA
    rewrites base weights as its wrappers are built). ``keys``: target's real name -> its logical name."""
    _check_modules_to_save(model, config)
    _check_quantized_targets(model, config, method, keys)
    if method.check is not None:
        for name, key in keys.items():
            method.check(model.get_submodule(name), config, key)
    if method.check_model is not None:
        method.check_model(model, config, list(keys))


def _build_plan(
    model: nn.Module,
    config: PeftConfig,
    method: PeftMethod,
    adapter_name: str,
    keys: dict[str, str],
    updated: list[AdapterLayer],
) -> list[tuple[str, nn.Module, nn.Module]]:
    """The new wrappers, as ``(name, module it replaces, wrapper)`` in the order to install them:
    one per target no wrapper of the method holds yet, one per module trained whole, then the
    method's ``wrap_more``. A target a wrapper of the method holds gets the adapter there, in
    place; such wrappers go into ``updated``."""
    plan = []
    holders: dict[str, AdapterLayer] = {}  # target name -> the wrapper that holds the new adapter there
    try:
        for name, key in keys.items():
            module = model.get_submodule(name)
            if isinstance(module, method.layer_class):
                updated.append(module)  # before the update, so a half-done update is rolled back too
                module.add_adapter(adapter_name, config, key)
                holders[name] = module
            else:
                holders[name] = method.wrap(module, adapter_name, config, key)
                plan.append((name, module, holders[name]))
        plan += _plan_modules_to_save(model, config, adapter_name, updated)
        if method.wrap_more is not None:
            plan += method.wrap_more(model, config, adapter_name, holders, updated)
    except BaseException:
        for _, _, wrapper in plan:
            wrapper.unwrap(merge=False)  # what a wrapper changed inside its module (an attention's out_proj)
        raise
    return plan


def _apply_plan(model: nn.Module, plan: list[tuple[str, nn.Module, nn.Module]]) -> None:
    """Put each wrapper of ``plan`` in place of its module, in that module's train/eval mode; on an
    error, put the modules replaced so far back."""
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for name, module, wrapper in plan:
            wrapper.take_mode_of(module)
            if _inside_fused_encoder_layer(model, name):
                _keep_encoder_layer_on_the_adapters_path(wrapper)
            parent, child = _get_parent(model, name)
            setattr(parent, child, wrapper)
            replaced.append((name, module))
    except BaseException:
        for name, module in reversed(replaced):
            parent, child = _get_parent(model, name)
            setattr(parent, child, module)
        raise


def _inside_fused_encoder_layer(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` lies inside an nn.TransformerEncoderLayer. In eval mode, that layer's
    fast path computes the whole block in one fused op from the weights of its sublayers (linear1,
    norm2, ...), read past their forward, so it would skip an adapter wrapped around one."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), nn.TransformerEncoderLayer)
               for i in range(len(parts)))


def _keep_encoder_layer_on_the_adapters_path(wrapper: AdapterLayer) -> None:
    """Hooks on a wrapper inside an nn.TransformerEncoderLayer. Their presence alone keeps the
    layer off its fused fast path (it takes it only where no module inside has hooks). And where
    nn.TransformerEncoder packs a padded batch into a nested tensor (at inference), which few
    tensor operations take, a sublayer that works token by token (a linear layer, a norm) gets
    it padded and returns its output packed again; an attention handles nested input itself."""
    if isinstance(innermost(wrapper), nn.MultiheadAttention):
        wrapper.register_forward_pre_hook(_no_change)
    else:
        wrapper.register_forward_pre_hook(_pad_nested_input, with_kwargs=True)
        wrapper.register_forward_hook(_pack_nested_output, with_kwargs=True)


def _no_change(module: nn.Module, args: tuple) -> None:
    return None


def _pad_nested_input(module: nn.Module, args: tuple, kwargs: dict):
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.is_nested):
        module.__dict__.pop("_nested_lengths", None)  # (left by a call that raised)
        return None
    module.__dict__["_nested_lengths"] = [t.shape[0] for t in x.unbind()]  # for _pack_nested_output
    return (x.to_padded_tensor(0.0), *args[1:]), kwargs  # (B, T_max, d)


def _pack_nested_output(module: nn.Module, args: tuple, kwargs: dict, output):
    lengths = module.__dict__.pop("_nested_lengths", None)
    if lengths is None:
        return None
    if output.requires_grad:  # (an adapter ran that trains; disabled or merged ones leave none)
        raise ValueError(
            "nn.TransformerEncoder packed this padded batch into a nested tensor (it does in eval mode with a "
            "src_key_padding_mask, judging by its frozen weights), and nn.MultiheadAttention cannot differentiate "
            "through one, as the adapter here would need. Build the encoder with enable_nested_tensor=False, run it "
            "in training mode (with dropout 0 if need be), or under torch.no_grad()"
        )
    return torch.nested.as_nested_tensor([row[:n] for row, n in zip(output, lengths)])


@contextlib.contextmanager
def _taken_back_on_error(adapter_name: str) -> Iterator[list[AdapterLayer]]:
    """Yields a list for the existing wrappers that get adapter ``adapter_name`` in place; if the
    block fails, each of them loses it again."""
    updated: list[AdapterLayer] = []
    try:
        yield updated
    except BaseException:
        for layer in updated:
            layer.delete_adapter(adapter_name)
        raise


def _saved_whole(model: nn.Module, config: PeftConfig) -> dict[str, str]:
    """The modules ``config.modules_to_save`` selects (``targeting.trained_whole``), {qualified
    name: logical name}. The names matched are logical names, as for ``target_modules``: a module
    inside another adapter's wrapper is found under its own name, adapter internals never."""
    saved = getattr(config, "modules_to_save", None)
    return {name: logical for name, logical in candidate_names(model).items() if trained_whole(logical, saved)}


def _check_quantized_targets(model: nn.Module, config: PeftConfig, method: PeftMethod, keys: dict[str, str]) -> None:
    """bitsandbytes' layers as targets: its quantized linear layers for the methods that take
    them (LoRA, (IA)^3: ``tuners/quantized.py``), none of its other layers (a 4-bit embedding's
    packed table is no table of the embedding's shape)."""
    bases = {key: innermost(model.get_submodule(name)) for name, key in keys.items()}
    other = [f"{key!r} ({type(base).__name__})" for key, base in bases.items()
             if is_bitsandbytes(base) and type(base).__name__ not in QUANTIZED_LINEARS and quantization(base) is None
             and any(not p.is_floating_point() or type(p).__name__ == "Params4bit" for p in base.parameters())]
    if other:
        raise TypeError(f"the targets hold bitsandbytes layers minipeft does not adapt: {', '.join(other[:3])}"
                        f"{' ...' if len(other) > 3 else ''}; it adapts {sorted(QUANTIZED_LINEARS)}. Leave them out "
                        "(exclude_modules)")
    if method.layer_class is not None and not method.layer_class.takes_quantized_base:
        quantized = [f"{key!r} ({kind})" for key, base in bases.items() if (kind := quantization(base))]
        if quantized:
            raise TypeError(f"{config.peft_type.value} cannot adapt bitsandbytes' quantized layers, and the targets "
                            f"hold {', '.join(quantized[:3])}{' ...' if len(quantized) > 3 else ''}. minipeft adapts "
                            "them with LoRA (QLoRA), (IA)^3 and bottleneck adapters; or leave those layers out (exclude_modules)")


def _check_modules_to_save(model: nn.Module, config: PeftConfig) -> None:
    """Each ``modules_to_save`` entry must name a module (a misspelt head would stay frozen and
    unsaved; peft ignores it), except the heads a task adds, of which a model has one (where it
    has one of them). And a
    module trained whole must hold no other adapter's wrapper: its copy would copy that adapter
    too (and save its tensors under this one's name); peft refuses the same."""
    logical = list(candidate_names(model).values())
    entries = getattr(config, "modules_to_save", None) or []
    matched = {entry for entry in entries if any(trained_whole(name, [entry]) for name in logical)}
    # A task lists every name its head has across architectures (SEQ_CLS: classifier, score), one of
    # which a model with that head has, and a model without heads (a task's adapter loaded into the
    # bare model) none; but a head name that the model's head does not have ('classifier' on Llama's
    # 'score') is a mistake like any other.
    task_heads = {head for heads in TASK_HEAD_NAMES.values() for head in heads}
    heads = sorted(n for n in task_heads if any(name.rpartition(".")[2] == n for name in logical))
    for entry in entries:
        if entry not in matched and not (entry in task_heads and (matched & task_heads or not heads)):
            nearest, example = nearest_names([entry], logical)
            hint = f" (this model's head is {heads[0]!r})" if entry in task_heads and heads else ""
            raise ValueError(f"modules_to_save entry {entry!r} matched no module of {type(model).__name__}{hint}. "
                             f"Nearest names, nearest first: {nearest}, e.g. {example!r}. An entry matches the end of a "
                             "module's name, as in peft")
    saved_whole = _saved_whole(model, config)
    for name in saved_whole:
        module = model.get_submodule(name)
        frozen = [n for n, p in module.named_parameters() if not p.is_floating_point() or type(p).__name__ == "Params4bit"]
        if frozen:
            raise TypeError(f"modules_to_save selects {name!r}, whose {frozen[:3]} are stored quantized: a trained copy "
                            "needs float weights to train. Train it with an adapter instead (LoRA), or load it unquantized")
        _warn_untying(model, name, module, saved_whole)
        holding = layers_a_copy_would_copy(module, ModulesToSaveWrapper)
        if holding:
            wrapper = module.get_submodule(holding[0])
            raise ValueError(
                f"modules_to_save names {name!r}, where adapter(s) {wrapper.adapter_names} already sit "
                f"({type(wrapper).__name__} at {join_name(name, holding[0])!r}); a copy trained whole would copy them "
                "too. Train it whole in the adapter that adapts it, or leave it out of modules_to_save"
            )


def _warn_untying(model: nn.Module, name: str, module: nn.Module, saved_whole: list[str]) -> None:
    """Warn where a module trained whole shares a weight with a module outside it (an input
    embedding tied to the LM head) not trained whole too: the trained copy no longer shares it,
    and the other module keeps the frozen original. peft warns too."""
    own = {id(p) for p in module.parameters()}
    apart = [name, *saved_whole]  # (the module itself, and those with copies of their own)
    tied = sorted({other for other, m in model.named_modules()
                   if not any(other == a or other.startswith(a + ".") or a.startswith(other + ".") for a in apart)
                   and any(id(p) in own for p in m.parameters(recurse=False))})
    if tied:
        warnings.warn(f"modules_to_save trains a copy of {name!r}, which shares its weight with {tied}: the copy is "
                      "untied from them, and they keep the frozen original (trainable_token_indices trains rows of a "
                      "tied embedding and keeps the LM head in step)", stacklevel=5)


def _plan_modules_to_save(model, config, adapter_name, updated) -> list:
    """Wrap the modules trained whole (``_saved_whole``). No target is among them, nor inside
    them: ``find_targets`` leaves those to modules_to_save."""
    plan = []
    for name in _saved_whole(model, config):
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            updated.append(module)
            module.add_adapter(adapter_name)
        elif not any(name.startswith(p + ".") for p, _, _ in plan):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add_adapter(adapter_name)
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
    frozen originals kept by ``modules_to_save``), or for ``bias="lora_only"`` those of the
    method's own layers that hold the adapter."""
    bias = getattr(config, "bias", "none")
    layers = list(adapter_layers(model))
    if bias == "all":
        inside = [join_name(n, c) for n, layer in layers for c in layer.adapter_layer_names]
        inside += [join_name(n, layer.base_layer_name) for n, layer in layers if isinstance(layer, ModulesToSaveWrapper)]
        return [n for n, _ in model.named_parameters() if is_bias(n) and not is_under(n, inside)]
    names = []
    if bias.endswith("_only"):
        # Only the method's own layers count: not the modules trained whole, nor the layers of
        # LoRA's trainable_token_indices (a tied head's bias is not LoRA's; peft leaves it frozen).
        own = method_for(config).layer_class
        for name, layer in layers:
            if own is None or not isinstance(layer, own) or adapter_name not in layer.adapter_names:
                continue
            # The original module's bias, one base_layer segment down for every wrapper around it.
            if isinstance(getattr(innermost(layer), "bias", None), nn.Parameter):
                names.append(join_name(name, *(w.base_layer_name for w in wrapper_chain(layer)), "bias"))
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
    layers = [(name, layer) for name, layer in adapter_layers(model) if adapter_name in layer.adapter_names]
    if not layers:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {known_adapter_names(model)}")
    # Refused before any layer lets it go: a deletion that stopped halfway would leave a model
    # that computes neither with the adapter nor without it.
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the weights of {merged[:3]}"
                         f"{' ...' if len(merged) > 3 else ''}; unmerge it before deleting it")
    for _, layer in layers:
        layer.delete_adapter(adapter_name)
    # A wrapper left with no adapter at all goes back to being its base module; innermost first,
    # so that nested wrappers (two parameters of one module, target_parameters) unwind cleanly.
    for name, layer in reversed(list(adapter_layers(model))):
        put_back_base_if_empty(model, name, layer)


def put_back_base_if_empty(model: nn.Module, name: str, layer: AdapterLayer) -> None:
    """A wrapper holding no adapter any more goes back to being its base module, at ``name``."""
    if not layer.adapter_names:
        parent, child = _get_parent(model, _place_of(model, name))
        setattr(parent, child, getattr(layer, layer.base_layer_name))


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again, the newest merge in the whole
    model first: two wrappers may write one weight (trainable tokens on an embedding and LoRA on
    the head tied to it), and their merges need not commute."""
    merges = [(layer.merge_number[name], layer) for _, layer in adapter_layers(model) for name in layer.merged_adapters]
    for _, layer in sorted(merges, key=lambda merge: merge[0], reverse=True):
        layer.unmerge_newest()  # a wrapper's merges are numbered in its own order: this is that one


def unload(model: nn.Module, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
    """Replace every wrapper by its base module (merging ``adapter_names``, default the active
    adapters, first when ``merge``), innermost wrappers first so nested wrappers unwind cleanly
    and merge in the order ``merge_adapter`` merges them."""
    layers = list(adapter_layers(model))
    if merge:
        blocking = [f"{name} ({type(layer).__name__})" for name, layer in layers if not layer.mergeable]
        if blocking:
            raise TypeError(
                f"cannot merge: {', '.join(blocking[:3])}{' ...' if len(blocking) > 3 else ''} hold adapters that are "
                "not linear maps of a weight; call unload() to remove them without merging"
            )
    for name, layer in innermost_first(layers):
        replacement = layer.unwrap(merge, adapter_names)
        name = _place_of(model, name)
        if name == "":
            return replacement
        parent, child = _get_parent(model, name)
        setattr(parent, child, replacement)
    return model

"""Which modules of a model a config selects, and the error when it selects none.

Matching rules (the same as ``peft``):

* ``target_modules`` as a list: a module is selected when its qualified name equals an entry
  or ends with ``"." + entry``; ``"q_lin"`` selects ``distilbert.transformer.layer.0.attention.q_lin``.
* ``target_modules`` as a string: a full regular-expression match on the qualified name;
  the special string ``"all-linear"`` selects every linear layer except the model's output
  head (and the ``out_proj`` of an ``nn.MultiheadAttention``, which that module never calls).
* ``exclude_modules`` uses the same rules and wins over ``target_modules``.
* ``layers_to_transform`` keeps only matches inside the listed layer indices, where the
  index is the number after ``layers_pattern`` (``"layers"``, ``"h"``, ...) in the name, or
  without it the number after two named segments (``model.layers.7.``; a top-level
  ``blocks.0.fc1`` needs ``layers_pattern="blocks"``); a module that a list entry names in full
  is kept wherever it is.

Names are *logical* names: those of the model without adapter wrappers. A wrapper takes the
place (and the name) of the module it adapts and keeps that module one level down, as
``base_layer`` (``original_module`` for a module trained whole, ``token_adapter`` for the
layer of LoRA's trainable tokens, which a ``TrainableTokensWrapper`` holds). So once a bottleneck adapter
wraps ``layer.0.output``, its dense layer, really at ``layer.0.output.base_layer.dense``, is
still selected by ``"output.dense"``; what a config selects does not depend on which adapters
were added before it. The wrappers' own parts (``lora_A.default``, ...) are never selected.

Beside ``target_modules``, a config's ``task_type`` selects too: the new head of a task's model
trains and is saved with the adapter (peft's rule), so ``check_task_type`` first makes sure the
task type is that of the model's head.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

ALL_LINEAR = "all-linear"
# The convolutions the methods adapt as a kernel (out, in, k...).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Names transformers gives to classification heads (peft checks the same ones).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# The heads a task's model gets new and untrained, which must train and be saved with the
# adapter: peft adds them to modules_to_save (names the model lacks are skipped).
TASK_HEAD_NAMES = {"SEQ_CLS": CLASSIFIER_HEAD_NAMES, "TOKEN_CLS": CLASSIFIER_HEAD_NAMES, "QUESTION_ANS": ("qa_outputs",)}
# The task of a transformers model class with such a head, by the end of its name.
TASK_OF_HEAD_CLASS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                      "ForQuestionAnswering": "QUESTION_ANS"}


def check_task_type(model: nn.Module, config) -> None:
    """A ValueError when ``config.task_type`` names another task than ``model``'s class has a
    new head for (``BertForSequenceClassification`` with ``"CAUSAL_LM"``): that head would
    neither train nor be saved with the adapter, and the fine-tune would silently keep it random.
    No task_type at all is warned of (peft allows it, and a head may be left frozen on purpose), where
    the config could train the head (a config with ``modules_to_save``).
    Not for FEATURE_EXTRACTION (the head's input is what is wanted) nor an adapter loaded for
    inference (nothing trains)."""
    task = next((t for suffix, t in TASK_OF_HEAD_CLASS.items() if type(model).__name__.endswith(suffix)), None)
    given = getattr(config, "task_type", None)
    given = getattr(given, "value", given)  # (a TaskType, or a string set after the config was built)
    if task is None or given in (task, "FEATURE_EXTRACTION") or getattr(config, "inference_mode", False):
        return
    heads = [n for n in TASK_HEAD_NAMES[task] if isinstance(getattr(model, n, None), nn.Module)]
    saved = getattr(config, "modules_to_save", None) or []
    if not heads or any(h in saved for h in heads):
        return
    if given is None:  # (peft says nothing; a head named wrong in modules_to_save is an error there)
        if hasattr(config, "modules_to_save") and not any(h in saved for h in TASK_HEAD_NAMES[task]):
            warnings.warn(f"{type(model).__name__} has a new {task} head ({heads[0]!r}) and the config no task_type: "
                          f"the head neither trains nor is saved with the adapter, and stays random. Pass "
                          f"task_type={task!r} (or list {heads[0]!r} in modules_to_save)", stacklevel=4)
        return
    raise ValueError(f"task_type={given!r}, but {type(model).__name__} has a new {task} head ({heads[0]!r}), which "
                     f"would neither train nor be saved with the adapter; use task_type={task!r} (or list "
                     f"{heads[0]!r} in modules_to_save)")


def out_in_features(weight, fan_in_fan_out: bool) -> tuple[int, int]:
    """(out, in) of a linear layer's weight: nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    return tuple(weight.shape[::-1] if fan_in_fan_out else weight.shape)


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` is a linear layer with a transposed (in, out) weight.

    Recognised by name and shape so that the library never imports transformers.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D, also when an adapter wrapper already holds it."""
    module = innermost(module)
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def linear_sizes(target: nn.Module, method: str, key: str) -> tuple[int, int]:
    """(out, in) of the linear layer in ``target`` (the module named ``key``), for a method that
    adapts nn.Linear and GPT-2's Conv1D only; any other module is refused, naming ``method``."""
    base = innermost(target)
    if not is_linear_like(base):
        raise ValueError(f"cannot apply {method} to {key!r}: it is a {type(base).__name__}; {method} supports "
                         "nn.Linear and transformers' GPT-2 Conv1D")
    return out_in_features(base.weight, is_gpt2_conv1d(base))


def is_wrapper(module: nn.Module) -> bool:
    """An adapter wrapper (``AdapterLayer``, ``ModulesToSaveWrapper``, ``TrainableTokensWrapper``): a
    module that names the attribute holding the module it wraps. Recognised by attribute, as this
    file imports no tuner."""
    return isinstance(getattr(module, "base_layer_name", None), str) and hasattr(module, "adapter_layer_names")


def wrapper_chain(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and the adapter wrappers below it, outermost first (nothing when unwrapped):
    wrappers nest when several adapters adapt one module, each holding the next as its base layer."""
    while is_wrapper(module):
        yield module
        module = getattr(module, module.base_layer_name)


def linear_weight_layout(base: nn.Module, config, key: str) -> bool:
    """``fan_in_fan_out`` for a linear ``base`` (the module named ``key``): True for GPT-2's Conv1D,
    whose weight is (in, out), False for ``nn.Linear``. The config records what the layer uses, as
    peft records it in the config it saves, with a warning where it said otherwise for an nn.Linear."""
    if is_gpt2_conv1d(base):
        config.fan_in_fan_out = True
        return True
    if config.fan_in_fan_out:
        warnings.warn(f"fan_in_fan_out=True but {key!r} is an nn.Linear (weight is (out, in)); using False")
        config.fan_in_fan_out = False
    return False


def innermost(module: nn.Module) -> nn.Module:
    """The original module under any adapter wrappers around it (``module`` itself when unwrapped)."""
    for wrapper in wrapper_chain(module):
        module = getattr(wrapper, wrapper.base_layer_name)
    return module


def logical_name(
    model: nn.Module, name: str, keep_wrapped: Callable[[nn.Module], bool] | None = None
) -> str | None:
    """``name`` (a module or parameter of ``model``) as it reads without adapter wrappers.

    Each wrapper's ``base_layer`` / ``original_module`` segment is dropped, since the wrapper
    stands under the name of the module it wraps:

        bert.encoder.layer.0.output.base_layer.dense       ->  bert.encoder.layer.0.output.dense
        ...attention.self.value.base_layer.base_layer.bias  ->  ...attention.self.value.bias

    Names inside a wrapper's own parts (``...value.lora_A.default``, ``...lora_dropout.default``)
    have no logical name: ``None``. ``keep_wrapped(wrapper)`` returning True keeps that wrapper's
    segment; checkpoints use it to name a tensor as it is in a model holding one adapter alone,
    where that adapter's wrappers are real (peft saves ``value.base_layer.bias``).
    The module tree is walked, not the string edited: a model may have its own ``base_layer``.
    """
    module: nn.Module | None = model
    parts = []
    for part in name.split(".") if name else ():
        child = module._modules.get(part) if module is not None else None
        if module is not None and is_wrapper(module):
            if part != module.base_layer_name:
                return None  # the wrapper's own parts: adapter internals
            if keep_wrapped is None or not keep_wrapped(module):
                module = child  # drop the segment: the wrapper already carries the name
                continue
        parts.append(part)
        module = child
    return ".".join(parts)


def is_bias(name: str) -> bool:
    """Whether the parameter named ``name`` is a bias as peft reads it for ``bias="all"``: ``bias``
    or ``<module>.bias``, not nn.MultiheadAttention's ``in_proj_bias``."""
    return name == "bias" or name.endswith(".bias")


def join_name(*parts: str) -> str:
    """A qualified name from its parts, empty ones left out: ``join_name("", "fc", "bias")`` is
    ``"fc.bias"`` (the model itself has the empty name)."""
    return ".".join(p for p in parts if p)


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` or a module inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """A string is a full regex match; a list matches exactly or as a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer-block index in a qualified name, e.g. 7 in ``model.layers.7.self_attn.q_proj``."""
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pattern in patterns:
            # peft's regex, so that a saved config adapts the same modules in both libraries (a
            # top-level "a|b", which would split this regex, is refused: check_layer_selection).
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<layer>\d+)\.", name)
            if match:
                return int(match.group("layer"))
        return None
    # Without a pattern, peft's rule: the first number after two named segments (a number right
    # after the first segment, "blocks.0.fc1", is none: peft would not adapt it, so its layers
    # are named with layers_pattern; see layer_pattern_hint).
    match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def layer_pattern_hint(names: Iterable[str], given=None) -> str:
    """For names in which ``layer_index`` found no layer number (with the ``layers_pattern``
    ``given``, or none): where the number is read, and the pattern that would find one, e.g.
    ``'blocks'`` for ``blocks.0.fc1`` (the segment before the first number)."""
    names = sorted(names)
    segments = sorted({m.group(1) for n in names if (m := re.match(r"(?:.*?\.)?([^.]+)\.\d+\.", n))})
    suggestion = ""
    if segments:
        suggestion = f"; give layers_pattern={segments[0] if len(segments) == 1 else segments!r}"
    if given:
        return (f"; layers_pattern={given!r} found no layer number in {names[:3]}: it reads the number right after "
                f"that name segment ('<pattern>.<n>.'){suggestion}")
    return (f"; no layer number was found in {names[:3]}: without layers_pattern it is the number after two named "
            f"segments, as in peft (model.layers.7.q_proj){suggestion}")


def declared_embedding(model: nn.Module, which: str) -> nn.Module | None:
    """The module a transformers model names as its ``"input"`` or ``"output"`` embedding
    (``get_input_embeddings()`` / ``get_output_embeddings()``), or None where it names none."""
    get = getattr(model, f"get_{which}_embeddings", None)
    try:
        layer = get() if callable(get) else None
    except NotImplementedError:  # transformers' base class, for a model that does not say
        return None
    return layer if isinstance(layer, nn.Module) else None


def output_head_names(model: nn.Module, task_type=None) -> set[str]:
    """Linear layers that 'all-linear' must leave alone: the LM head, or a classifier head."""
    heads = []
    output = declared_embedding(model, "output")
    if output is not None:
        heads.append(output)
    elif task_type == "SEQ_CLS":  # (a TaskType is a str enum: it equals its value)
        heads += [getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)][:1]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def find_targets(model: nn.Module, config) -> list[str]:
    """Qualified names of the modules ``config`` selects, in model order.

    Names are matched as logical names (wrappers' ``base_layer`` segments dropped, see the
    module docstring); the names returned are the real ones, for ``model.get_submodule``.
    Adapter internals are never selected (see ``candidate_names``). Raises ``ValueError``
    listing the nearest existing names when nothing matches.
    """
    modules = dict(model.named_modules())
    names = candidate_names(model)  # {real name: logical name}
    targets = config.target_modules
    if not targets and getattr(config, "target_parameters", None):
        return []  # LoRA on parameters alone: no module is adapted as a whole
    if targets is None:
        nearest, _ = nearest_names([], _suggestion_pool(names, modules))
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        why = f"there is no default for model_type {model_type!r}" if model_type else "the model names no model_type"
        raise ValueError(
            f"{type(config).__name__}.target_modules is None and {why} (peft's per-architecture choices); "
            f"give the names of the modules to adapt, e.g. {nearest}, or 'all-linear'"
        )
    never_called = attention_out_projections(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        selected = all_linear_names(model, getattr(config, "task_type", None))
    else:
        selected = [n for n, logical in names.items() if name_matches(logical, targets)]

    # Each filter in turn; the error names only the filters that removed a match.
    applied: list[str] = []

    def narrow(selected: list[str], attr: str, keep) -> list[str]:
        kept = [n for n in selected if keep(names[n])]
        removed = [names[n] for n in selected if n not in kept]
        if removed:
            more = f" and {len(removed) - 3} more" if len(removed) > 3 else ""
            applied.append(f"{attr}={getattr(config, attr)!r}, which removed {removed[:3]}{more}")
        return kept

    saved = getattr(config, "modules_to_save", None)
    selected = narrow(selected, "modules_to_save", lambda n: not inside_trained_whole(n, saved))
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        _warn_unmatched_exclusions(exclude, list(names.values()))
        selected = narrow(selected, "exclude_modules", lambda n: not name_matches(n, exclude))
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None and layers != []:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        pattern = getattr(config, "layers_pattern", None)
        # A name given in full is taken as meant, whatever its layer (peft does the same, so
        # its checkpoints of such configs hold that module's adapter).
        named_in_full = set(targets) if not isinstance(targets, str) else set()
        unnumbered = [names[n] for n in selected if layer_index(names[n], pattern) is None and n not in named_in_full]
        selected = narrow(selected, "layers_to_transform",
                          lambda n: layer_index(n, pattern) in wanted or n in named_in_full)
        if not selected and applied and unnumbered:
            applied[-1] += layer_pattern_hint(unnumbered, pattern)

    selected = _without_uncalled(selected, never_called, names, targets, model)
    if not selected and getattr(config, "target_parameters", None):
        # Parameters are adapted (and checked) all the same; peft writes such configs itself (a
        # regex on a mixture of experts: fused_experts.py), so this is said, not refused.
        warnings.warn(f"{no_match_message(targets, names, modules, type(model).__name__, applied)} Only "
                      f"target_parameters={config.target_parameters} are adapted", stacklevel=4)
        return []
    if not selected:
        raise ValueError(no_match_message(targets, names, modules, type(model).__name__, applied))
    _check_registered_once(model, selected)
    return selected


def _warn_unmatched_exclusions(exclude: list[str] | str, names: list[str]) -> None:
    """Warn of ``exclude_modules`` entries that match no module (a misspelt one excludes nothing:
    the module meant stays adapted), naming the nearest real names; peft warns too."""
    entries = [exclude] if isinstance(exclude, str) else exclude  # (a string is one regex)
    unmatched = [e for e in entries if not any(name_matches(n, e if isinstance(exclude, str) else [e]) for n in names)]
    if unmatched:
        nearest, _ = nearest_names([] if isinstance(exclude, str) else unmatched, names)
        warnings.warn(f"exclude_modules names {unmatched}, which match no module and exclude nothing (the module "
                      f"meant stays adapted); nearest names, nearest first: {nearest}", stacklevel=5)


def all_linear_names(model: nn.Module, task_type=None) -> list[str]:
    """Real names of the modules 'all-linear' selects, in model order: every linear layer (also
    one wrapped already) but the output head and an nn.MultiheadAttention's out_proj, never called."""
    modules = dict(model.named_modules())
    heads, never_called = output_head_names(model, task_type), attention_out_projections(model)
    return [n for n in candidate_names(model) if is_linear_like(modules[n]) and n not in heads and n not in never_called]


def _check_registered_once(model: nn.Module, selected: list[str]) -> None:
    """A ValueError for a target registered in more than one place (``self.proj`` also put in a
    ModuleList): its wrapper would take its place in one parent only, and calls through the others
    would run the module without the adapter. A module reached by several names through one shared
    parent (a block reused across layers, as in ALBERT) is registered once: its wrapper replaces it
    for every name. (named_modules() lists such a module once.)"""
    aliases: dict[int, list[str]] = {}
    places: dict[int, set[tuple[int, str]]] = {}  # module -> the (parent, attribute) pairs holding it
    for name, module in model.named_modules(remove_duplicate=False):
        if name and logical_name(model, name):  # (not inside an adapter's own parts)
            parent, _, attribute = name.rpartition(".")
            aliases.setdefault(id(module), []).append(name)
            places.setdefault(id(module), set()).add((id(model.get_submodule(parent)), attribute))
    for name in selected:
        module = model.get_submodule(name)
        others = [a for a in aliases.get(id(module), []) if a != name]
        if len(places.get(id(module), ())) > 1:
            raise ValueError(
                f"target {name!r} is one module registered under several names (also {others[:3]}); its adapter "
                f"would take its place under {name!r} alone, and calls through the others would skip the adapter. "
                "Register the module once (keep the other references out of the module tree), or target other modules"
            )


def _without_uncalled(selected: list[str], never_called: dict[str, str], names: dict[str, str], targets,
                      model: nn.Module) -> list[str]:
    """``selected`` without the out_proj of an nn.MultiheadAttention (``attention_out_projections``),
    with a warning: a suffix or a regex may reach one beside the linear layers it is meant for
    (CLIP's ``out_proj``), and peft's 'all-linear' lists them in the configs it saves. When
    nothing else is left, an error."""
    hit = [n for n in selected if n in never_called]
    if not hit:
        return selected
    kept = [n for n in selected if n not in never_called]
    attention = logical_name(model, never_called[hit[0]])
    why = (f"nn.MultiheadAttention reads its out_proj's weight and bias directly and never calls it, so an adapter "
           f"there would never run; LoRA can adapt the attention module itself (target {attention!r}: its in_proj and "
           "out_proj, as in peft)")
    if not kept:
        raise ValueError(f"{names[hit[0]]!r} is the out_proj of the nn.MultiheadAttention {attention!r}: {why}. "
                         "Leave it out of target_modules")
    warnings.warn(f"target_modules={targets!r} also matched {[names[n] for n in hit]}, left out: {why}", stacklevel=4)
    return kept


def attention_out_projections(model: nn.Module) -> dict[str, str]:
    """``{out_proj's name: its attention's name}`` for every ``nn.MultiheadAttention``. Its forward
    reads ``out_proj.weight`` and ``.bias`` itself (``F.multi_head_attention_forward``) and never
    calls the module, so a wrapper there would never run: 'all-linear' leaves these out, other
    selections leave them out with a warning, and selecting nothing else is an error."""
    return {join_name(name, "out_proj"): name for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)}


def candidate_names(model: nn.Module) -> dict[str, str]:
    """``{real name: logical name}`` of the modules an adapter may target, in model order.

    Adapter internals (a wrapper's ``lora_A``, ``lora_dropout``, ... and all below them) have no
    logical name and are left out. So is a wrapped module: its logical name is its wrapper's,
    and the wrapper (outermost, first in model order) stands for it. Modules *inside* a wrapped
    module stay: LoRA on ``dense`` inside a bottleneck-wrapped ``output`` is fine.
    """
    names: dict[str, str] = {}
    seen: set[str] = set()
    for name, _ in model.named_modules():
        logical = logical_name(model, name)
        if not logical or logical in seen:
            continue
        seen.add(logical)
        names[name] = logical
    return names


def trained_whole(logical: str, modules_to_save) -> bool:
    """Whether ``modules_to_save`` selects the module named ``logical``. peft matches these by
    plain name suffix (``key.endswith``), so ``"classifier"`` also selects DistilBERT's
    ``pre_classifier``; so do we, so that checkpoints line up."""
    return any(logical.endswith(m) for m in modules_to_save or [])


def inside_trained_whole(logical: str, modules_to_save) -> bool:
    """Whether the module, or one around it, is trained whole: adapters never go there."""
    parts = logical.split(".")
    return any(trained_whole(".".join(parts[:i]), modules_to_save) for i in range(1, len(parts) + 1))


def no_match_message(
    targets, names: dict[str, str], modules: dict[str, nn.Module], model_name: str, filters: Sequence[str] = ()
) -> str:
    """Why ``targets`` selected nothing, with the nearest linear layers by name (adapter internals
    never appear: ``names`` are logical names of candidates)."""
    if isinstance(targets, str):
        # A regex: compare its last name-like piece (".*qurey" -> "qurey") with the layers' leaf names.
        wanted = [re.sub(r"\W", "", re.split(r"\\?\.", targets)[-1])]
    else:
        wanted = [str(t) for t in targets]
    nearest, example = nearest_names(wanted, _suggestion_pool(names, modules))
    kind = "linear-layer" if any(is_linear_like(modules[n]) for n in names) else "module"
    after = f" (after applying {', '.join(filters)})" if filters else ""
    # A string of bare names ("q_proj", "q_proj,v_proj") is a regex that must match a whole name.
    names_given = re.split(r"[,\s]+", targets.strip()) if isinstance(targets, str) else []
    as_list = (f" A string is a regex that must match a module's whole name: for names, give a list, "
               f"target_modules={names_given!r}." if names_given and all(re.fullmatch(r"[\w.]+", n) for n in names_given)
               else " A list entry matches a name exactly or as a dotted suffix; a string is a full regex match.")
    return (f"target_modules={targets!r} matched no module of {model_name}{after}. Nearest {kind} names, nearest "
            f"first: {nearest}, e.g. {example!r}." + as_list)


def _suggestion_pool(names: dict[str, str], modules: dict[str, nn.Module]) -> list[str]:
    """Logical names worth suggesting: the linear layers (what most methods adapt), else every module."""
    linear = [logical for real, logical in names.items() if is_linear_like(modules[real])]
    return linear or list(names.values())


def nearest_names(wanted: Sequence[str], names: Sequence[str], limit: int = 10) -> tuple[list[str], str]:
    """Suffixes of ``names`` nearest to the ``wanted`` entries (difflib ratio), nearest first,
    and the full name of the nearest one.

    Each name is compared by its last as many dotted segments as the wanted entry has (a
    ``"q_proj"`` with ``"q_lin"``, an ``"output.dens"`` with ``"output.dense"``), widened so
    that a suggestion never starts at a layer index (``"layer.0.output.dense"``, not
    ``"0.output.dense"``). With nothing wanted: the leaf names in model order.
    """
    best: dict[str, tuple[float, str]] = {}  # suggested suffix -> (score, a full name ending in it)
    for name in names:
        parts = name.split(".")
        for want in wanted or [""]:
            start = max(len(parts) - want.count(".") - 1, 0)
            while start > 0 and parts[start].isdigit():
                start -= 1
            suffix = ".".join(parts[start:])
            score = difflib.SequenceMatcher(None, want, suffix).ratio() if want else 0.0
            if suffix not in best or score > best[suffix][0]:
                best[suffix] = (score, name)
    ranked = sorted(best, key=lambda suffix: -best[suffix][0])  # stable: model order among equals
    return ranked[:limit], (best[ranked[0]][1] if ranked else "")

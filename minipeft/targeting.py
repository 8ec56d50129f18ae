"""Which modules of a model a config selects, and the error when it selects none.

Matching rules (the same as ``peft``):

* ``target_modules`` as a list: a module is selected when its qualified name equals an entry
  or ends with ``"." + entry``; ``"q_lin"`` selects ``distilbert.transformer.layer.0.attention.q_lin``.
* ``target_modules`` as a string: a full regular-expression match on the qualified name;
  the special string ``"all-linear"`` selects every linear layer except the model's output
  head.
* ``exclude_modules`` uses the same rules and wins over ``target_modules``.
* ``layers_to_transform`` keeps only matches inside the listed layer indices, where the
  index is the number after ``layers_pattern`` (``"layers"``, ``"h"``, ...) in the name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

ALL_LINEAR = "all-linear"
# Names transformers gives to classification heads (peft checks the same ones).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


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
    get_base_layer = getattr(module, "get_base_layer", None)
    if callable(get_base_layer):
        module = get_base_layer()
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


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
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                return int(match.group(1))
        return None
    # Without a pattern take the first number that follows a named segment.
    match = re.match(r".*?\.[^.]*\.(\d+)\.", name) or re.match(r"[^.]*\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def output_head_names(model: nn.Module, task_type=None) -> set[str]:
    """Linear layers that 'all-linear' must leave alone: the LM head, or a classifier head."""
    heads = []
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output = get_output_embeddings() if callable(get_output_embeddings) else None
    if output is not None:
        heads.append(output)
    elif str(getattr(task_type, "value", task_type)) == "SEQ_CLS":
        heads += [getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)][:1]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def find_targets(model: nn.Module, config, skip: Iterable[str] = (), skip_exact: Iterable[str] = ()) -> list[str]:
    """Qualified names of the modules ``config`` selects, in model order.

    ``skip`` holds names that must never be targeted, nor anything below them (adapter
    internals); ``skip_exact`` names that must not be targeted themselves (modules already
    wrapped). Raises ``ValueError`` naming the closest existing modules when nothing matches.
    """
    skip, skip_exact = tuple(skip), set(skip_exact)
    candidates = [
        name
        for name, _ in model.named_modules()
        if name and name not in skip_exact and not is_under(name, skip)
    ]
    targets = config.target_modules
    if targets is None:
        raise ValueError(
            f"{type(config).__name__}.target_modules is None; give the names of the modules to adapt, "
            f"e.g. {sorted({n.rsplit('.', 1)[-1] for n in candidates})[:8]}, or 'all-linear'"
        )
    modules = dict(model.named_modules())
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, getattr(config, "task_type", None))
        selected = [n for n in candidates if is_linear_like(modules[n]) and n not in heads]
    else:
        selected = [n for n in candidates if name_matches(n, targets)]
    selected = [n for n in selected if not _is_saved_module(n, getattr(config, "modules_to_save", None))]

    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        selected = [n for n in selected if not name_matches(n, exclude)]

    layers = getattr(config, "layers_to_transform", None)
    if layers is not None and layers != []:
        layers = {layers} if isinstance(layers, int) else set(layers)
        pattern = getattr(config, "layers_pattern", None)
        selected = [n for n in selected if layer_index(n, pattern) in layers]

    if not selected:
        raise ValueError(no_match_message(targets, candidates, type(model).__name__, config))
    return selected


def _is_saved_module(name: str, modules_to_save) -> bool:
    """Adapters never go inside a module that is trained whole (``modules_to_save``)."""
    if not modules_to_save:
        return False
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def no_match_message(targets, candidates: list[str], model_name: str, config=None) -> str:
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = []
    for want in wanted:
        leaf = want.rsplit(".", 1)[-1]
        close += difflib.get_close_matches(leaf, leaf_names, n=5, cutoff=0.3)
    close = list(dict.fromkeys(close)) or leaf_names[:10]
    example = next((n for n in candidates if n.rsplit(".", 1)[-1] in close), candidates[0] if candidates else "")
    filters = []
    for attr in ("exclude_modules", "layers_to_transform", "modules_to_save"):
        if config is not None and getattr(config, attr, None):
            filters.append(f"{attr}={getattr(config, attr)!r}")
    after = f" (after applying {', '.join(filters)})" if filters else ""
    return (
        f"target_modules={targets!r} matched no module of {model_name}{after}. "
        f"Closest module names that exist: {close}. Names match exactly or as a dotted suffix, "
        f"e.g. {example!r}; a string is a full regex match."
    )

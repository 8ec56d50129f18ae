"""LoRA on a transformers-5 mixture of experts, from names written for per-expert layers.

transformers 4 built each expert of an MoE layer as three ``nn.Linear`` (Qwen-MoE's
``gate_proj``, ``up_proj``, ``down_proj``; Mixtral's ``w1``, ``w3``, ``w2``) and the router as one
more (``gate``). transformers 5 fuses them: a layer's experts are two 3-D parameters of one module,

    experts.gate_up_proj  (E, 2 * inter, d)   the gate and up projections of every expert, stacked
    experts.down_proj     (E, d, inter)

and the router is a module of its own whose ``weight`` (E, d) is no ``nn.Linear``'s. A config
written for the old layout (every LoRA recipe for these models), or ``"all-linear"``, would then
adapt the attention alone and miss the experts without a word. peft converts such a config when
it adds the adapter; minipeft converts it the same way, so both adapt the same parameters and
their checkpoints cross:

* a target naming an expert projection becomes a ``target_parameters`` entry for the fused
  parameter (``gate_proj``, ``up_proj`` -> ``gate_up_proj``; ``down_proj`` -> ``down_proj``; the
  router's ``gate`` -> ``gate.weight``). It no longer selects modules, not even a dense layer's
  ``nn.Linear`` of that name (peft's rule, kept so that both adapt the same);
* the two halves of ``gate_up_proj`` go together: naming one alone is refused;
* with both, the fused parameter gets rank ``2 r`` and alpha ``2 alpha`` (``rank_pattern``,
  ``alpha_pattern``): each half keeps rank ``r`` and the scaling ``alpha / r``;
* ``"all-linear"`` and a regex are first resolved to the leaf names they select, with the old
  expert names that the fused parameters stand for.

The models: those whose ``config.model_type`` transformers 5 converts this way (the two families
below), and only when the model does hold fused experts (under transformers 4 nothing changes).
The converted fields are what the adapter's config records, as peft's does.
"""

from __future__ import annotations

import re

from torch import nn

from ..targeting import ALL_LINEAR, all_linear_names
from .architecture_targets import model_type

# Per family: the old name of each projection -> the parameter that holds it now, and the pair
# fused into gate_up_proj (in the order of its rows).
RENAMED = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
FUSED_PAIR = {"mixtral": ("w1", "w3"), "qwen2_moe": ("gate_proj", "up_proj")}
FUSED = "gate_up_proj"

# transformers 5's model types of each family: those peft converts (its list from transformers lacks
# qwen2_moe itself, whose experts peft 0.21 leaves as they are, so minipeft does too).
FAMILY = {
    **dict.fromkeys(["mixtral", "minimax", "minimax_m2"], "mixtral"),
    **dict.fromkeys([
        "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text",
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "Dots3NoteTextModel", "afmoe", "ernie4_5_moe",
        "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "beam",
        "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "UnlimitedOcrTextModel",
    ], "qwen2_moe"),
}


def convert_expert_targets(model: nn.Module, config) -> None:
    """Rewrite LoRA ``config`` in place for ``model``'s fused experts (module docstring); a model
    without them is left as it is, and so is a list of targets naming none of the old names."""
    family = FAMILY.get(model_type(model))
    targets = config.target_modules
    if family is None or targets is None or not any(n.endswith("." + FUSED) for n, _ in model.named_parameters()):
        return
    renamed, pair = RENAMED[family], FUSED_PAIR[family]
    given_as_string = isinstance(targets, str)
    if given_as_string:
        # (peft's rule: the string becomes the list of these names for good, a regex of one layer's
        # modules thus selecting them in every layer; kept, so that a saved config adapts the same.)
        targets = _leaf_names(model, config, renamed)
        if not targets:
            return  # nothing matched: find_targets says so
    kept, parameters, halves = [], list(config.target_parameters or []), set()
    for target in targets:
        old = next((old for old in renamed if target == old or target.endswith("." + old)), None)
        if old is None:
            kept.append(target)
        else:
            parameters.append(renamed[old])
            halves |= {old} & set(pair)
    if len(kept) == len(targets) and not given_as_string:
        return
    if len(halves) == 1:
        (given,), (missing,) = halves, set(pair) - halves
        raise ValueError(
            f"target_modules names {given!r} but not {missing!r}: in {type(model).__name__} (transformers 5) both are "
            f"one parameter, {FUSED}, which LoRA adapts whole. Name both, or neither (peft refuses it too)"
        )
    if halves:  # each half keeps rank r and alpha / r (peft's patterns, by the same key)
        key = rf".*\.{re.escape(FUSED)}"
        config.rank_pattern = {**config.rank_pattern, key: config.r * 2}
        config.alpha_pattern = {**config.alpha_pattern, key: config.lora_alpha * 2}
    config.target_modules = sorted(set(kept))
    config.target_parameters = sorted(set(parameters))

    from .lora_parameter import check_config  # late: lora_parameter builds on lora, which imports this file

    check_config(config)  # what LoRA on a parameter refuses (dropout, DoRA, ...)


def _leaf_names(model: nn.Module, config, renamed: dict[str, str]) -> list[str]:
    """The last names of what a string ``target_modules`` selects: 'all-linear''s linear layers and
    every old expert name; a regex's matching modules and parameters, and each old expert name
    whose place beside the parameter that holds it now (``<experts>.<old name>``) it matches."""
    if config.target_modules.lower() == ALL_LINEAR:
        return sorted({name.rsplit(".", 1)[-1] for name in all_linear_names(model, config.task_type)} | set(renamed))
    pattern = re.compile(config.target_modules)
    parameters = [name for name, _ in model.named_parameters()]
    names = [name for name, _ in model.named_modules()] + parameters
    leaves = {name.rsplit(".", 1)[-1] for name in names if pattern.fullmatch(name)}
    for old, new in renamed.items():
        holders = {p.rpartition(".")[0] for p in parameters if p.rpartition(".")[2] == new}
        if any(pattern.fullmatch(f"{holder}.{old}") for holder in holders):
            leaves.add(old)
    return sorted(leaves)

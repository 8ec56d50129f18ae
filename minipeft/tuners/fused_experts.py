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
  ``alpha_pattern``): each half keeps rank ``r`` and the scaling ``alpha / r``. Under rsLoRA the
  scaling is ``alpha / sqrt(r)``, so alpha takes ``sqrt(2)``, not 2 (peft 0.21 doubles it there
  too, which makes the update sqrt(2) times larger than the checkpoint's);
* ``"all-linear"`` and a regex are first resolved to the leaf names they select, with the old
  expert names that the fused parameters stand for.

The models: those whose ``config.model_type`` transformers 5 converts this way (the two families
below), and only when the model does hold fused experts (under transformers 4 nothing changes).
The converted fields are what the adapter's config records, as peft's does.

A checkpoint saved under transformers 4 holds one LoRA pair per expert and projection. It loads
into the fused layout (``fuse_per_expert_checkpoint``), as peft loads it: for expert e, the gate
and up halves stack into one pair of rank 2 r,

    A_e = [A_gate_e; A_up_e]   (2 r, d)        B_e = [[B_gate_e, 0], [0, B_up_e]]   (2 inter, 2 r)

so that B_e A_e = [B_gate_e A_gate_e; B_up_e A_up_e], each half's own update, under the same
scaling (2 alpha / 2 r = alpha / r; under rsLoRA sqrt(2) alpha / sqrt(2 r)); the experts' pairs are then laid out as ``lora_parameter.py``
stores them. Mixtral's MoE block was also renamed (``block_sparse_moe`` -> ``mlp``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
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
RENAMED_BLOCKS = {"mixtral": (".block_sparse_moe.", ".mlp.")}  # transformers 4's name -> 5's, in every key

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
    if halves:  # each half keeps rank r and its scaling (peft's patterns, by the same key)
        key = rf".*\.{re.escape(FUSED)}"
        config.rank_pattern = {**config.rank_pattern, key: config.r * 2}
        alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)  # s = alpha / sqrt(r) under rsLoRA
        config.alpha_pattern = {**config.alpha_pattern, key: alpha}
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


# -- checkpoints saved under transformers 4 -------------------------------------------------------
# "<experts>.<expert index>.<old projection name>.lora_A.weight" (or lora_B)
PER_EXPERT_KEY = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<old>[^.]+)\.(?P<factor>lora_[AB])\.weight")


def fuse_per_expert_checkpoint(model: nn.Module, state_dict: dict, expected_keys: dict[str, str]) -> dict:
    """A checkpoint of per-expert LoRA layers (transformers 4) keyed and shaped as ``model``'s
    fused experts hold it (module docstring); any other checkpoint, or model, as it is.

    ``expected_keys``: checkpoint key -> model key of the adapter being loaded; each fused pair
    takes the key the adapter saves it under (which depends on the parameters it adapts).
    """
    family = FAMILY.get(model_type(model))
    if family is None:
        return state_dict
    if family in RENAMED_BLOCKS:  # (also where only the router is adapted)
        old_block, new_block = RENAMED_BLOCKS[family]
        state_dict = {k.replace(old_block, new_block): v for k, v in state_dict.items()}
    if not any(PER_EXPERT_KEY.fullmatch(k) for k in state_dict):
        return state_dict
    fused_keys = _fused_lora_keys(model, expected_keys)
    renamed, pair = RENAMED[family], FUSED_PAIR[family]
    # (experts path, fused parameter) -> old name -> expert -> factor -> tensor
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    out = {}
    for key, tensor in state_dict.items():
        match = PER_EXPERT_KEY.fullmatch(key)
        parameter = renamed.get(match["old"]) if match else None
        if parameter is None or (match["experts"], parameter) not in fused_keys:
            out[key] = tensor  # not a per-expert layer of this model: the key check judges it
            continue
        groups[match["experts"], parameter][match["old"]][int(match["expert"])][match["factor"]] = tensor
    for (experts, parameter), by_name in groups.items():
        names = list(pair) if parameter == FUSED else sorted(by_name)
        key_A, key_B, num_experts = fused_keys[experts, parameter]
        factors = [_stacked(by_name, name, experts, num_experts) for name in names]  # [(A (E, r, in), B (E, out, r))]
        out[key_A], out[key_B] = _fused_pair(factors)
    return out


def dense_layers_hint(model: nn.Module, unexpected: list[str]) -> str | None:
    """Why a transformers-4 checkpoint's pairs for layers named as the experts' projections but
    outside them (dense MLP layers, shared experts: ``mlp.gate_proj``) find no adapter: converted,
    the config adapts the fused experts instead (peft's rule). None where no key is such a pair."""
    family = FAMILY.get(model_type(model))
    if family is None:
        return None
    dense = [k for k in unexpected if k.rpartition(".lora_")[0].rpartition(".")[2] in RENAMED[family]
             and not PER_EXPERT_KEY.fullmatch(k)]
    if not dense:
        return None
    return (f"These are pairs of layers named as the experts' projections but outside the experts ({dense[0]}, "
            "...): dense MLP layers or shared experts, which transformers 4 adapted with the experts. Under "
            "transformers 5 such a config adapts the fused experts in their place and leaves these layers alone, as "
            "peft converts it; peft then drops their tensors without a word, which changes the model, and minipeft "
            "refuses. Load this adapter under transformers 4")


def _stacked(by_name: dict, name: str, experts: str, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection's factors over the experts: A (E, r, in), B (E, out, r); every one must be there."""
    by_expert = by_name.get(name, {})
    absent = [e for e in range(num_experts) if set(by_expert.get(e, {})) != {"lora_A", "lora_B"}]
    extra = sorted(e for e in by_expert if e >= num_experts)
    if absent or extra:
        what = f"lacks the {name} pair of expert(s) {absent}" if absent else \
            f"has {name} pairs of expert(s) {extra}, beyond the model's {num_experts}"
        raise ValueError(f"this per-expert (transformers 4) checkpoint {what} at {experts} (as transformers 5 names "
                         f"it): every one of the {num_experts} experts' {name} is needed to build the fused experts")
    return (torch.stack([by_expert[e]["lora_A"] for e in range(num_experts)]),
            torch.stack([by_expert[e]["lora_B"] for e in range(num_experts)]))


def _fused_pair(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A`` (E R, in) and ``lora_B`` (out, R E) of one fused parameter from each of its
    projections' stacked factors (gate and up: rows stacked, B block-diagonal; R = their ranks' sum)."""
    A = torch.cat([a for a, _ in factors], dim=1)  # (E, R, in): A_e = [A_gate_e; A_up_e]
    B = torch.stack([torch.block_diag(*(b[e] for _, b in factors)) for e in range(A.shape[0])])  # (E, out, R)
    # lora_parameter.py's layout: A's rows expert by expert, B's columns interleaved (column j E + e is B_e's j)
    return A.flatten(0, 1), B.permute(1, 2, 0).flatten(1)


def _fused_lora_keys(model: nn.Module, expected_keys: dict[str, str]) -> dict[tuple[str, str], tuple[str, str, int]]:
    """``{(experts path, parameter name): (lora_A key, lora_B key, number of experts)}`` for the
    adapter's LoRA on fused expert parameters, the path as the checkpoint names the module (no
    wrapper segments)."""
    from .lora_parameter import LoraParameter  # late: lora_parameter builds on lora, which imports this file

    found: dict[tuple[str, str], dict[str, str | int]] = defaultdict(dict)
    for ckpt_key, model_key in expected_keys.items():
        for factor in ("lora_A", "lora_B"):
            head, dot_factor, _ = model_key.rpartition(f".{factor}.")
            if not dot_factor:
                continue
            layer = model.get_submodule(head)
            if isinstance(layer, LoraParameter):
                path = ckpt_key.rpartition(f".{factor}.")[0]
                while path.endswith(".base_layer"):
                    path = path.removesuffix(".base_layer")
                found[path, layer.parameter_name].update({factor: ckpt_key, "experts": layer.num_experts})
    return {place: (keys["lora_A"], keys["lora_B"], keys["experts"]) for place, keys in found.items()}


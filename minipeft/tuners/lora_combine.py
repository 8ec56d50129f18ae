"""Combining LoRA adapters into a new one (``PeftModel.add_weighted_adapter``, peft's signature).

In every layer that holds a source adapter, the new adapter's update is the weighted sum of
the sources' updates, with weights ``w_i`` that may be negative:

    delta = sum_i w_i s_i B_i A_i        (s_i: source i's scaling; 0 where it is absent)

stored as one pair (A, B) with scaling 1 (``r = lora_alpha`` = the new rank, no rsLoRA):

    cat:     exact, rank = the sum of the sources' ranks
    svd:     the best rank-k approximation of delta (k = ``svd_rank``, default the largest rank)
    linear:  A and B mixed separately: cheap, approximate, sources of one rank only

A single source is always combined "linear", which is exact for one.

The new adapter goes straight into the ``LoraLayer`` wrappers that hold its sources, not to
wherever its config's names would lead: where another method's wrapper holds a LoRA wrapper
(stacked adapters) a name leads to the outer wrapper. Its config names its layers as the
model without wrappers does (logical names), so a saved combination reloads on the plain model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..targeting import find_targets, logical_name
from .base import ModulesToSaveWrapper
from .lora import LoraConfig, LoraLayer

COMBINATION_TYPES = ("svd", "linear", "cat")


def add_weighted_adapter(
    model: nn.Module,
    sources: list[tuple[str, PeftConfig]],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> LoraConfig:
    """Add LoRA adapter ``adapter_name`` to ``model`` (in place) as the weighted sum of the
    adapters ``sources`` (``(name, config)`` pairs of adapters the model holds) and return its
    config, for the caller to keep. The new adapter is inactive and frozen, like any second
    adapter. A module trained whole (``modules_to_save``) comes along as the copy of the one
    source that trains it. On error the model is left as it was."""
    _check_arguments(sources, weights, svd_clamp)
    combination_type, rank = combined_rank(sources, combination_type, svd_rank)
    names = [name for name, _ in sources]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and any(a in m.r for a in names)}
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    heads = [(wrapper, wrapper.copy_of(names, n)) for n, wrapper in wrappers]  # an error if two sources train one
    heads = [(wrapper, source) for wrapper, source in heads if source is not None]
    # Every new factor is computed before the model changes.
    factors = {
        n: combine(
            [(*layer.lora_factors(a), w * layer.scaling[a]) for a, w in zip(names, weights) if a in layer.r],
            combination_type, rank, svd_clamp, svd_full_matrices, svd_driver,
        )
        for n, layer in layers.items()
    }
    keys = {n: logical_name(model, n) or n for n in layers}
    configs = [config for _, config in sources]
    # The factors are set below, so the init only matters for not rewriting the base weights
    # a second time (a PiSSA/OLoRA source's init would decompose the residuals again).
    config = dataclasses.replace(
        copy.deepcopy(configs[0]), r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        init_lora_weights=True,
        modules_to_save=list(dict.fromkeys(m for c in configs for m in c.modules_to_save or [])) or None,
    )
    config = _with_targets(model, config, [c.target_modules for c in configs], list(keys.values()))

    changed = []
    try:
        for n, layer in layers.items():
            changed.append(layer)
            layer.update_layer(adapter_name, config, keys[n])
            layer.set_lora_factors(adapter_name, *factors[n])
        for wrapper, source in heads:
            changed.append(wrapper)
            wrapper.update_layer(adapter_name)
            copies = wrapper.modules_to_save
            copies[adapter_name].load_state_dict(copies[source].state_dict())
    except BaseException:
        for layer in changed:
            layer.delete_adapter(adapter_name)
        raise
    for layer in changed:
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(False)
    return config


def _check_arguments(sources: list[tuple[str, PeftConfig]], weights: list[float], svd_clamp: float | None) -> None:
    if not sources or len(weights) != len(sources):
        raise ValueError(f"give one weight per adapter: got adapters {[n for n, _ in sources]} and weights {weights}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers (negative subtracts an adapter), got {bad} in {weights}")
    other = {name: config.peft_type.value for name, config in sources if not isinstance(config, LoraConfig)}
    if other:
        raise TypeError(f"add_weighted_adapter combines LoRA adapters only; {other} are not LoRA")
    dora = [name for name, config in sources if config.use_dora]
    if dora:
        raise ValueError(
            f"cannot combine DoRA adapters {dora}: each scales its rows by a learned magnitude, so its update is "
            "not s * B A and a weighted sum of updates is no DoRA adapter"
        )
    # peft 0.21 combines only the factors and leaves the combined adapter's lora_B bias at its
    # init (zero), silently dropping every source's s_i b_i; minipeft refuses rather than do that.
    biased = [name for name, config in sources if config.lora_bias]
    if biased:
        raise ValueError(
            f"cannot combine adapters {biased} trained with lora_bias=True: the combinations act on the updates "
            "s_i B_i A_i, and peft's add_weighted_adapter leaves the biases s_i b_i out (its combined adapter has a "
            "zero bias), so the result would not compute what its sources do. Combine adapters trained with "
            "lora_bias=False, or fold these into the base model with merge_and_unload(adapter_names=[...]), which "
            "adds each one's bias exactly"
        )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real) or not 0 < svd_clamp <= 1
    ):
        raise ValueError(
            f"svd_clamp is the quantile of the new factors' entries to clip them to, a number in (0, 1] "
            f"(e.g. 0.99), or None not to clip; got {svd_clamp!r}"
        )


def combined_rank(
    sources: list[tuple[str, LoraConfig]], combination_type: str, svd_rank: int | None
) -> tuple[str, int]:
    """peft's rules for a combined adapter: the combination to use (a single source is always
    combined "linear", which is exact for one) and the new rank. A source counts with its largest
    rank (``r`` or a ``rank_pattern`` value): the new adapter has one rank everywhere, and layers
    that need fewer are zero-padded."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type={combination_type!r} is not supported; minipeft implements {list(COMBINATION_TYPES)} "
            "(not peft's ties, dare_linear, dare_ties, magnitude_prune or their _svd variants)"
        )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    ranks = [max([config.r, *config.rank_pattern.values()]) for _, config in sources]
    if len(sources) == 1:
        return "linear", ranks[0]
    if combination_type == "linear":
        if len(set(ranks)) > 1:
            by_name = {name: rank for (name, _), rank in zip(sources, ranks)}
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got {by_name}; use 'cat' or 'svd'")
        return "linear", ranks[0]
    if combination_type == "cat":
        return "cat", sum(ranks)
    return "svd", svd_rank or max(ranks)


def combine(
    terms: list[tuple[torch.Tensor, torch.Tensor, float]],
    combination_type: str,
    rank: int,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair A (rank, n), B (m, rank) from the terms ``(A_i, B_i, c_i)`` of one layer, where
    ``c_i = weight_i * scaling_i``, so that the target update is ``sum_i c_i B_i A_i`` (m, n):

        cat:     A = [c_1 A_1; c_2 A_2; ...],  B = [B_1, B_2, ...]       B A = sum_i c_i B_i A_i, exactly
        svd:     sum_i c_i B_i A_i = U S V^T,  B = U_k S_k,  A = V_k^T    the best rank-k approximation
                 (Eckart-Young); ``svd_clamp`` clips both to that quantile of their entries
        linear:  A = sum_i sign(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i
                 cheap but rough: B A also holds cross terms sqrt|c_i c_j| B_i A_j (i != j)

    The result is zero-padded up to ``rank`` (extra rows of A and columns of B), which leaves
    B A unchanged; the new adapter's scaling is 1.
    """
    terms = [(A.float(), B.float(), c) for A, B, c in terms]
    if combination_type == "cat":
        A = torch.cat([c * A for A, _, c in terms], dim=0)  # (sum r_i, n)
        B = torch.cat([B for _, B, _ in terms], dim=1)  # (m, sum r_i)
    elif combination_type == "svd":
        delta = sum(c * (B @ A) for A, B, c in terms)  # (m, n)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
        k = min(rank, S.numel())
        B, A = U[:, :k] * S[:k], Vh[:k]  # (m, k), (k, n)
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
            B, A = B.clamp(-high, high), A.clamp(-high, high)
    elif combination_type == "linear":
        terms = [(*_pad_rank(A, B, rank), c) for A, B, c in terms]  # equal shapes to add
        A = sum(math.copysign(math.sqrt(abs(c)), c) * A for A, _, c in terms)  # the sign goes on one side only
        B = sum(math.sqrt(abs(c)) * B for _, B, c in terms)
    else:
        raise ValueError(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    return _pad_rank(A, B, rank)


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - A.shape[0]
    return F.pad(A, (0, 0, 0, extra)), F.pad(B, (0, extra))


def _with_targets(model: nn.Module, config: LoraConfig, targets: list, layers: list[str]) -> LoraConfig:
    """``config`` with the sources' ``targets`` joined (as peft writes them) when that selects
    exactly ``layers`` (logical names of the layers holding a source), else with those layers by
    name (e.g. when the sources' layers_to_transform differ), so that the saved config reloads
    onto the layers it was trained on."""
    union = None
    if all(isinstance(t, list) for t in targets):
        union = sorted(set().union(*targets))
    elif all(isinstance(t, str) for t in targets):
        patterns = list(dict.fromkeys(targets))
        union = patterns[0] if len(patterns) == 1 else "|".join(f"({p})" for p in patterns)
    if union is not None:
        try:
            joined = dataclasses.replace(config, target_modules=union)
            if {logical_name(model, n) for n in find_targets(model, joined)} == set(layers):
                return joined
        except ValueError:  # the union makes an invalid config or selects nothing: use the names
            pass
    return dataclasses.replace(
        config, target_modules=layers, exclude_modules=None, layers_to_transform=None, layers_pattern=None
    )

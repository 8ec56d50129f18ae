"""Combining LoRA adapters into a new one (``PeftModel.add_weighted_adapter``, peft's signature).

In every layer that holds a source adapter, the new adapter's update combines the sources'
updates ``s_i B_i A_i`` with weights ``w_i`` that may be negative; it is stored as one pair (A, B)
with scaling 1 (``r = lora_alpha`` = the new rank, no rsLoRA). peft's combination types:

    cat:     exact: sum_i w_i s_i B_i A_i, rank = the sum of the sources' ranks
    svd:     the best rank-k approximation of that sum (k = ``svd_rank``, default the largest rank)
    linear:  A and B mixed separately: cheap, approximate, sources of one rank only

and the task-arithmetic merges of ``task_arithmetic.py`` (``ties``, ``dare_linear``,
``dare_ties``, ``magnitude_prune``, each needing a ``density``), applied where peft applies them:

    <merge>:      like linear, on the factors: the A_i are merged into A, the B_i into B
                  (sources of one rank only; the weights go in as for linear)
    <merge>_svd:  like svd, on the updates: the s_i B_i A_i are merged, then cut to rank k

A single source is always combined "linear", which is exact for one (and prunes nothing).

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
from . import combining, task_arithmetic
from .base import wide
from .lora import LoraConfig, LoraEmbedding, LoraLayer

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
# Merging the factors A, B entry by entry: the sources' factors must have one shape.
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Merging the updates s_i B_i A_i, then an SVD back to rank svd_rank ("svd": their plain weighted sum).
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


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
    density: float | None = None,
    majority_sign_method: str = "total",
) -> LoraConfig:
    """Add LoRA adapter ``adapter_name`` to ``model`` (in place) as the weighted combination of
    the adapters ``sources`` (``(name, config)`` pairs of adapters the model holds) and return its
    config, for the caller to keep. The new adapter is inactive and frozen, like any second
    adapter. A module trained whole (``modules_to_save``) comes along as the copy of the one
    source that trains it. On error the model is left as it was. The caller (``PeftModel``) has
    checked the names and ``weights`` (``check_weights``)."""
    _check_arguments(sources, svd_clamp)
    requested = combination_type
    combination_type, rank = resolve_combination(sources, combination_type, svd_rank)
    _check_merge_options(requested, density, majority_sign_method)
    names = [name for name, _ in sources]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and any(a in m.r for a in names)}
    grouped = [n for n, m in layers.items() if getattr(m.get_base_layer(), "groups", 1) > 1]
    if grouped:
        raise ValueError(f"cannot combine adapters on grouped convolutions {grouped[:3]}: their LoRA has no update of "
                         "the kernel's shape to add up (B is grouped, A is not); combine adapters that leave them out")
    if combination_type in FACTOR_TYPES and combination_type != "linear":  # "linear" zero-pads
        _check_one_rank_per_layer(layers, names, combination_type)
    heads = combining.trained_heads(model, names)
    keys = {n: logical_name(model, n) or n for n in layers}
    configs = [config for _, config in sources]
    # The factors are set below, so the init only matters for not rewriting the base weights
    # a second time (a PiSSA/OLoRA source's init would decompose the residuals again).
    config = dataclasses.replace(
        copy.deepcopy(configs[0]), r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        init_lora_weights=True, eva_config=None, loftq_config=None,
        modules_to_save=combining.saved_modules(configs),
    )
    config = _with_targets(model, config, [c.target_modules for c in configs], list(keys.values()))

    changed = []
    try:
        # peft's order: the new adapter (with its random init) goes into every layer first, then
        # each layer's factors are computed and set, so that under one torch.manual_seed the
        # dare types draw the masks peft draws (where the first source's init_lora_weights is
        # True or "gaussian": peft copies False too, whose init also draws B, shifting its draws).
        for n, layer in layers.items():
            if adapter_name in layer.r:
                continue  # added by the layer that holds this one (an attention's, to its out_proj)
            changed.append(layer)
            layer.add_adapter(adapter_name, config, keys[n])
        for wrapper, _ in heads:
            changed.append(wrapper)
            wrapper.add_adapter(adapter_name)
        combining.copy_trained_heads(heads, adapter_name)
        for layer in layers.values():
            terms = [(*layer.lora_factors(a), w, layer.scaling[a]) for a, w in zip(names, weights) if a in layer.r]
            factors = combine(
                terms, combination_type, rank, svd_clamp, svd_full_matrices, svd_driver,
                density=density, majority_sign_method=majority_sign_method, transposed=_update_transposed(layer),
            )
            layer.set_lora_factors(adapter_name, *factors)
    except BaseException:
        for layer in changed:
            layer.delete_adapter(adapter_name)
        raise
    for layer in changed:
        for p in layer.adapter_parameters(adapter_name):
            p.requires_grad_(False)
    return config


def check_weights(names: list[str], weights: list[float]) -> None:
    """One finite real weight per adapter to combine (LoRA's and (IA)^3's combinations alike)."""
    if not names or len(weights) != len(names):
        raise ValueError(f"give one weight per adapter: got adapters {list(names)} and weights {weights}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers (negative subtracts an adapter), got {bad} in {weights}")


def _check_arguments(sources: list[tuple[str, PeftConfig]], svd_clamp: float | None) -> None:
    """What the combination needs of its sources and options."""
    other = {name: config.peft_type.value for name, config in sources if not isinstance(config, LoraConfig)}
    if other:
        raise TypeError(f"add_weighted_adapter combines LoRA adapters, or (IA)^3 adapters, each kind only with its "
                        f"own; {other} are not LoRA")
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
    # Trained token rows are the tokens' new embeddings (values), not updates s B A, so no weighting
    # of updates applies to them. peft 0.21 copies the first source's config and gives the combined
    # adapter fresh rows copied from the table, silently dropping every source's trained rows.
    tokens = [name for name, config in sources if config.trainable_token_indices is not None]
    if tokens:
        raise ValueError(
            f"cannot combine adapters {tokens} trained with trainable_token_indices: their trained rows are the "
            "tokens' new embeddings, not low-rank updates s_i B_i A_i that a weighted sum could combine, and peft's "
            "add_weighted_adapter gives the combined adapter fresh copies of the table's rows (every source's trained "
            "rows lost), so the result would not compute what its sources do. Combine LoRA adapters trained without "
            "trainable_token_indices, or fold these into the base model with merge_and_unload(adapter_names=[...]), "
            "which writes each one's rows (the adapters must train disjoint tokens)"
        )
    # peft refuses these too. Their factors hold one A_e, B_e per expert (lora_parameter.py), which
    # the combinations here, written for one B A per layer, would mix across experts.
    on_parameters = [name for name, config in sources if config.target_parameters]
    if on_parameters:
        raise ValueError(
            f"cannot combine adapters {on_parameters} that use target_parameters (peft refuses them too); fold them "
            "into the base model with merge_and_unload(adapter_names=[...]), which adds each one's update exactly"
        )
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real) or not 0 < svd_clamp <= 1
    ):
        raise ValueError(
            f"svd_clamp is the quantile of the new factors' entries to clip them to, a number in (0, 1] "
            f"(e.g. 0.99), or None not to clip; got {svd_clamp!r}"
        )


def _check_merge_options(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    """``density`` and ``majority_sign_method`` are checked for the types that use them (as the
    type was asked for, also when a single source makes it "linear"); the others ignore them,
    as peft's do."""
    merge = _merge_of(combination_type)
    if merge is not None:
        task_arithmetic.check_options(merge, density, majority_sign_method, f"combination_type={combination_type!r}")


def _merge_of(combination_type: str) -> str | None:
    """The task-arithmetic merge a type applies ("linear": the plain weighted sum), or None for "cat"."""
    if combination_type == "cat":
        return None
    if combination_type == "svd":
        return "linear"
    return combination_type.removesuffix("_svd")


def resolve_combination(
    sources: list[tuple[str, LoraConfig]], combination_type: str, svd_rank: int | None
) -> tuple[str, int]:
    """``combination_type`` and ``svd_rank`` checked, then peft's rules for a combined adapter: the
    combination to use (a single source is always combined "linear", which is exact for one) and
    the new rank. A source counts with its largest rank (``r`` or a ``rank_pattern`` value): the
    new adapter has one rank everywhere, and layers that need fewer are zero-padded.

        linear, ties, dare_linear, dare_ties, magnitude_prune:  the sources' one rank
        cat:                                                    the sum of the ranks
        svd and the *_svd types:                                svd_rank, default the largest rank
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not supported; it is one of {list(COMBINATION_TYPES)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    ranks = [max([config.r, *config.rank_pattern.values()]) for _, config in sources]
    if len(sources) == 1:
        return "linear", ranks[0]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) > 1:
            by_name = {name: rank for (name, _), rank in zip(sources, ranks)}
            raise ValueError(
                f"combination_type={combination_type!r} needs adapters of one rank, got {by_name}: it mixes their A "
                f"and B factors entry by entry; use {_any_rank_alternatives(combination_type)}, which take any ranks"
            )
        return combination_type, ranks[0]
    if combination_type == "cat":
        return "cat", sum(ranks)
    return combination_type, svd_rank or max(ranks)


def _any_rank_alternatives(combination_type: str) -> str:
    if combination_type == "linear":
        return "'svd' or 'cat'"
    return f"{combination_type + '_svd'!r} (the same merge on the updates, then an SVD to svd_rank)"


def _check_one_rank_per_layer(layers: dict[str, LoraLayer], names: list[str], combination_type: str) -> None:
    """The sources of one rank overall may still differ in a layer (``rank_pattern``); pruning
    merges of the factors need equal shapes there too (zero-padding would change what a density
    keeps)."""
    for n, layer in layers.items():
        ranks = {a: layer.r[a] for a in names if a in layer.r}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"combination_type={combination_type!r} mixes the adapters' A and B factors entry by entry, so they "
                f"need one rank in every layer; in {n!r} their ranks are {ranks} (rank_pattern); "
                f"use {combination_type + '_svd'!r}"
            )


def _update_transposed(layer: LoraLayer) -> bool:
    """Whether the base stores the update as (B A)^T: an embedding's (num_embeddings, dim) table,
    GPT-2's Conv1D (in, out). peft merges the updates in that layout; the merges are entry by
    entry, so it only decides which of dare's random draws meets which entry."""
    return isinstance(layer, LoraEmbedding) or bool(getattr(layer, "fan_in_fan_out", False))


def combine(
    terms: list[tuple[torch.Tensor, torch.Tensor, float, float]],
    combination_type: str,
    rank: int,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    transposed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair A (rank, n), B (m, rank) from the terms ``(A_i, B_i, w_i, s_i)`` of one layer
    (factors, weight, scaling), with ``c_i = w_i s_i``:

        cat:     A = [c_1 A_1; c_2 A_2; ...],  B = [B_1, B_2, ...]       B A = sum_i c_i B_i A_i, exactly
        svd:     sum_i c_i B_i A_i = U S V^T,  B = U_k S_k,  A = V_k^T    the best rank-k approximation
                 (Eckart-Young); ``svd_clamp`` clips both to that quantile of their entries
        linear:  A = sum_i sign(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i
                 cheap but rough: B A also holds cross terms sign(c_j) sqrt|c_i c_j| B_i A_j (i != j)
        <merge>:      A = merge(A_i; sign(c_i) sqrt|c_i|),  B = merge(B_i; sqrt|c_i|)
        <merge>_svd:  merge(s_i B_i A_i; w_i) = U S V^T, then as svd

    with ``merge`` from ``task_arithmetic`` (``density``, ``majority_sign_method``; "svd" is the
    <merge>_svd of the plain weighted sum). ``transposed``: the base stores the update as
    (B A)^T, where peft merges it. The result is zero-padded up to ``rank`` (extra rows of A and
    columns of B), which leaves B A unchanged; the new adapter's scaling is 1.
    """
    terms = [(wide(A), wide(B), w, s) for A, B, w, s in terms]
    if combination_type == "cat":
        A = torch.cat([w * s * A for A, _, w, s in terms], dim=0)  # (sum r_i, n)
        B = torch.cat([B for _, B, _, _ in terms], dim=1)  # (m, sum r_i)
    elif combination_type in SVD_TYPES:
        delta = _merged_update(terms, _merge_of(combination_type), density, majority_sign_method, transposed)
        B, A = _truncated_svd(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
    else:  # FACTOR_TYPES, the rest of what resolve_combination accepts
        A, B = _merged_factors(terms, combination_type, density, majority_sign_method)
    return _pad_rank(A, B, rank)


def _merged_update(terms, merge: str, density, majority_sign_method: str, transposed: bool) -> torch.Tensor:
    """merge(s_i B_i A_i; w_i), (m, n): the sources' own updates are the task vectors, the
    user's weights weigh them (a pruning merge ranks each update by its scaled entries)."""
    updates = [s * (B @ A) for A, B, _, s in terms]  # (m, n) each
    if transposed:
        updates = [u.T for u in updates]  # a view: the entries peft's random draws meet, in its order
    delta = task_arithmetic.merge(merge, updates, [w for _, _, w, _ in terms], density, majority_sign_method)
    return delta.T if transposed else delta


def _truncated_svd(delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, driver: str | None):
    """B (m, k), A (k, n) with B A the best rank-k approximation of ``delta``, k = min(rank, min(m, n))."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())
    B, A = U[:, :k] * S[:k], Vh[:k]  # (m, k), (k, n)
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return B, A


def _merged_factors(terms, merge: str, density, majority_sign_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A = merge(A_i; sign(c_i) sqrt|c_i|), B = merge(B_i; sqrt|c_i|), as peft mixes factors: for
    "linear" B A = sum_i c_i B_i A_i plus cross terms; the sign goes on one side only. A's are
    merged before B's (the order of dare's random draws). "linear" zero-pads the factors of a
    layer whose sources' ranks differ (rank_pattern); the other merges are refused those earlier."""
    rank = max(A.shape[0] for A, _, _, _ in terms)
    terms = [(*_pad_rank(A, B, rank), w, s) for A, B, w, s in terms]  # equal shapes to stack
    roots = [math.sqrt(abs(w * s)) for _, _, w, s in terms]
    signed = [math.copysign(root, w * s) for root, (_, _, w, s) in zip(roots, terms)]
    A = task_arithmetic.merge(merge, [A for A, _, _, _ in terms], signed, density, majority_sign_method)
    B = task_arithmetic.merge(merge, [B for _, B, _, _ in terms], roots, density, majority_sign_method)
    return A, B


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - A.shape[0]
    return F.pad(A, (0, 0, 0, extra)), F.pad(B, (0, extra))


def _with_targets(model: nn.Module, config: LoraConfig, targets: list, layers: list[str]) -> LoraConfig:
    """``config`` with the sources' ``targets`` joined (as peft writes them) when that selects
    exactly ``layers`` (logical names of the layers holding a source), else with those layers by
    name (e.g. when the sources' layers_to_transform differ), so that the saved config reloads
    onto the layers it was trained on."""
    union = combining.joined_targets(targets)
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

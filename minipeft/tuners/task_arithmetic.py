"""Task arithmetic: merging several fine-tuned updates of one weight into a single update.

A *task vector* is what fine-tuning for one task added to a weight, tau_i = W_i - W_0; for a
LoRA adapter it is its update s_i B_i A_i, or each of its factors A_i, B_i taken alone. The plain
way to combine k of them is their weighted sum (Ilharco et al. 2023):

    tau = sum_i w_i tau_i

Summed like that the tasks interfere: the many small entries of one vector (mostly noise of its
fine-tuning) blur the few large ones of another, and where two vectors disagree in sign their
entries cancel. The merges here sparsify each tau_i first, and the TIES ones then settle the sign
of each entry before adding:

    magnitude_prune   keep each tau_i's largest entries (a fraction ``density`` of them by |value|)
                      and add as above
    ties              TIES-Merging: trim (magnitude prune), elect a sign for every entry, and
                      average only the entries that carry that sign (disjoint merge)
    dare_linear       DARE: drop each entry at random with probability 1 - density and scale the
                      survivors by 1 / density, so that E[pruned tau_i] = tau_i; then add
    dare_ties         DARE's random drop, then TIES' sign election and disjoint merge

Every function takes the k task vectors as a list of tensors of one shape (any shape: all work
entry by entry, except that magnitude pruning ranks all entries of one tensor together) and the
k weights as numbers, and returns one tensor of that shape.

The conventions are peft's (``peft.utils.merge_utils``), so that a merge here reproduces peft's:

* the sign is elected from the *unweighted* (pruned) vectors; the weights scale the entries that
  are then averaged. The TIES paper instead sums the vectors and scales the merged result by one
  factor lambda at the end.
* magnitude pruning keeps ``k = int(density * numel)`` entries, the product rounded down.
* ``density = 1`` prunes nothing (and draws no random numbers); a merge with density 1 is its
  unpruned counterpart (ties: sign election and disjoint merge alone).
* the random masks are ``torch.bernoulli`` draws from the global generator, one tensor at a time
  in list order, so that ``torch.manual_seed`` reproduces them.

References:
    P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal. "TIES-Merging: Resolving Interference
    When Merging Models." NeurIPS 2023. arXiv:2306.01708.
    L. Yu, B. Yu, H. Yu, F. Huang, Y. Li. "Language Models are Super Mario: Absorbing Abilities
    from Homologous Models as a Free Lunch" (DARE). ICML 2024. arXiv:2311.03099.
    G. Ilharco, M. T. Ribeiro, M. Wortsman, S. Gururangan, L. Schmidt, H. Hajishirzi, A. Farhadi.
    "Editing Models with Task Arithmetic." ICLR 2023. arXiv:2212.04089.
"""

from __future__ import annotations

import numbers

import torch

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING_MERGES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # these need a density
SIGN_ELECTING_MERGES = ("ties", "dare_ties")  # these use majority_sign_method
MAJORITY_SIGN_METHODS = ("total", "frequency")


# -- sparsifying one task vector ----------------------------------------------------------------
def prune_by_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim step: keep the k = int(density * numel) entries of largest |tau|, zero the rest.
    The ranking runs over all entries of the tensor at once, whatever its shape."""
    if density >= 1:
        return tau
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view(tau.shape)


def prune_at_random(tau: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop and rescale: keep each entry with probability p = density, independently,
    and divide the survivors by p, so that every entry keeps its expectation:

        E[m * tau / p] = p * tau / p = tau,    m ~ Bernoulli(p), one draw per entry
    """
    if density >= 1:
        return tau
    keep = torch.bernoulli(torch.full_like(tau, density))  # 1 with probability p, else 0
    return tau * keep / density


# -- combining the k (pruned) task vectors, stacked along a new dim 0: (k, ...) -----------------
def _per_vector(weights: list[float], stacked: torch.Tensor) -> torch.Tensor:
    """The k weights as a (k, 1, ..., 1) tensor that broadcasts over a stack of task vectors."""
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return w.view(-1, *[1] * (stacked.dim() - 1))


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election: +1 or -1 for every entry (shape ``stacked.shape[1:]``).

        total:      sign(sum_i tau_i)          the side holding more mass wins
        frequency:  sign(sum_i sign(tau_i))    the side more vectors are on wins

    A tie (including all zero) elects +1.
    """
    check_sign_method(method)
    score = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(stacked: torch.Tensor, weights: list[float], sign: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean of w_i tau_i over the vectors whose tau_i has
    the elected sign (a zero, i.e. pruned, entry never agrees); 0 where none agrees:

        merged = sum_{i in A} w_i tau_i / max(|A|, 1),    A = {i : sign(tau_i) = elected sign}
    """
    agrees = stacked.sign() == sign  # (k, ...), which vectors count at each entry
    total = (stacked * _per_vector(weights, stacked) * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def weighted_sum(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Plain task arithmetic: sum_i w_i tau_i."""
    stacked = torch.stack(taus)  # (k, ...)
    return (stacked * _per_vector(weights, stacked)).sum(dim=0)


# -- the merges ----------------------------------------------------------------------------------
def ties(taus: list[torch.Tensor], weights: list[float], density: float, majority_sign_method: str = "total"):
    """TIES-Merging: trim each tau_i to its top ``density`` by magnitude, elect signs, merge disjointly."""
    stacked = torch.stack([prune_by_magnitude(tau, density) for tau in taus])  # (k, ...)
    return disjoint_merge(stacked, weights, elect_sign(stacked, majority_sign_method))


def dare_linear(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """DARE then task arithmetic: sum_i w_i (m_i * tau_i / p), an unbiased estimate of sum_i w_i tau_i."""
    return weighted_sum([prune_at_random(tau, density) for tau in taus], weights)


def dare_ties(taus: list[torch.Tensor], weights: list[float], density: float, majority_sign_method: str = "total"):
    """DARE's random drop and rescale in place of TIES' trim, then sign election and disjoint merge."""
    stacked = torch.stack([prune_at_random(tau, density) for tau in taus])  # (k, ...)
    return disjoint_merge(stacked, weights, elect_sign(stacked, majority_sign_method))


def magnitude_prune(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES' trim alone, then task arithmetic: sum_i w_i prune(tau_i)."""
    return weighted_sum([prune_by_magnitude(tau, density) for tau in taus], weights)


def check_options(method: str, density, majority_sign_method: str, name: str | None = None) -> None:
    """A ValueError unless ``density`` and ``majority_sign_method`` suit merge ``method``: the
    pruning merges keep a fraction density in (0, 1] of each vector; the sign-electing ones
    need a known sign method. Other merges ignore both. ``name``: what the caller calls the
    merge in its message (e.g. ``"combination_type='ties_svd'"``)."""
    if method in PRUNING_MERGES and (
        isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1
    ):
        raise ValueError(
            f"{name or f'the {method} merge'} keeps a fraction `density` of each adapter's entries: give density as "
            f"a number in (0, 1] (e.g. 0.5; 1 prunes nothing), got {density!r}"
        )
    if method in SIGN_ELECTING_MERGES:
        check_sign_method(majority_sign_method)


def check_sign_method(majority_sign_method: str) -> None:
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)} ('total': the sign of the summed "
            f"entries wins, 'frequency': the sign most adapters have), got {majority_sign_method!r}"
        )


def merge(
    method: str,
    taus: list[torch.Tensor],
    weights: list[float],
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """The merge named ``method`` (one of ``MERGES``; "linear" is the plain weighted sum) of the
    task vectors ``taus`` with ``weights``."""
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; the merges are {list(MERGES)}")
    check_options(method, density, majority_sign_method)
    if method == "linear":
        return weighted_sum(taus, weights)
    if method == "ties":
        return ties(taus, weights, density, majority_sign_method)
    if method == "dare_ties":
        return dare_ties(taus, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(taus, weights, density)
    return magnitude_prune(taus, weights, density)

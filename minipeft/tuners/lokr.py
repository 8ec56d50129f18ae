"""LoKr: low-rank Kronecker product adaptation (LyCORIS; after KronA, Edalati et al. 2022).

The update is the Kronecker product of a small matrix and a larger, low-rank one:

    Delta W = s * (W1 (x) W2),    W1: (a, c),  W2: (b, d),   out = a b,  in = c d,  s = alpha / r

    (W1 (x) W2)[i b + k, j d + l] = W1[i, j] W2[k, l]

so every entry of W1 scales one (b, d) block, a copy of W2. The sizes factor the layer's:
``factorization`` splits out into a <= b and in into c <= d, as near the square root as the
divisors allow, or with ``decompose_factor`` = f taking a = f (c = f) where f divides.

W2 is itself a product, W2 = W2a W2b (W2a: (b, r), W2b: (r, d)), unless r is at least half
its larger side, where a product would save nothing: then W2 is trained whole. With
``decompose_both`` W1 is split the same way (W1a: (a, r), W1b: (r, c)).

Convolutions, kernel (out, in / groups, k...): W2 carries the kernel, whole as (b, d, k...),
or as the product W2a W2b with W2b (r, d k...), or with ``use_effective_conv2d`` through a core
t2 (r, r, kh, kw) (LyCORIS's "CP" form): W2[p, q, k, l] = sum_ij t2[i, j, k, l] W2a[i, p] W2b[j, q]
(a Conv1d's kernel as (k, 1)). The product is laid out as peft's ``torch.kron``, so that the same factors
give the same update in both libraries.

Initialisation (peft's): W1 (or W1a) zero and the rest Kaiming-uniform, so the update starts at
zero; ``init_weights="lycoris"`` zeroes W2 (or W2b) instead and draws W1; ``False`` draws all.
The forward, the dropouts and merging are the LyCORIS family's (``lycoris.py``); rank dropout
rescales the kept rows only with ``rank_dropout_scale``. Parameter names and checkpoints are
peft's: ``<layer>.lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` /
``lokr_w2_b``, and ``lokr_t2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftType
from ..targeting import innermost
from .base import wide
from .lycoris import LycorisConfig, LycorisLayer, check_supported


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters, with peft's field names: those of ``LycorisConfig``, and

    decompose_both: W1 low-rank too (as W1a W1b) when r is under half its larger side.
    decompose_factor: the size to split dimensions at (a and c), or -1 for near-square factors
        (see ``factorization``: as peft reads it).
    rank_dropout_scale: divide the rows kept by rank dropout by the kept fraction.
    init_weights: True (W1 zero), "lycoris" (W2 zero) or False (every factor drawn).
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if self.decompose_factor != -1 and self.decompose_factor < 1:  # (an int: check_field_types)
            raise ValueError(f"decompose_factor is a size to split dimensions at (-1: near the square root), "
                             f"got {self.decompose_factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension``: ``(factor, dimension / factor)`` when ``factor``
    divides (in that order, as peft gives it), else the divisor pair nearest the square root,
    ``m <= n``, with ``m <= factor`` (any ``m``, for -1). ``factorization(128) = (8, 16)``,
    ``factorization(127) = (1, 127)``, ``factorization(128, 32) = (32, 4)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, math.isqrt(dimension) + 1):  # divisors m <= sqrt: n = dimension / m >= m
        if candidate > limit:
            break
        if dimension % candidate == 0:
            m = candidate
    return m, dimension // m


class LoKrLayer(LycorisLayer):
    """LoKr around an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = (*LycorisLayer.other_param_names, "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.rank_dropout_scale: dict[str, bool] = {}

    def create_factors(self, adapter_name: str, r: int, config: LoKrConfig) -> None:
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        weight = self.get_base_layer().weight  # (out, in) or (out, in / groups, k...)
        kernel = tuple(weight.shape[2:])
        a, b = factorization(weight.shape[0], config.decompose_factor)
        c, d = factorization(weight.shape[1], config.decompose_factor)
        whole_w1 = not (config.decompose_both and r < max(a, c) / 2)
        whole_w2 = r >= max(b, d) / 2
        cores = config.use_effective_conv2d and math.prod(kernel) > 1 and not whole_w2
        new = {}
        if whole_w1:
            new["lokr_w1"] = (a, c)
        else:
            new["lokr_w1_a"], new["lokr_w1_b"] = (a, r), (r, c)
        if whole_w2:
            new["lokr_w2"] = (b, d, *kernel)
        elif cores:
            new["lokr_t2"] = (r, r, *(*kernel, 1)[:2])  # a Conv1d's kernel as (k, 1)
            new["lokr_w2_a"], new["lokr_w2_b"] = (r, b), (r, d)
        else:
            new["lokr_w2_a"], new["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
        for name, shape in new.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape))
        # peft's inits, drawn in its order (one seed, the same factors): W1 first, then W2, then t2.
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if name in new:
                tensor = getattr(self, name)[adapter_name]
                nn.init.zeros_(tensor) if name in zero else nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))

    def scales_kept_rows(self, adapter_name: str) -> bool:
        return self.rank_dropout_scale[adapter_name]

    def _factor(self, i: str, adapter_name: str) -> torch.Tensor:
        """W1 or W2 as a tensor in at least fp32: whole, or rebuilt from its product (or its core)."""
        if adapter_name in getattr(self, f"lokr_w{i}"):
            return wide(getattr(self, f"lokr_w{i}")[adapter_name])
        wa, wb = wide(getattr(self, f"lokr_w{i}_a")[adapter_name]), wide(getattr(self, f"lokr_w{i}_b")[adapter_name])
        if i == "2" and adapter_name in self.lokr_t2:
            return torch.einsum("ijkl,ip,jq->pqkl", wide(self.lokr_t2[adapter_name]), wa, wb)  # (b, d, kh, kw)
        return wa @ wb

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s (W1 (x) W2)`` in the base weight's shape, in at least fp32."""
        w1, w2 = self._factor("1", adapter_name), self._factor("2", adapter_name)  # (a, c), (b, d, k...)
        (a, c), (b, d) = w1.shape, w2.shape[:2]
        # peft's torch.kron, written out (it refuses some of the CP einsum's strides):
        if w2.dim() == 3:
            # A Conv1d's whole W2 (b, d, k): torch.kron takes W1 as (1, a, c), a layout of its own,
            # [k, i d + l, j k' + m] = W1[i, j] W2[k, l, m], kept so peft's checkpoints compute the same.
            kron = torch.einsum("ij,klm->kiljm", w1, w2).reshape(b, a * d, c * w2.shape[2])
        else:
            # (W1 (x) W2)[i b + k, j d + l, ...] = W1[i, j] W2[k, l, ...]: each block a whole kernel.
            kron = torch.einsum("ij,kl...->ikjl...", w1, w2).reshape(a * b, c * d, *w2.shape[2:])
        return (kron * self.scaling[adapter_name]).reshape(self.get_base_layer().weight.shape)


def wrap_module(target: nn.Module, adapter_name: str, config: LoKrConfig, key: str) -> LoKrLayer:
    """Build the LoKr wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_supported(innermost(target), "LoKr", key)
    layer = LoKrLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

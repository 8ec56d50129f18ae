"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS).

LoRA's update ``B A`` has rank at most ``r``. LoHa multiplies two such products element by
element (the Hadamard product ``*``), whose rank can reach ``r^2`` for the same number of
parameters as a rank-``2r`` LoRA:

    Delta W = s * (W1a W1b) * (W2a W2b),     W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r
    y       = W x + b + Delta W x

A convolution's kernel (out, in / groups, k...) is adapted as the matrix it flattens to. With
``use_effective_conv2d`` a kernel larger than 1 is instead built, for each of the two products,
from a small core ``t: (r, r, kh, kw)`` and two factor matrices (a Tucker-2 form; LyCORIS and
peft call it CP):

    (W1)[p, q, k, l] = sum_ij t1[i, j, k, l] W1b[j, q] W1a[i, p],   W1a: (r, out),  W1b: (r, in)

and the same for W2 (a Conv1d's kernel takes kw = 1).

Initialisation (peft's, after FedPara): W1a, W1b, W2a and the cores Kaiming-uniform, W2b zero, so
the update starts at zero; ``init_weights=False`` draws W2b too (a non-zero update, for tests).

The forward, ``rank_dropout`` (rows dropped, the rest rescaled), ``module_dropout`` and merging
are the LyCORIS family's, in ``lycoris.py``. Parameter names and checkpoints are peft's:
``<layer>.hada_w1_a`` (adapter name dropped), ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` and,
for the effective convolution, ``hada_t1`` and ``hada_t2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftType
from ..targeting import innermost
from .base import wide
from .lycoris import LycorisConfig, LycorisLayer, check_supported


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters, with peft's field names: those of ``LycorisConfig``, and

    init_weights: True starts at a zero update (W2b = 0); False draws every factor.
    """

    init_weights: bool = True

    field_advice: ClassVar[dict[str, str]] = {"init_weights": "True is a zero update, False draws every factor"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOHA


class LoHaLayer(LycorisLayer):
    """LoHa around an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def create_factors(self, adapter_name: str, r: int, config: LoHaConfig) -> None:
        weight = self.get_base_layer().weight  # (out, in) or (out, in / groups, k...)
        out_features, in_features, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        cores = config.use_effective_conv2d and math.prod(kernel) > 1  # a 1-wide kernel is a matrix already
        for i in ("1", "2"):
            if cores:
                kernel_2d = (*kernel, 1)[:2]  # a Conv1d's kernel as (k, 1)
                self.factor("t", i)[adapter_name] = nn.Parameter(torch.empty(r, r, *kernel_2d))
                self.factor("a", i)[adapter_name] = nn.Parameter(torch.empty(r, out_features))
                self.factor("b", i)[adapter_name] = nn.Parameter(torch.empty(r, in_features))
            else:
                self.factor("a", i)[adapter_name] = nn.Parameter(torch.empty(out_features, r))
                self.factor("b", i)[adapter_name] = nn.Parameter(torch.empty(r, in_features * math.prod(kernel)))
        # Drawn in peft's order, so that one seed gives both libraries the same factors.
        drawn = ["hada_w1_a", "hada_w1_b", "hada_w2_a"] + ([] if config.init_weights else ["hada_w2_b"])
        for name in drawn + (["hada_t1", "hada_t2"] if cores else []):
            nn.init.kaiming_uniform_(getattr(self, name)[adapter_name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])  # one zero factor: the update starts at zero

    def factor(self, kind: str, i: str) -> nn.ParameterDict:
        """The per-adapter container of factor ``kind`` ("a", "b" or the core "t") of product ``i``."""
        return getattr(self, f"hada_t{i}" if kind == "t" else f"hada_w{i}_{kind}")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s (W1a W1b) * (W2a W2b)`` in the base weight's shape, in at least fp32."""
        if adapter_name in self.hada_t1:
            # Each product rebuilt from its core: (r, r, kh, kw), (r, in), (r, out) -> (out, in, kh, kw).
            w1, w2 = (torch.einsum("ijkl,jq,ip->pqkl", wide(self.factor("t", i)[adapter_name]),
                                   wide(self.factor("b", i)[adapter_name]), wide(self.factor("a", i)[adapter_name]))
                      for i in ("1", "2"))
        else:
            w1, w2 = (wide(self.factor("a", i)[adapter_name]) @ wide(self.factor("b", i)[adapter_name])  # (out, in * k...)
                      for i in ("1", "2"))
        return (w1 * w2 * self.scaling[adapter_name]).reshape(self.get_base_layer().weight.shape)


def wrap_module(target: nn.Module, adapter_name: str, config: LoHaConfig, key: str) -> LoHaLayer:
    """Build the LoHa wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_supported(innermost(target), "LoHa", key)
    layer = LoHaLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

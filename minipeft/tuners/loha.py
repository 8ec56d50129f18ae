"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS).

LoRA's update ``B A`` has rank at most ``r``. LoHa multiplies two such products element by
element (the Hadamard product ``*``), whose rank can reach ``r^2`` for the same number of
parameters as a rank-``2r`` LoRA:

    Delta W = s * (W1a W1b) * (W2a W2b),     W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r
    y       = W x + b + Delta W x

A convolution's kernel (out, in, k...) is adapted as the (out, in * k...) matrix it flattens to.
With ``use_effective_conv2d`` a kernel larger than 1 is instead built from a small core tensor
per factor (a Tucker/CP form), ``t: (r, r, kh, kw)``:

    (W1)[p, q, k, l] = sum_ij t1[i, j, k, l] W1b[j, q] W1a[i, p],   W1a: (r, out),  W1b: (r, in)

and the same for W2 (a Conv1d's kernel takes kw = 1).

Initialisation (peft's, after FedPara): W1a, W1b, W2a and the cores Kaiming-uniform, W2b zero, so
the update starts at zero; ``init_weights=False`` draws W2b too (a non-zero update, for tests).

Regularisation, both only while training: ``rank_dropout`` zeroes whole rows of the update
(output channels) with that probability and rescales the rest by the kept fraction;
``module_dropout`` skips the adapter for a whole step with that probability.

The update is a matrix of the weight's shape, so it merges into the weight and unmerges as
LoRA's does. Parameter names and checkpoints are peft's: ``<layer>.hada_w1_a`` (adapter name
dropped), ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` and, for the effective convolution,
``hada_t1`` and ``hada_t2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, check_layer_selection, is_positive_int, pattern_value
from ..targeting import innermost
from .base import AdapterLayer, adapter_placement

SUPPORTED = "nn.Linear, nn.Conv1d and nn.Conv2d"


@dataclass
class LoHaConfig(PeftConfig):
    """LoHa hyper-parameters, with peft's field names and meanings.

    r / alpha: rank of each of the two products, and the update's scale ``s = alpha / r``.
    rank_pattern / alpha_pattern: per-module r and alpha, keyed by a name suffix or a regex.
    rank_dropout: probability of dropping a row of the update in a training step.
    module_dropout: probability of skipping the adapter altogether in a training step.
    use_effective_conv2d: build convolution kernels larger than 1 from CP cores (see above).
    target_modules / exclude_modules / layers_to_transform / layers_pattern: which modules, as for LoRA.
    init_weights: True starts at a zero update (W2b = 0); False draws every factor.
    modules_to_save: modules trained whole beside the adapter (e.g. a classifier head).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOHA
        for name, value in [("r", self.r), *self.rank_pattern.items()]:
            if not is_positive_int(value):
                raise ValueError(f"LoHa's rank must be a positive integer, got {name}={value!r}")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} is a probability in [0, 1), got {value!r}")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        check_layer_selection(self)


class LoHaLayer(AdapterLayer):
    """LoHa around an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")
    adapter_key_name = "r"
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: LoHaConfig, key: str) -> None:
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
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
        device, dtype = adapter_placement(weight)
        for p in self.adapter_parameters(adapter_name):
            p.data = p.data.to(device, dtype)

    def factor(self, kind: str, i: str) -> nn.ParameterDict:
        """The per-adapter container of factor ``kind`` ("a", "b" or the core "t") of product ``i``."""
        return getattr(self, f"hada_t{i}" if kind == "t" else f"hada_w{i}_{kind}")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s (W1a W1b) * (W2a W2b)`` in the base weight's shape, in the adapter's dtype."""
        if adapter_name in self.hada_t1:
            # Each product rebuilt from its core: (r, r, kh, kw), (r, in), (r, out) -> (out, in, kh, kw).
            w1, w2 = (torch.einsum("ijkl,jq,ip->pqkl", self.factor("t", i)[adapter_name],
                                   self.factor("b", i)[adapter_name], self.factor("a", i)[adapter_name])
                      for i in ("1", "2"))
        else:
            w1, w2 = (self.factor("a", i)[adapter_name] @ self.factor("b", i)[adapter_name]  # (out, in * k...)
                      for i in ("1", "2"))
        return (w1 * w2 * self.scaling[adapter_name]).reshape(self.get_base_layer().weight.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_apply():
            # One coin per adapter and training step, drawn even when module_dropout is 0 because
            # peft draws it: the random stream stays in step with peft's, so that under one seed
            # the model's other dropout layers draw the same masks in both libraries.
            if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
                continue
            delta = self.delta_weight(name)
            if self.training and self.rank_dropout[name] > 0:
                delta = delta * self._row_mask(name, delta)
            result = result + self._update_output(x, delta.to(x.dtype))
        return result

    def _row_mask(self, adapter_name: str, delta: torch.Tensor) -> torch.Tensor:
        """Keep each output row with probability 1 - rank_dropout, scaled by the kept fraction
        (out, 1, ...); all zero, not NaN, when no row is kept."""
        keep = (torch.rand(delta.shape[0]) > self.rank_dropout[adapter_name]).to(delta.dtype)
        keep = keep / keep.mean().clamp_min(1 / delta.shape[0])
        return keep.view(-1, *(1,) * (delta.dim() - 1)).to(delta.device)

    def _update_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Delta W x``: the base layer's own operation with the update as its weight and no bias."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, delta)
        return base._conv_forward(x, delta, None)  # stride, padding (and its mode), dilation, groups

    # -- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        weight = tensors["weight"]
        return {"weight": weight + self.delta_weight(adapter_name).to(weight.dtype)}, None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        weight = tensors["weight"]
        return {"weight": weight - self.delta_weight(adapter_name).to(weight.dtype)}


def wrap_module(target: nn.Module, adapter_name: str, config: LoHaConfig, key: str) -> LoHaLayer:
    """Build the LoHa wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"cannot apply LoHa to {key!r}: it is a {type(base).__name__}; LoHa supports {SUPPORTED}")
    layer = LoHaLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

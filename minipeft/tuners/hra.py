"""HRA: Householder reflection adaptation (Yuan et al., NeurIPS 2024), in peft's layout.

Like OFT, HRA multiplies a frozen weight ``W`` (out, d) on its input side by an orthogonal matrix
(``weight_transform.py``: the forward, merging and their order). HRA builds it as a chain of ``r``
Householder reflections, each the mirror through the hyperplane orthogonal to a learned vector:

    H_i = I - 2 u_i u_i^T / ||u_i||^2,      M = H_1 H_2 ... H_r,      W' = W M

A reflection is orthogonal and its own inverse, so ``M`` is orthogonal for any non-zero ``u``. It
costs ``d r`` parameters per layer, as many as a rank-``r / 2`` LoRA on a square layer.

The forward never builds a (d, d) matrix (peft builds ``M`` and then ``W M``). With the vectors
normalised into ``V`` (d, r), a product of reflections has the compact "WY" form
``H_1 ... H_r = I - V T V^T`` with ``T`` (r, r) upper triangular, built one reflection at a time:

    (I - V T V^T)(I - 2 v v^T) = I - [V v] [[T, -2 T V^T v], [0, 2]] [V v]^T

so ``x M^T = x - ((x V) T^T) V^T``: two thin products, and the backward keeps only thin
(tokens, r) tensors (``x V`` and its product with ``T^T``) besides ``x``.

Initialisation (peft's): the columns of ``hra_u`` (d, r) come in equal pairs, ``u_1 = u_2``,
``u_3 = u_4``, ..., each pair drawn Kaiming-uniform; a reflection twice is the identity, so the
adapter starts as the unchanged model. An odd ``r`` cannot pair its vectors: it starts at a
random ``M`` (with a warning); ``init_weights=False`` draws every vector (for tests).

``apply_GS`` (peft's option): the vectors are orthonormalised first (Gram-Schmidt, in column order)
and ``M = I - 2 U U^T`` (``T = 2 I``), symmetric, and orthogonal when ``U`` is, which needs
``r <= d`` independent vectors. It is never ``I`` (it flips the span of ``U``), so this variant
cannot start as the unchanged model; from paired vectors (``init_weights=True``, peft's default)
Gram-Schmidt is left only rounding noise to normalise (a warning says so), and
``init_weights=False`` is the start that works. Unmerging solves against ``M`` rather than
trusting it to be its own inverse.

Layers: ``nn.Linear`` and ``nn.Conv2d`` as in peft (the flattened kernel, ``d = in x kh x kw``);
GPT-2's ``Conv1D``, ``nn.Conv1d``, ``nn.Conv3d`` and grouped convolutions too (peft: none of these).
Checkpoints: ``<layer>.hra_u`` (d, r), peft's key and shape.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, is_positive_int
from ..targeting import CONVOLUTIONS, innermost, is_gpt2_conv1d
from .weight_transform import InputTransformConv, InputTransformLayer, refuse_wrapped_convolution


@dataclass
class HRAConfig(PeftConfig):
    """HRA hyper-parameters, with peft's field names and defaults.

    r: the number of reflections per layer (even, for the identity start).
    apply_GS: orthonormalise the vectors (Gram-Schmidt) and use ``M = I - 2 U U^T``.
    init_weights: True draws the vectors in equal pairs, so that ``M = I`` (not with an odd r, nor
        with apply_GS: see the module docstring); False draws every vector.
    bias: which biases train, ``"none"``, ``"all"`` or ``"hra_only"`` (those of HRA's layers).
    target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HRA
        if not is_positive_int(self.r):
            raise ValueError(f"HRA's r (the number of reflections) is a positive integer, got {self.r!r}")
        check_bias(self, "hra_only")
        check_layer_selection(self)


def unit_vectors(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """The columns of ``u`` (d, r) normalised; with ``gram_schmidt`` also made orthogonal, each
    column with the earlier ones' directions taken out (in order, as peft does)."""
    if not gram_schmidt:
        return u / u.norm(dim=0)
    columns = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for w in columns:
            v = v - (w @ v) * w
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


def compact_wy(v: torch.Tensor) -> torch.Tensor:
    """``T`` (r, r), upper triangular, with ``H_1 ... H_r = I - V T V^T`` for the unit columns of
    ``v`` (d, r), ``H_i = I - 2 v_i v_i^T``: one column per reflection (module docstring)."""
    gram = v.T @ v  # (r, r)
    t = v.new_zeros(0, 0)
    for k in range(v.shape[1]):
        column = -2 * t @ gram[:k, k]  # (k,)
        t = torch.cat([torch.cat([t, column[:, None]], dim=1),
                       torch.cat([v.new_zeros(1, k), v.new_full((1, 1), 2.0)], dim=1)], dim=0)
    return t


class HRALayer(InputTransformLayer):
    """HRA around a linear layer (``nn.Linear``, GPT-2's ``Conv1D``): the input reflected by each
    active adapter's vectors (``x M^T = x H_r ... H_1``, in the compact form)."""

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")
    adapter_key_name = "hra_r"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: HRAConfig, key: str) -> None:
        d, r = self.transformed_size(), config.r
        if config.apply_GS and r > d:
            raise ValueError(f"HRA on {key!r}: apply_GS orthonormalises the r={r} vectors, but the layer's size is "
                             f"{d}, which holds at most {d} orthonormal vectors; use r <= {d}")
        if config.apply_GS and config.init_weights and not config.inference_mode:  # (loading: the start is overwritten)
            warnings.warn(f"HRA on {key!r}: apply_GS with init_weights=True orthonormalises paired vectors, whose "
                          "second of each pair is rounding noise after Gram-Schmidt: the adapter starts at a random "
                          "reflection with large gradients (as in peft). Use init_weights=False with apply_GS")
        if config.init_weights and r % 2 == 0:
            # Drawn as peft draws it (one Kaiming-uniform half, fan-in r / 2), so one seed gives both the same vectors.
            half = torch.zeros(d, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)  # u_1 = u_2, u_3 = u_4, ...: M = I
        else:
            if config.init_weights and not config.inference_mode:
                warnings.warn(f"HRA on {key!r}: r={r} is odd, so its reflections cannot come in equal pairs and the "
                              "adapter does not start as the unchanged model; use an even r")
            u = torch.empty(d, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u[adapter_name] = nn.Parameter(u)
        self.hra_r[adapter_name], self.hra_apply_GS[adapter_name] = r, config.apply_GS
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def apply_map(self, t: torch.Tensor, adapter_name: str, transpose: bool, inverse: bool = False,
                  in_forward: bool = True) -> torch.Tensor:
        """``t M`` with ``M = I - V T V^T`` (module docstring), ``t M^T`` with ``transpose``; with
        ``inverse``, ``t M^{-1} = t M^T`` (an exact product of reflections is orthogonal).
        ``in_forward`` changes nothing here: HRA has no randomness or constraint that acts in a forward."""
        u = self.hra_u[adapter_name]
        dtype = torch.promote_types(t.dtype, u.dtype)
        t, gram_schmidt = t.to(dtype), self.hra_apply_GS[adapter_name]
        v = unit_vectors(u.to(dtype), gram_schmidt)
        if gram_schmidt and inverse:  # M = I - 2 U U^T is orthogonal only if U came out orthonormal
            m = torch.eye(len(v), dtype=dtype, device=v.device) - 2 * v @ v.T
            return torch.linalg.solve(m.T if transpose else m, t, left=False)
        wy = 2 * torch.eye(v.shape[1], dtype=dtype, device=v.device) if gram_schmidt else compact_wy(v)
        if transpose != inverse:
            wy = wy.T
        return t - ((t @ v) @ wy) @ v.T


class HRAConv(InputTransformConv, HRALayer):
    """HRA around ``nn.Conv1d/2d/3d``: the kernel's rows reflected, ``W M``, and the layer's own
    convolution run with them."""


SUPPORTED = "nn.Linear, transformers' GPT-2 Conv1D and nn.Conv1d/2d/3d"


def wrap_module(target: nn.Module, adapter_name: str, config: HRAConfig, key: str) -> HRALayer:
    """Build the HRA wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    base = innermost(target)
    if isinstance(base, CONVOLUTIONS):
        layer = HRAConv(target)
    else:
        layer = HRALayer(target, fan_in_fan_out=is_gpt2_conv1d(base))
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: HRAConfig, key: str) -> None:
    """The errors adding HRA to ``target`` would meet, raised before the model is changed."""
    base = innermost(target)
    if not isinstance(base, (nn.Linear, *CONVOLUTIONS)) and not is_gpt2_conv1d(base):
        raise ValueError(f"cannot apply HRA to {key!r}: it is a {type(base).__name__}; HRA supports {SUPPORTED}")
    refuse_wrapped_convolution(target, base, HRAConv, "HRA", key)

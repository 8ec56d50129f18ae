"""C3A: circular convolution adaptation (Chen et al., ACL 2025), in peft's layout.

The update ``Delta W`` (out, in) is block-circulant: cut into ``b x b`` blocks, block ``(i, j)`` is
the circulant matrix of one trained kernel ``w_ij`` (b,), and the whole is divided by ``in``:

    Delta W_ij[u, t] = w_ij[(t - u) mod b] / in,        (Delta W_ij x_j)[u] = sum_s w_ij[s] x_j[(u + s) mod b] / in

a circular cross-correlation of each input block with each kernel. It costs ``out in / b``
parameters per layer and has a rank up to ``min(out, in)``, where a LoRA of as many parameters
on a square ``d x d`` layer has rank ``d / (2 b)``. The forward never builds ``Delta W``: by the correlation theorem, with
real FFTs of length ``b`` (``X = rfft(x_j)``, ``K = rfft(w_ij)``, ``b / 2 + 1`` frequencies),

    y_i = irfft( sum_j conj(K_ij) X_j ) / in

so a token costs ``(in + out) / b`` FFTs and ``out in / b x (b / 2 + 1) / b`` complex products
instead of ``out in`` real ones (``CircularCorrelation``, with its backward). (peft 0.21 computes
the same forward with complex FFTs and a hand-written backward whose input gradient uses
``w[u + t]`` where the chain rule gives ``w[t - u]`` (the same entry only for blocks of 1 or 2):
a C3A layer there sends wrong gradients to every trainable parameter before it, while its own
kernel's gradient is right. minipeft's
gradients match the dense ``Delta W``'s; see the tests.)

Initialisation (``init_weights``, peft's names): ``"xavier_uniform"`` (the default, as in peft; also
``False``) draws ``U(-a, a)`` with ``a = sqrt(6 / (in + out))``, ``"kaiming_uniform"``
``U(-1/sqrt(in), 1/sqrt(in))``, ``"gaussian"`` ``N(0, 1)``, all as peft draws them: the adapter
does not start as the unchanged model (``Delta W`` is small, divided by ``in``). ``True`` starts at
zero. ``block_size`` must divide both sizes; ``block_size_pattern`` sets it per module, by
peft's C3A rule (a key is a regex matched against the end of the module's name after a dot, or
the whole name), which differs from LoRA's ``rank_pattern`` for keys such as ``"q|v"``.

Layers: ``nn.Linear`` as in peft; GPT-2's ``Conv1D`` too. Merged by addition. Checkpoints:
``<layer>.c3a_kernel`` (out / b, in / b, b), peft's key and shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d, linear_sizes, out_in_features
from .base import AdapterLayer, AddedUpdate, wide

INITS = (True, False, "xavier_uniform", "kaiming_uniform", "gaussian")


@dataclass
class C3AConfig(PeftConfig):
    """C3A hyper-parameters, with peft's field names and defaults.

    block_size: the size ``b`` of the circulant blocks; it must divide each adapted layer's input
        and output sizes (peft's advice: their greatest common divisor).
    block_size_pattern: per-module block sizes, keyed by a regex matching the end of the module's
        name after a dot, or by the whole name (peft's C3A rule).
    init_weights: "xavier_uniform" (default), "kaiming_uniform", "gaussian", False (= xavier) or
        True (zeros: the unchanged model).
    bias: which biases train, ``"none"``, ``"all"`` or ``"c3a_only"`` (those of C3A's layers).
    target_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    block_size: int = 256
    target_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    block_size_pattern: dict = field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"

    field_advice: ClassVar[dict[str, str]] = {"init_weights": f"use one of {list(INITS)}"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.C3A
        for name, value in [("block_size", self.block_size), *self.block_size_pattern.items()]:
            if not is_positive_int(value):
                raise ValueError(f"C3A's block sizes are positive integers; got {value!r} for {name!r}")
        if self.init_weights not in INITS:
            raise ValueError(f"C3A's init_weights is one of {list(INITS)}; got {self.init_weights!r}")
        check_bias(self, "c3a_only")
        check_layer_selection(self)


def circulant_update(kernel: torch.Tensor) -> torch.Tensor:
    """The dense block-circulant matrix (out, in) of ``kernel`` (out / b, in / b, b), not yet
    divided by ``in``: block ``(i, j)`` row ``u`` column ``t`` is ``kernel[i, j, (t - u) mod b]``."""
    m, n, b = kernel.shape
    offsets = torch.arange(b, device=kernel.device)
    blocks = kernel[:, :, (offsets[None, :] - offsets[:, None]) % b]  # (m, n, b, b): [.., u, t]
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


class CircularCorrelation(torch.autograd.Function):
    """``x (circulant_update(kernel))^T`` for ``x`` (..., in), through real FFTs (module docstring).

    Written out so that the backward keeps ``x`` and the kernel alone and recomputes their
    spectra, as peft's does, instead of autograd's complex intermediates (about one more copy of
    ``x``). With ``G = rfft(dy)``, ``X = rfft(x)``, ``K = rfft(w)`` per block:

        dx_j   = irfft( sum_i G_i K_ij )                  (dx[t] = sum_u dy[u] w[t - u]: a convolution)
        dw_ij  = irfft( sum_tokens conj(G_i) X_j )        (dw[s] = sum_u dy[u] x[u + s]: a correlation)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        m, n, b = kernel.shape
        ctx.save_for_backward(x, kernel)
        spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b))  # (..., n, b/2 + 1)
        mixed = torch.einsum("...nf,mnf->...mf", spectrum, torch.fft.rfft(kernel).conj())
        return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, kernel = ctx.saved_tensors
        m, n, b = kernel.shape
        g = torch.fft.rfft(grad.reshape(*grad.shape[:-1], m, b))  # (..., m, b/2 + 1)
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            mixed = torch.einsum("...mf,mnf->...nf", g, torch.fft.rfft(kernel))
            grad_x = torch.fft.irfft(mixed, n=b).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b)).reshape(-1, n, b // 2 + 1)
            mixed = torch.einsum("tmf,tnf->mnf", g.reshape(-1, m, b // 2 + 1).conj(), spectrum)
            grad_kernel = torch.fft.irfft(mixed, n=b)
        return grad_x, grad_kernel


class C3ALayer(AddedUpdate, AdapterLayer):
    """C3A around ``nn.Linear`` or GPT-2's ``Conv1D``."""

    adapter_layer_names = ("c3a_kernel",)
    other_param_names = ("block_size",)
    adapter_key_name = "block_size"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = out_in_features(self.get_base_layer().weight, fan_in_fan_out)
        self.c3a_kernel = nn.ParameterDict()
        self.block_size: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: C3AConfig, key: str) -> None:
        b = block_size_for(config, key)
        check_block_size(self.out_features, self.in_features, b, key)
        kernel = torch.zeros(self.out_features // b, self.in_features // b, b)
        init = config.init_weights
        if init in ("xavier_uniform", False):
            a = math.sqrt(3.0) * math.sqrt(2.0 / (self.in_features + self.out_features))
            nn.init.uniform_(kernel, -a, a)
        elif init == "kaiming_uniform":
            a = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(kernel, -a, a)
        elif init == "gaussian":
            nn.init.normal_(kernel)
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel)
        self.block_size[adapter_name] = b
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``Delta W`` in the stored layout, in at least fp32 (torch has no half-precision FFT on a CPU)."""
        delta = circulant_update(wide(self.c3a_kernel[adapter_name])) / self.in_features
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if x.numel() == 0:  # (torch's FFTs refuse empty batches)
            return result
        kernel = wide(self.c3a_kernel[name])
        term = CircularCorrelation.apply(x.to(torch.promote_types(x.dtype, kernel.dtype)), kernel)
        return (result + term / self.in_features).to(result.dtype)


def block_size_for(config: C3AConfig, key: str) -> int:
    """peft's C3A rule: the first key that, as a regex, matches the end of ``key`` after a dot;
    else the value under ``key`` itself; else ``block_size``."""
    for pattern, value in config.block_size_pattern.items():
        if re.match(rf".*\.{pattern}$", key):
            return value
    return config.block_size_pattern.get(key, config.block_size)


def check_block_size(out_features: int, in_features: int, block_size: int, key: str) -> None:
    if out_features % block_size or in_features % block_size:
        fitting = [b for b in range(1, math.gcd(out_features, in_features) + 1)
                   if out_features % b == 0 and in_features % b == 0]
        raise ValueError(f"C3A on {key!r}: block_size={block_size} must divide both its output size {out_features} "
                         f"and its input size {in_features}; use one of {fitting[-8:]} (or block_size_pattern "
                         "for this module)")


def wrap_module(target: nn.Module, adapter_name: str, config: C3AConfig, key: str) -> C3ALayer:
    """Build the C3A wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    layer = C3ALayer(target, fan_in_fan_out=is_gpt2_conv1d(innermost(target)))  # GPT-2 stores (in, out)
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: C3AConfig, key: str) -> None:
    """The errors adding C3A to ``target`` would meet, raised before the model is changed."""
    check_block_size(*linear_sizes(target, "C3A", key), block_size_for(config, key), key)

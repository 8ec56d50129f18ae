"""FourierFT: fine-tuning with the discrete Fourier transform (Gao et al., ICML 2024), in peft's layout.

LoRA spends its parameters on low-rank factors. FourierFT spends them on ``n`` coefficients of the
update's 2-D spectrum, at locations drawn once from a seed (the same for every layer of one shape
under one seed); the update is the real part of the inverse transform:

    F = zeros(out, in);  F[rows_k, cols_k] = c_k  (k = 1..n)
    Delta W = s * Re(IDFT2(F))                      (out, in),   s = ``scaling``
    y = W x + b + Delta W x

A few frequencies spread over the whole matrix: even ``n = 1000`` coefficients give a dense
update of any size (LoRA's rank-r update costs ``r (in + out)``). The locations are not trained
nor saved: ``random_loc_seed`` draws them again (``torch.randperm(out * in)`` from a generator of
that seed, as peft draws them, so that checkpoints mean the same thing in both libraries).

Initialisation (peft's): the coefficients are drawn from N(0, 1) (``init_weights=False``, the
default: the adapter changes the model from the start, as in the paper); ``init_weights=True``
starts them at zero.

Layers: ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is ``(in, out)``: the update is
transposed to merge). The update is added like LoHa's (``AddedUpdate``): merging adds it to the
weight, unmerging subtracts it. In a mixed batch each row gets its own adapter's update (peft
0.21's FourierFT ignores ``adapter_names`` and applies the active adapter to every row).
Checkpoints: ``<layer>.fourierft_spectrum`` (n,), peft's key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    PeftConfig, PeftType, check_bias, check_layer_selection, is_positive_int, pattern_value,
)
from ..targeting import innermost, is_gpt2_conv1d, linear_weight_layout, out_in_features
from .base import AdapterLayer, AddedUpdate


@dataclass
class FourierFTConfig(PeftConfig):
    """FourierFT hyper-parameters, with peft's field names and defaults.

    n_frequency: coefficients per layer; n_frequency_pattern: per-module values, keyed by a name
        suffix or a regex (as LoRA's rank_pattern).
    scaling: the update's scale ``s`` (like LoRA's alpha / r); peft's advice: 100 or 150 for RoBERTa on
        GLUE, 300 for LLaMA instruction tuning and for ViT.
    random_loc_seed: the seed the coefficients' locations are drawn from.
    init_weights: False (the default) draws the coefficients from N(0, 1); True starts them at zero.
    bias: which biases train, ``"none"``, ``"all"`` or ``"fourier_only"`` (those of FourierFT's layers).
    fan_in_fan_out: weights stored ``(in, out)``; set automatically for GPT-2's Conv1D.
    target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict = field(default_factory=dict)
    init_weights: bool = False

    field_advice: ClassVar[dict[str, str]] = {"random_loc_seed": "the frequency locations are drawn from it"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FOURIERFT
        for name, value in [("n_frequency", self.n_frequency), *self.n_frequency_pattern.items()]:
            if not is_positive_int(value):
                raise ValueError(f"FourierFT's n_frequency is a positive integer, got {name}={value!r}")
        check_bias(self, "fourier_only")
        check_layer_selection(self)


def spectral_locations(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n): the rows and columns of the ``n`` coefficients, peft's draw from ``seed``."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTLayer(AddedUpdate, AdapterLayer):
    """FourierFT around ``nn.Linear`` or GPT-2's ``Conv1D``."""

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_n_frequency", "fourierft_scaling", "fourierft_random_loc_seed", "indices")
    adapter_key_name = "fourierft_n_frequency"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = out_in_features(self.get_base_layer().weight, fan_in_fan_out)
        self.fourierft_spectrum = nn.ParameterDict()
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, config: FourierFTConfig, key: str) -> None:
        n = pattern_value(config.n_frequency_pattern, key, config.n_frequency)
        if n > self.out_features * self.in_features:
            raise ValueError(f"FourierFT on {key!r}: n_frequency={n} is more than the {self.out_features} x "
                             f"{self.in_features} spectrum holds; use at most {self.out_features * self.in_features}")
        self.indices[adapter_name] = spectral_locations(self.out_features, self.in_features, n, config.random_loc_seed)
        self.fourierft_n_frequency[adapter_name] = n
        self.fourierft_scaling[adapter_name] = config.scaling
        self.fourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        spectrum = torch.randn(n)  # drawn even when zeroed, as peft does: the random stream stays in step
        self.fourierft_spectrum[adapter_name] = nn.Parameter(torch.zeros(n) if config.init_weights else spectrum)
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def delta_out_in(self, adapter_name: str) -> torch.Tensor:
        """``Delta W`` (out, in) in at least fp32: the scaled real part of the inverse 2-D DFT."""
        spectrum = self.fourierft_spectrum[adapter_name]
        rows, cols = self.indices[adapter_name].to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device,
                            dtype=torch.promote_types(spectrum.dtype, torch.float32))
        dense = dense.index_put((rows, cols), spectrum.to(dense.dtype))  # out of place: autograd reaches the spectrum
        return torch.fft.ifft2(dense).real * self.fourierft_scaling[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``Delta W`` in the base weight's layout (transposed for GPT-2's Conv1D), for merging."""
        delta = self.delta_out_in(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_out_in(name)  # (out, in), at least fp32
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)


SUPPORTED = "nn.Linear and transformers' GPT-2 Conv1D"


def wrap_module(target: nn.Module, adapter_name: str, config: FourierFTConfig, key: str) -> FourierFTLayer:
    """Build the FourierFT wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if isinstance(base, nn.Linear) or is_gpt2_conv1d(base):
        layer = FourierFTLayer(target, fan_in_fan_out=linear_weight_layout(base, config, key))
    else:
        raise ValueError(f"cannot apply FourierFT to {key!r}: it is a {type(base).__name__}; FourierFT supports {SUPPORTED}")
    layer.add_adapter(adapter_name, config, key)
    return layer

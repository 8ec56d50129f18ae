"""What LoHa and LoKr share (the LyCORIS family): an update ``Delta W`` built as a full matrix of
the weight's shape from small factors, applied as the layer's own operation, and two dropouts.

    y = layer(x) + Delta W x       (F.linear, or the convolution with the layer's stride, padding, ...)

Each method's file says how it builds ``Delta W`` (``delta_weight``) and which factors it
trains; the forward, the dropouts and merging are here:

* ``rank_dropout`` (training only): each output row of ``Delta W`` is dropped with that
  probability, and the kept rows are divided by the kept fraction (always for LoHa, with
  ``rank_dropout_scale`` for LoKr, as in peft);
* ``module_dropout`` (training only): each layer skips its adapter in a forward call with that
  probability (a coin per layer and call);
* merging adds ``Delta W`` to the weight (no dropout), unmerging subtracts it (``AddedUpdate``).

Scale ``s = alpha / r``, per module through ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, check_layer_selection, check_probability, is_positive_int, pattern_value
from .base import AdapterLayer, AddedUpdate

SUPPORTED = "nn.Linear, nn.Conv1d and nn.Conv2d"


@dataclass
class LycorisConfig(PeftConfig):
    """The fields LoHa and LoKr share, with peft's names and meanings.

    r / alpha: rank of the low-rank factors, and the update's scale ``s = alpha / r``.
    rank_pattern / alpha_pattern: per-module r and alpha, keyed by a name suffix or a regex.
    rank_dropout: probability of dropping a row of the update in a training step.
    module_dropout: probability that a layer skips its adapter in a training forward call (1: always).
    use_effective_conv2d: build convolution kernels larger than 1 from a CP core (see the method).
    target_modules / exclude_modules / layers_to_transform / layers_pattern: which modules, as for LoRA.
    modules_to_save: modules trained whole beside the adapter (e.g. a classifier head).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        method = type(self).__name__.removesuffix("Config")
        for name, value in [("r", self.r), *self.rank_pattern.items()]:
            if not is_positive_int(value):
                raise ValueError(f"{method}'s rank must be a positive integer, got {name}={value!r}")
        check_probability(self, "rank_dropout")
        check_probability(self, "module_dropout", one_allowed=True)
        for name, value in [("alpha", self.alpha), *self.alpha_pattern.items()]:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{method}'s alpha is a number (the scale is alpha / r), got {name}={value!r}")
        check_layer_selection(self)


class LycorisLayer(AddedUpdate, AdapterLayer):
    """The wrapper of an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``; subclasses name their
    factor containers (``adapter_layer_names``), create them (``create_factors``) and build the
    update from them (``delta_weight``)."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")
    adapter_key_name = "r"
    supports_mixed_batch = True
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

    def update_layer(self, adapter_name: str, config: LycorisConfig, key: str) -> None:
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.create_factors(adapter_name, r, config)
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def create_factors(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        raise TypeError(f"{type(self).__name__} must define create_factors")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's shape, in at least fp32 (no dropout)."""
        raise TypeError(f"{type(self).__name__} must define delta_weight")

    def scales_kept_rows(self, adapter_name: str) -> bool:
        """Whether rank dropout divides the kept rows by the kept fraction."""
        return True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        # One coin per adapter and training call, drawn even when module_dropout is 0 because
        # peft draws it: the random stream stays in step with peft's, so that under one seed
        # the model's other dropout layers draw the same masks in both libraries.
        if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
            return result
        delta = self.delta_weight(name)
        if self.training and self.rank_dropout[name] > 0:
            delta = delta * self._row_mask(name, delta)
        # Delta W x in at least fp32 (peft: in the adapter's dtype), added and rounded once.
        return (result + self._update_output(x.to(delta.dtype), delta)).to(result.dtype)

    def _row_mask(self, adapter_name: str, delta: torch.Tensor) -> torch.Tensor:
        """Keep each output row with probability 1 - rank_dropout (out, 1, ...), rescaled by the
        kept fraction where the method does; all zero, not NaN, when no row is kept."""
        keep = (torch.rand(delta.shape[0]) > self.rank_dropout[adapter_name]).to(delta.dtype)
        if self.scales_kept_rows(adapter_name):
            keep = keep / keep.mean().clamp_min(1 / delta.shape[0])
        return keep.view(-1, *(1,) * (delta.dim() - 1)).to(delta.device)

    def _update_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``Delta W x``: the base layer's own operation with the update as its weight and no bias."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, delta)
        return base._conv_forward(x, delta, None)  # stride, padding (and its mode), dilation, groups


def check_supported(base: nn.Module, method: str, key: str) -> None:
    if not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"cannot apply {method} to {key!r}: it is a {type(base).__name__}; {method} supports {SUPPORTED}")

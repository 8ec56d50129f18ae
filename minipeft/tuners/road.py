"""RoAd: 2-D rotary adaptation (Liu et al., 2024), in peft's layout.

RoAd leaves a frozen layer's output ``h = x W^T + b`` (..., out) as it is computed and turns each
pair of its features by a learned angle and scale, like the rotary position embedding turns
pairs of query features. Features pair within groups of ``g`` (``group_size``): feature ``k`` of
the first half of a group with feature ``k + g/2`` of the second half. With per-feature vectors
``c`` and ``s`` (out,), a pair ``(h_k, h_{k+g/2})`` becomes

    y_k       = c_k h_k       - s_k h_{k+g/2}
    y_{k+g/2} = c_{k+g/2} h_{k+g/2} + s_{k+g/2} h_k

that is ``y = h * c + rotate_half(h) * s``, ``rotate_half`` mapping each group's halves
``(h1, h2)`` to ``(-h2, h1)``: elementwise products, no matrix. As a matrix ``R`` (out, out), two
non-zeros per row, so the layer merges as ``W' = R W``, ``b' = R b``; unmerging applies ``R^{-1}``,
whose 2 x 2 blocks are inverted in closed form (refused where a block is singular or nearly so).

How ``c`` and ``s`` come from the trained ``theta`` and ``alpha`` (peft's ``variant``):

* ``road_1``: out / 2 of each: one angle and scale per pair, ``c = alpha cos theta`` and
  ``s = alpha sin theta`` on both features of the pair: a scaled rotation.
* ``road_2``: out of each: one angle and scale per feature.
* ``road_4``: 2 out of each: each group's ``2g`` values give ``c`` from their first half
  (``alpha_1 cos theta_1``) and ``s`` from the second (``alpha_2 sin theta_2``).

``theta = 0``, ``alpha = 1`` is ``R = I``, the unchanged model (``init_weights=False`` draws
``theta`` from N(0, 0.5^2) and ``alpha`` from N(1, 0.5^2), as peft does). Several adapters on one
layer act one after the other in the active order, ``R_2 R_1 h``, as they merge, so they merge
only in that order (``AdapterLayer.check_merge_order``). Each row of the output is turned alone,
so mixed batches cost one elementwise pass per adapter on its rows.

Layers: ``nn.Linear`` as in peft; GPT-2's ``Conv1D`` too. Checkpoints: ``<layer>.road_theta`` and
``<layer>.road_alpha``, peft's keys and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d, linear_sizes, out_in_features
from .base import AdapterLayer, wide

PARAMETERS_PER_FEATURE = {"road_1": 0.5, "road_2": 1, "road_4": 2}
NEARLY_SINGULAR = 1e-4  # |det| of a pair's block over its row norms' product, below which unmerging refuses


@dataclass
class RoadConfig(PeftConfig):
    """RoAd hyper-parameters, with peft's field names and defaults.

    variant: "road_1", "road_2" or "road_4": how many angles and scales each pair gets (module docstring).
    group_size: the size of the groups whose halves pair up; it must divide the layer's output size.
    init_weights: True starts at ``R = I`` (the base model); False draws the parameters (for tests).
    target_modules / modules_to_save: as for LoRA (peft's RoAd has no exclude_modules or layer selection).
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ROAD
        if self.variant not in PARAMETERS_PER_FEATURE:
            raise ValueError(f"RoAd's variant is one of {list(PARAMETERS_PER_FEATURE)}, got {self.variant!r}")
        if not is_positive_int(self.group_size) or self.group_size % 2:
            raise ValueError(f"RoAd's group_size is a positive even integer (its halves pair up), got {self.group_size!r}")


def rotation_factors(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor):
    """``(c, s)`` (out,) from the trained ``theta`` and ``alpha`` (module docstring)."""
    if variant == "road_1":  # each pair's one value, on both of its features
        theta = theta.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
        alpha = alpha.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)  # road_4
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def rotate_half(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's halves ``(h1, h2)`` -> ``(-h2, h1)``, along the last axis."""
    grouped = h.reshape(*h.shape[:-1], -1, 2, group_size // 2)
    return torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(h.shape)


def inverse_rotation_factors(c: torch.Tensor, s: torch.Tensor, group_size: int):
    """``(c', s')`` of ``R^{-1}``: each pair's block ``[[c_k, -s_k], [s_l, c_l]]`` (``l = k + g/2``)
    has the inverse ``[[c_l, s_k], [-s_l, c_k]] / (c_k c_l + s_k s_l)``, of the same form."""
    pairs = lambda t: t.reshape(-1, 2, group_size // 2)  # noqa: E731  (group, half, k)
    cp, sp = pairs(c), pairs(s)
    det = cp[:, 0] * cp[:, 1] + sp[:, 0] * sp[:, 1]  # (group, k), one per pair
    # Singular, or so nearly that dividing by det returns rounding noise: |det| is at most the
    # product of the block's row norms, and their ratio is the sine of the angle between the rows.
    # (road_2: det = alpha_k alpha_l cos(theta_k - theta_l), zero for a scale of 0 or for angles a
    # right angle apart.)
    rows = (cp[:, 0].square() + sp[:, 0].square()).sqrt() * (cp[:, 1].square() + sp[:, 1].square()).sqrt()
    if (det.abs() <= NEARLY_SINGULAR * rows).any():
        raise ValueError("a RoAd adapter has a pair whose 2 x 2 block is singular or nearly so (a scale of 0, or "
                         "angles a right angle apart), so its merge cannot be undone; reload the base weights instead")
    return (cp.flip(1) / det[:, None]).flatten(), (-sp / det[:, None]).flatten()


class RoadLayer(AdapterLayer):
    """RoAd around ``nn.Linear`` or GPT-2's ``Conv1D``: the layer's output turned pairwise."""

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")
    adapter_key_name = "variant"
    scale_names = ("road_alpha",)
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features = out_in_features(self.get_base_layer().weight, fan_in_fan_out)[0]
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: RoadConfig, key: str) -> None:
        check_group_size(self.out_features, config.group_size, key)
        size = int(self.out_features * PARAMETERS_PER_FEATURE[config.variant])
        theta, alpha = torch.zeros(size), torch.ones(size)
        if not config.init_weights:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        self.road_theta[adapter_name], self.road_alpha[adapter_name] = nn.Parameter(theta), nn.Parameter(alpha)
        self.variant[adapter_name], self.group_size[adapter_name] = config.variant, config.group_size
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def rotate(self, h: torch.Tensor, adapter_name: str, inverse: bool = False) -> torch.Tensor:
        """``R h`` (or ``R^{-1} h``) along ``h``'s last axis, in at least the adapter's precision."""
        theta, alpha = self.road_theta[adapter_name], self.road_alpha[adapter_name]
        g = self.group_size[adapter_name]
        c, s = rotation_factors(self.variant[adapter_name], g, theta, alpha)
        if inverse:
            c, s = inverse_rotation_factors(wide(c), wide(s), g)
        h = h.to(torch.promote_types(h.dtype, c.dtype))
        return h * c + rotate_half(h, g) * s

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x,
                                   lambda h, _x, name: self.rotate(h, name).to(h.dtype))

    # -- merging: W' = R W, b' = R b ------------------------------------------------------------
    def merge_order(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.adapter_names]  # rotations do not commute

    def _rotated(self, tensors: dict[str, torch.Tensor], name: str, inverse: bool) -> dict[str, torch.Tensor]:
        weight = wide(tensors["weight"])
        out_last = weight if self.fan_in_fan_out else weight.T  # (in, out): the output features last
        rotated = self.rotate(out_last, name, inverse)
        result = {"weight": (rotated if self.fan_in_fan_out else rotated.T).to(tensors["weight"].dtype)}
        if tensors.get("bias") is not None:
            result["bias"] = self.rotate(wide(tensors["bias"]), name, inverse).to(tensors["bias"].dtype)
        return result

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        return self._rotated(tensors, adapter_name, inverse=False), None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        return self._rotated(tensors, adapter_name, inverse=True)


def check_group_size(out_features: int, group_size: int, key: str) -> None:
    if out_features % group_size:
        fitting = [g for g in range(2, out_features + 1, 2) if out_features % g == 0]
        advice = (f"use one of {fitting[-8:]}" if fitting else
                  "RoAd pairs output features, so it needs an even output size: leave this layer out of target_modules")
        raise ValueError(f"RoAd on {key!r}: group_size={group_size} does not divide its output size {out_features}; "
                         f"{advice}")


def wrap_module(target: nn.Module, adapter_name: str, config: RoadConfig, key: str) -> RoadLayer:
    """Build the RoAd wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    layer = RoadLayer(target, fan_in_fan_out=is_gpt2_conv1d(innermost(target)))  # GPT-2 stores (in, out)
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: RoadConfig, key: str) -> None:
    """The errors adding RoAd to ``target`` would meet, raised before the model is changed."""
    check_group_size(linear_sizes(target, "RoAd", key)[0], config.group_size, key)

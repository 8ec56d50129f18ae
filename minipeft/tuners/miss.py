"""MiSS: matrix shard sharing (Kang and Yin, 2025; formerly "Bone"), in peft's layout.

MiSS cuts a frozen weight ``W`` (out, in) along its input side into shards of ``r`` columns
and gives all of them one shared trained matrix ``D`` (r, out): the update is ``D^T`` repeated
side by side,

    Delta W[:, j] = D[j mod r, :]^T,        y = x W^T + b + fold(x) D,        fold(x) = sum_c x[..., c r : (c + 1) r]

so the forward needs no ``(out, in)`` matrix: the input's shards are summed into one ``(..., r)``
vector (the last shard zero-padded when ``r`` does not divide ``in``), which ``D`` maps to the
output, like LoRA with a fixed, parameter-free ``A``. ``D`` starts at zero: the unchanged model.
It costs ``r out`` parameters per layer. Three variants, chosen by ``init_weights`` (peft's names):

* ``True`` (peft's "balance", the default): as above. ``False`` draws ``D`` Kaiming-uniform (for tests).
* ``"mini"``: fewer parameters: ``D`` is a ``(r, mini_r)`` block repeated ``out / mini_r`` times
  along the output, ``D[:, o] = block[:, o mod mini_r]``.
* ``"bat"``: the update depends on the weight. ``W`` is cut into ``r x r`` tiles ``W_ij`` (``i``
  over output shards, ``j`` over input shards) and each output shard ``i`` has its own trained
  ``B_i`` (r, r): ``W'_ij = W_ij (I + B_i) + B_i``. The forward builds ``W'`` (as peft does: the
  tiles' product cannot be applied to ``x`` alone), and unmerging solves ``(W' - B_i)(I + B_i)^{-1}``.
  It needs ``r`` to divide both ``in`` and ``out``.

Several adapters on one layer: "balance" and "mini" updates add and commute; "bat" adapters
change the weight in turn (``W -> W'`` for the first, then the second on that result), so the
forward applies them in the active order and a merge out of that order is refused. One layer
holds adapters of one kind, "bat" or not (peft keeps one variant per layer and computes the
others' adapters with it; minipeft refuses the mix instead). "balance" and "mini" adapters on one
layer work here; peft computes both with the first one's variant, so it cannot run such a file.

``miss_dropout`` drops elements of the (padded) input of the "balance" and "mini" terms, drawn as
peft draws them (for one adapter per layer: peft pads the input again for the next adapter, so
its masks differ from there on); "bat" has no dropout (peft builds the layer but never calls it).

Layers: ``nn.Linear`` as in peft; GPT-2's ``Conv1D`` too. Checkpoints: ``<layer>.miss_block``,
(r, out), (r, mini_r) or (out / r, r, r), peft's key and shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, check_probability, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d, linear_sizes, out_in_features, wrapper_chain
from .base import AdapterLayer, dropout_or_identity, plus, wide

VARIANTS = (True, False, "bat", "mini")


@dataclass
class MissConfig(PeftConfig):
    """MiSS hyper-parameters, with peft's field names and defaults.

    r: the shard size along the input (and, for "bat", the output).
    mini_r: for ``init_weights="mini"``, the width of the block repeated along the output.
    miss_dropout: dropout on the input of the "balance" and "mini" terms.
    init_weights: True ("balance", zero start), False (random start, for tests), "bat" or "mini".
    bias: which biases train, ``"none"``, ``"all"`` or ``"MiSS_only"`` (those of MiSS's layers).
    target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MISS
        for name in ("r", "mini_r"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(f"MiSS's {name} is a positive integer, got {getattr(self, name)!r}")
        if self.init_weights not in VARIANTS or isinstance(self.init_weights, (int, float)) and \
                not isinstance(self.init_weights, bool):
            raise ValueError(f"MiSS's init_weights is True (balance), False (random, for tests), 'bat' or 'mini'; "
                             f"got {self.init_weights!r}")
        check_probability(self, "miss_dropout")
        check_bias(self, "MiSS_only")
        check_layer_selection(self)


def padded(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x`` with zeros appended to its last dim up to a multiple of ``r`` (itself, no copy, when it is one)."""
    return F.pad(x, (0, -x.shape[-1] % r)) if x.shape[-1] % r else x


def fold(x: torch.Tensor, r: int) -> torch.Tensor:
    """``sum_c x[..., c r : (c + 1) r]`` (..., r): the input's shards summed, the last one zero-padded."""
    x = padded(x, r)
    return x.reshape(*x.shape[:-1], -1, r).sum(-2)


def tiles(weight: torch.Tensor, r: int) -> torch.Tensor:
    """``W`` (out, in) as its ``r x r`` tiles (out / r, in / r, r, r): ``[i, j]`` is ``W_ij``."""
    out, inp = weight.shape
    return weight.reshape(out // r, r, inp // r, r).transpose(1, 2)


def untile(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tiles``."""
    n_out, n_in, r, _ = blocks.shape
    return blocks.transpose(1, 2).reshape(n_out * r, n_in * r)


class MissLayer(AdapterLayer):
    """MiSS around ``nn.Linear`` or GPT-2's ``Conv1D``."""

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_variant", "miss_dropout")
    adapter_key_name = "miss_r"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = out_in_features(self.get_base_layer().weight, fan_in_fan_out)
        self.miss_block = nn.ParameterDict()
        self.miss_r: dict[str, int] = {}
        self.miss_variant: dict[str, str] = {}  # "balance", "mini" or "bat"
        self.miss_dropout = nn.ModuleDict()

    # -- adding an adapter --------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: MissConfig, key: str) -> None:
        variant = variant_of(config)
        check_shapes(self.out_features, self.in_features, config, key)
        kinds = {self.miss_variant[name] == "bat" for name in self.miss_variant}
        if kinds and kinds != {variant == "bat"}:
            raise ValueError(f"MiSS on {key!r}: it holds {'bat' if kinds == {True} else 'balance / mini'} adapters "
                             f"already, and this one is {variant!r}: one layer holds adapters of one kind, since "
                             "a 'bat' adapter changes the weight the others add to; put it on other layers or "
                             "choose the same init_weights")
        r, out = config.r, self.out_features
        shape = {"balance": (r, out), "mini": (r, config.mini_r), "bat": (out // r, r, r)}[variant]
        block = torch.zeros(shape)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.miss_block[adapter_name] = nn.Parameter(block)
        self.miss_r[adapter_name], self.miss_variant[adapter_name] = r, variant
        self.miss_dropout[adapter_name] = dropout_or_identity(config.miss_dropout)
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    # -- the update -----------------------------------------------------------------------------
    def shared_matrix(self, adapter_name: str) -> torch.Tensor:
        """``D`` (r, out) of a "balance" or "mini" adapter."""
        block = self.miss_block[adapter_name]
        if self.miss_variant[adapter_name] == "mini":
            return block.repeat(1, self.out_features // block.shape[1])
        return block

    def weight_as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def transformed_weight(self, weight: torch.Tensor, adapter_name: str, inverse: bool = False) -> torch.Tensor:
        """A (out, in) weight with a "bat" adapter applied, ``W_ij (I + B_i) + B_i`` per tile (at least
        fp32), or taken out again with ``inverse``: ``(W'_ij - B_i)(I + B_i)^{-1}``."""
        block = self.miss_block[adapter_name]
        dtype = torch.promote_types(torch.promote_types(weight.dtype, block.dtype), torch.float32)
        b = block.to(dtype)[:, None]  # (out / r, 1, r, r): the same B_i across input shards
        w = tiles(weight.to(dtype), self.miss_r[adapter_name])
        if inverse:
            eye = torch.eye(b.shape[-1], dtype=dtype, device=b.device)
            return untile(torch.linalg.solve(eye + b, w - b, left=False))  # X (I + B) = W' - B
        return untile(w + w @ b + b)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``Delta W`` of a "balance" or "mini" adapter in the stored layout (at least fp32)."""
        d = wide(self.shared_matrix(adapter_name))  # (r, out)
        reps = -(-self.in_features // d.shape[0])
        delta = d.T.repeat(1, reps)[:, : self.in_features]  # (out, in): column j is D[j mod r]
        return delta.T if self.fan_in_fan_out else delta

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        adapters = self.adapters_to_apply()
        if adapters and self.miss_variant[adapters[0]] == "bat":
            return self._linear_with(x, adapters)
        if self.row_routing is not None and any(v == "bat" for v in self.miss_variant.values()):
            return self.apply_adapters(self.base_layer(x, *args, **kwargs), x,
                                       lambda _, rows, name: self._linear_with(rows, [name]))
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``fold(dropout(x)) D``, x padded first (so dropout draws what peft draws)."""
        d = self.shared_matrix(name)
        r = d.shape[0]
        x = self.miss_dropout[name](padded(x, r).to(d.dtype))
        return (result + fold(x, r) @ d).to(result.dtype)

    def _linear_with(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The frozen layer with "bat" adapters applied to its weight in turn (as merged in turn)."""
        base = self.get_base_layer()
        weight = self.weight_as_out_in(base.weight)
        for name in adapter_names:
            weight = self.transformed_weight(weight, name)
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    # -- merging ------------------------------------------------------------------------------
    def merge_is_addition(self, adapter_name: str) -> bool:
        return self.miss_variant[adapter_name] != "bat"

    def merge_order(self) -> list[str]:
        """"bat" adapters merge only in their active order (module docstring)."""
        return [a for a in self.active_adapters if self.miss_variant.get(a) == "bat"]

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        weight = tensors["weight"]
        if self.miss_variant[adapter_name] != "bat":
            return {"weight": plus(weight, self.delta_weight(adapter_name))}, None
        merged = self.weight_as_out_in(self.transformed_weight(self.weight_as_out_in(weight), adapter_name))
        return {"weight": merged.to(weight.dtype)}, None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        weight = tensors["weight"]
        if self.miss_variant[adapter_name] != "bat":
            return {"weight": plus(weight, self.delta_weight(adapter_name), -1)}
        restored = self.transformed_weight(self.weight_as_out_in(weight), adapter_name, inverse=True)
        return {"weight": self.weight_as_out_in(restored).to(weight.dtype)}


def variant_of(config: MissConfig) -> str:
    return {"bat": "bat", "mini": "mini"}.get(config.init_weights, "balance")


def check_shapes(out_features: int, in_features: int, config: MissConfig, key: str) -> None:
    """The sizes each variant needs, refused with what would fit."""
    r, variant = config.r, variant_of(config)
    if r > in_features:
        raise ValueError(f"MiSS on {key!r}: r={r} is larger than its input size {in_features}; use r <= {in_features}")
    if variant == "bat" and (in_features % r or out_features % r):
        fitting = [v for v in range(1, min(in_features, out_features) + 1)
                   if in_features % v == 0 and out_features % v == 0]
        raise ValueError(f"MiSS on {key!r}: init_weights='bat' cuts the ({out_features}, {in_features}) weight into "
                         f"r x r tiles, so r must divide both sizes; got r={r}, use one of {fitting[-8:]}")
    if variant == "mini" and out_features % config.mini_r:
        raise ValueError(f"MiSS on {key!r}: init_weights='mini' repeats a block of mini_r={config.mini_r} columns "
                         f"along its output size {out_features}, so mini_r must divide it")


def wrap_module(target: nn.Module, adapter_name: str, config: MissConfig, key: str) -> MissLayer:
    """Build the MiSS wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    base = innermost(target)
    layer = MissLayer(target, fan_in_fan_out=is_gpt2_conv1d(base))  # GPT-2 stores its weight (in, out)
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: MissConfig, key: str) -> None:
    """The errors adding MiSS to ``target`` would meet, raised before the model is changed."""
    check_shapes(*linear_sizes(target, "MiSS", key), config, key)
    base = innermost(target)
    if variant_of(config) == "bat" and target is not base and not isinstance(target, MissLayer):
        first = ("add every MiSS adapter of this layer before another method wraps it"
                 if any(isinstance(w, MissLayer) for w in wrapper_chain(target)) else
                 "add the MiSS adapters first, before any other method's (which may then wrap them)")
        raise ValueError(
            f"cannot apply MiSS with init_weights='bat' to {key!r}: another method's wrapper is around the layer, "
            f"and 'bat' runs the layer itself with a changed weight, which would skip that adapter; {first}"
        )

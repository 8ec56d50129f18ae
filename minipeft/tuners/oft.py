"""OFT: orthogonal fine-tuning (Qiu et al., NeurIPS 2023; OFTv2, Qiu et al. 2025), in peft's layout.

LoRA adds a low-rank matrix to a frozen weight; OFT *rotates* it. Every output neuron's weight
vector (a row ``w_j`` of ``W``: (out, d)) is multiplied by one learned orthogonal matrix ``R`` (d, d):

    W' = W R^T,        y = x W'^T + b = (x R) W^T + b,        x: (..., d)

An orthogonal ``R`` keeps each row's norm and the angles between rows (the paper's "hyperspherical
energy", which the pretrained model is thought to rely on) and changes only their common
orientation. On a linear layer the forward rotates the input and calls the frozen layer, as peft
does: no copy of the weight is made.

The rotation: block diagonal, each block a Cayley transform
-----------------------------------------------------------
``R = diag(R_1, ..., R_r)``: ``r`` blocks of ``b x b`` with ``r b = d``. Block ``R_i`` is the
Cayley transform of a skew-symmetric ``Q_i`` (``Q^T = -Q``), stored as its ``b(b-1)/2`` entries
above the diagonal (``weight``: (r, b(b-1)/2), each row in ``torch.triu_indices`` order):

    exact   (use_cayley_neumann=False):  R = (I - Q)(I + Q)^{-1}
    Neumann (the default):               R = (I + Q)(I + Q + Q^2 + ... + Q^m)  ~  (I + Q)(I - Q)^{-1}

The exact form is orthogonal for every skew ``Q``. The Neumann form replaces the inverse by the
first terms of its series (matrix products, no solve), orthogonal up to ``O(Q^{m+1})``; peft counts
``k = num_cayley_neumann_terms`` and uses ``m = max(2, k - 2)`` for ``k >= 3`` (``I + 2Q`` for
``k = 2``; ``k = 1``, the constant ``I``, is refused). The two are transforms of opposite sign: for the same stored ``Q``
they rotate in opposite directions. peft defines them so, and minipeft keeps both as they are,
so that a checkpoint means here what it meant there.

``Q = 0`` gives ``R = I``: a new adapter leaves the model unchanged (``init_weights=False`` draws
``Q`` from N(0, 0.1^2) instead, as peft does). An adapter costs ``r b(b-1)/2 ~ d b / 2``
parameters per layer: ``oft_block_size`` (or ``r``, one of the two) sets ``b``; a value that does
not divide ``d`` is moved to the nearest one that does, with a warning, by peft's rule.

Options (peft's names)
----------------------
* ``block_share``: one block ``R_1`` repeated ``r`` times (``b(b-1)/2`` parameters per layer).
* ``coft`` (constrained OFT): in each forward, every ``Q_i`` is pulled back, in place, to
  ``||Q_i||_F <= eps / sqrt(stored blocks)``: ``R`` stays near ``I`` (a merge uses a projected copy).
* ``module_dropout`` (training only): in each forward, ``int(p r)`` of the layer's blocks, chosen
  at random, are replaced by ``I`` (BOFT's multiplicative dropout; not with ``block_share``).
  peft 0.21 builds this layer but never calls it, so there the option does nothing.

Layers
------
* ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is ``(d, out)``: merged ``W' = R W``): the
  input rotated, as above. (peft: ``nn.Linear`` only.)
* ``nn.Conv1d/2d/3d``: a kernel is a linear map of the flattened patch, so its rows ``(out, d)``,
  ``d = in / groups x k...``, are rotated and the layer's own convolution runs with ``W R^T``.
  peft's merge computes that same kernel. Its unmerged Conv2d forward instead rotates unfolded
  input patches and folds them back, which sums overlapping patches: at ``R = I`` it already
  changes the output. (peft: ``nn.Conv2d`` only, no dilation.)
* ``nn.Embedding``: each embedding vector rotated, ``y = E[ids] R``; merged ``E' = E R``.

In the terms of ``weight_transform.py``, which holds the forward and merging that OFT shares with
HRA and BOFT, ``M = R^T``: several adapters active on one layer compose as their merges do, and unmerging
applies the inverse blocks, exact also for the Neumann form, which is not quite orthogonal.

Checkpoints: ``<layer>.oft_R.weight`` (``<layer>.oft_embedding_R.weight`` on an embedding), peft's keys
and shapes: files load both ways for the layers peft adapts (``nn.Linear``, ``nn.Embedding``, and
``nn.Conv2d`` with one group, a square kernel and no dilation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, check_probability, is_positive_int
from ..targeting import CONVOLUTIONS, innermost, is_gpt2_conv1d, linear_weight_layout
from .base import wide
from .weight_transform import InputTransformConv, InputTransformLayer, index_cache, refuse_wrapped_convolution


@dataclass
class OFTConfig(PeftConfig):
    """OFT hyper-parameters, with peft's field names, meanings and defaults.

    oft_block_size / r: the size ``b`` of each orthogonal block, or the number of blocks ``r`` per
        layer; give one of the two (the other 0), ``r b`` is the layer's input dimension.
    use_cayley_neumann / num_cayley_neumann_terms: the Neumann series instead of the exact Cayley
        transform, and its number of terms (see the module's docstring).
    block_share: one block shared by all positions of a layer.
    coft / eps: constrained OFT, keeping each block's ``||Q||_F`` within ``eps / sqrt(blocks)``.
    module_dropout: the fraction of a layer's blocks replaced by ``I`` in each training forward.
    init_weights: True starts at ``R = I`` (the base model); False draws ``Q`` (for tests).
    bias: which biases train, ``"none"``, ``"all"`` or ``"oft_only"`` (those of OFT's layers).
    fan_in_fan_out: weights stored ``(in, out)``; set automatically for GPT-2's Conv1D.
    target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.OFT
        for name in ("r", "oft_block_size"):
            if not is_positive_int(getattr(self, name)) and getattr(self, name) != 0:
                raise ValueError(f"OFT's {name} is a positive integer, or 0 to derive it from the other one; "
                                 f"got {name}={getattr(self, name)!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"give OFT either r (blocks per layer) or oft_block_size (the size of each block), and set the other "
                f"to 0, since r x oft_block_size is the layer's input size; got r={self.r}, "
                f"oft_block_size={self.oft_block_size}"
            )
        check_probability(self, "module_dropout", "a fraction of blocks")
        check_bias(self, "oft_only")
        if not is_positive_int(self.num_cayley_neumann_terms) or self.num_cayley_neumann_terms < 2:
            raise ValueError(f"num_cayley_neumann_terms is an integer >= 2 (with 1 the series is I and R never "
                             f"moves), got {self.num_cayley_neumann_terms!r}")
        if self.coft and not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"coft needs eps > 0 (how far each block may rotate), got eps={self.eps!r}")
        check_layer_selection(self)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.use_cayley_neumann:
            # peft 0.18 changed its Neumann series (to the one computed here) and warns that a file
            # saved by an older or unnamed version may mean another rotation: this one says it does not.
            out["peft_version"] = NEUMANN_SERIES_SINCE
        return out


NEUMANN_SERIES_SINCE = "0.18.0"


# -- the rotation ---------------------------------------------------------------------------------
@index_cache
def upper_indices(block_size: int, device: torch.device) -> torch.Tensor:
    """(rows, cols) of the entries above the diagonal of a b x b matrix, made once per size and device (eager)."""
    return torch.triu_indices(block_size, block_size, 1, device=device)


def skew_symmetric(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q`` (n, b, b) with ``Q^T = -Q`` from its entries above the diagonal, ``upper`` (n, b(b-1)/2)."""
    rows, cols = upper_indices(block_size, upper.device)
    q = upper.new_zeros(upper.shape[0], block_size, block_size)
    q[:, rows, cols] = upper
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Rotations (n, b, b) from skew-symmetric ``q`` (n, b, b): exactly ``(I - Q)(I + Q)^{-1}`` when
    ``neumann_terms`` is None, else peft's series for ``(I + Q)(I - Q)^{-1}`` (module docstring)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)  # X (I + Q) = I - Q
    if neumann_terms == 2:
        return eye + 2 * q
    series, power = eye + q, q
    for _ in range(max(2, neumann_terms - 2) - 1):  # I + Q + ... + Q^m, the series of (I - Q)^{-1}
        power = power @ q
        series = series + power
    return (eye + q) @ series  # m matrix products in all, as many as peft's


def rotate(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``t @ diag(blocks)`` along the last axis: ``t`` (..., r b), ``blocks`` (r, b, b). Each slice
    of ``b`` features is multiplied by its own block, without building the (d, d) matrix."""
    r, b, _ = blocks.shape
    if t.shape[-1] != r * b:
        raise ValueError(f"OFT rotates vectors of size {r * b} ({r} blocks of {b}); got an input whose last "
                         f"dimension is {t.shape[-1]}")
    return torch.einsum("...rk,rkc->...rc", t.reshape(*t.shape[:-1], r, b), blocks).reshape(t.shape)


class BlockRotation(nn.Module):
    """One adapter's ``R = diag(R_1, ..., R_r)`` on one layer; ``weight`` (r or 1, b(b-1)/2) holds
    the ``Q_i`` (one row shared by every block with ``block_share``), under peft's name."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.blocks, self.block_size = blocks, block_size
        self.weight = nn.Parameter(torch.zeros(1 if config.block_share else blocks, block_size * (block_size - 1) // 2))
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.coft_eps = config.eps if config.coft else None
        self.module_dropout = config.module_dropout

    def matrices(self, in_forward: bool = True) -> torch.Tensor:
        """The blocks (r, b, b). In a forward, COFT's projection is written into ``weight`` (as in
        peft: the optimizer then steps from the projected point) and, in training, some blocks are
        replaced by ``I`` (module_dropout); a merge computes from a projected copy and drops nothing."""
        weight = self.weight
        if self.coft_eps is not None:
            if in_forward:
                with torch.no_grad():
                    weight.copy_(self.projected())
            else:
                weight = self.projected()
        stored = cayley(skew_symmetric(weight, self.block_size), self.neumann_terms)
        if in_forward and self.training and self.module_dropout > 0 and len(stored) > 1:
            # Exactly int(p r) blocks become I, at positions drawn afresh in each call.
            dropped = torch.randperm(len(stored), device=stored.device)[: int(self.module_dropout * len(stored))]
            stored = stored.index_copy(0, dropped, torch.eye(self.block_size, dtype=stored.dtype,
                                                             device=stored.device).expand(len(dropped), -1, -1))
        return stored.expand(self.blocks, -1, -1)  # a shared block repeated (a view, no copy)

    @torch.no_grad()
    def projected(self) -> torch.Tensor:
        """COFT: ``weight`` with each ``Q_i`` scaled down to ``||Q_i||_F <= eps / sqrt(stored blocks)``."""
        limit = self.coft_eps / math.sqrt(self.weight.shape[0])
        norms = skew_symmetric(self.weight, self.block_size).flatten(1).norm(dim=1, keepdim=True)  # (n, 1)
        return self.weight * torch.where(norms > limit, limit / norms, torch.ones_like(norms))


def nearest_divisor(size: int, value: int) -> int:
    """peft's choice when ``value`` (a block size or count) does not divide ``size``: the closer of
    the divisors just below and just above it, the lower one on a tie; ``size`` when larger."""
    if value >= size:
        return size
    lower = next(v for v in range(value, 0, -1) if size % v == 0)
    higher = next(v for v in range(value, size + 1) if size % v == 0)
    return lower if value - lower <= higher - value else higher


# -- the layers (the forward, merging and their order are weight_transform.py's: M = R^T) ----------
class OFTLayer(InputTransformLayer):
    """OFT around a linear layer (``nn.Linear``, GPT-2's ``Conv1D``): the input rotated by each
    active adapter's ``R`` (``x M^T = x R``)."""

    adapter_layer_names = ("oft_R",)
    other_param_names = ("r", "oft_block_size")
    adapter_key_name = "r"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        setattr(self, self.adapter_layer_names[0], nn.ModuleDict())
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: OFTConfig, key: str) -> None:
        d = self.transformed_size()
        asked, field = (config.r, "r") if config.r else (config.oft_block_size, "oft_block_size")
        value = nearest_divisor(d, asked)
        if value != asked:
            warnings.warn(f"OFT on {key!r}: {field}={asked} does not divide its size {d}; using {field}={value}")
        blocks, block_size = (value, d // value) if field == "r" else (d // value, value)
        if block_size == 1:
            warnings.warn(f"OFT on {key!r}: its blocks are 1 x 1 (size {d}, {blocks} blocks), which hold no "
                          "parameter, so this layer's adapter stays the identity; choose a block size that divides "
                          f"{d} and is at least 2")
        rotation = BlockRotation(blocks, block_size, config)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        getattr(self, self.adapter_layer_names[0])[adapter_name] = rotation
        self.r[adapter_name], self.oft_block_size[adapter_name] = blocks, block_size
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def rotation(self, adapter_name: str, in_forward: bool = True) -> torch.Tensor:
        """Adapter ``adapter_name``'s blocks of ``R`` (r, b, b) (``BlockRotation.matrices``)."""
        return getattr(self, self.adapter_layer_names[0])[adapter_name].matrices(in_forward)

    def apply_map(self, t: torch.Tensor, adapter_name: str, transpose: bool, inverse: bool = False,
                  in_forward: bool = True) -> torch.Tensor:
        """``t M`` with ``M = R^T``: ``t R^T`` block by block, ``t R`` with ``transpose``; the inverse
        blocks with ``inverse`` (exact also for the Neumann form, which is not quite orthogonal)."""
        blocks = self.rotation(adapter_name, in_forward)
        if inverse:
            blocks = torch.linalg.inv(wide(blocks))
        blocks = blocks if transpose else blocks.transpose(-2, -1)
        dtype = torch.promote_types(t.dtype, blocks.dtype)
        return rotate(t.to(dtype), blocks.to(dtype))


class OFTConv(InputTransformConv, OFTLayer):
    """OFT around ``nn.Conv1d/2d/3d``: the kernel's rows rotated, ``W R^T``, and the layer's own
    convolution run with them."""


class OFTEmbedding(OFTLayer):
    """OFT around ``nn.Embedding``: each looked-up vector rotated, ``E[ids] R``; merged ``E' = E R``
    (the table's rows are the vectors rotated, so here ``M^T = R`` acts on the rows too)."""

    adapter_layer_names = ("oft_embedding_R",)

    def transformed_size(self) -> int:
        return self.get_base_layer().embedding_dim

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._mapped_input)

    def weight_times(self, weight: torch.Tensor, name: str, inverse: bool = False, in_forward: bool = False):
        return self.apply_map(weight, name, transpose=True, inverse=inverse, in_forward=in_forward)


SUPPORTED = "nn.Linear, transformers' GPT-2 Conv1D, nn.Conv1d/2d/3d and nn.Embedding"


def wrap_module(target: nn.Module, adapter_name: str, config: OFTConfig, key: str) -> OFTLayer:
    """Build the OFT wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    base = innermost(target)
    if isinstance(base, nn.Linear) or is_gpt2_conv1d(base):
        layer = OFTLayer(target, fan_in_fan_out=linear_weight_layout(base, config, key))
    elif isinstance(base, nn.Embedding):
        layer = OFTEmbedding(target)
    else:
        layer = OFTConv(target)
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: OFTConfig, key: str) -> None:
    """The errors adding OFT to ``target`` would meet, raised before the model is changed."""
    base = innermost(target)
    if not isinstance(base, (nn.Linear, *CONVOLUTIONS, nn.Embedding)) and not is_gpt2_conv1d(base):
        raise ValueError(f"cannot apply OFT to {key!r}: it is a {type(base).__name__}; OFT supports {SUPPORTED}")
    refuse_wrapped_convolution(target, base, OFTConv, "OFT", key)

"""BOFT: orthogonal fine-tuning with butterfly factorisation (Liu et al., ICLR 2024), in peft's layout.

OFT rotates a frozen weight by a block-diagonal orthogonal matrix, whose blocks never mix features
of different blocks. BOFT makes the rotation dense with few parameters: it multiplies ``m``
block-diagonal rotations, each seen through a fixed permutation of the features, like the stages
of a fast Fourier transform ("butterfly"), and scales each output feature by a learned ``s``:

    R = F_{m-1} ... F_1 F_0,      F_i = P_i B_i P_i^T,      y = s * ((x R) W^T) + b,      x: (..., d)

so ``W' = diag(s) W R^T``. Each ``B_i`` is block diagonal, ``D`` blocks of ``b x b`` (``D b = d``),
each block the exact Cayley transform ``(I - Q)(I + Q)^{-1}`` of a skew-symmetric ``Q`` (OFT's
``cayley``), and ``P_i`` is a permutation matrix (``P[k, perm[k]] = 1``). With one factor
(``boft_n_butterfly_factor=1``) BOFT is OFT with the scale ``s``.

The permutations. ``P_0 = I``. For ``i >= 1`` the features fall into groups of ``b 2^i``, each cut
into ``2^(i+1)`` chunks of ``b / 2``; ``P_i^T`` puts the even chunks of a group first, then the
odd ones (peft's ``block_butterfly_perm``). A block of ``B_i`` so holds half of one block of the
previous factor's reach and half of its neighbour's: after ``m`` factors every feature of a group
of ``b 2^(m-1)`` can reach every other, from ``m D b^2`` parameters. This needs ``b`` even and
``D`` a multiple of ``2^(m-1)`` (refused otherwise, with the values that work).

The forward never builds a (d, d) matrix: ``t P`` is a gather of ``t``'s features and ``t B_i`` a
block-by-block product, so ``x R`` costs ``O(tokens d b m)``. (peft builds each ``P_i B_i P_i^T``
by two (d, d) products and ``R`` by ``m - 1`` more, ``O(m d^3)`` per layer and forward.)

``boft_dropout`` (training only, peft's multiplicative dropout): in each forward one factor is
chosen at random, and ``int(p D)`` of its blocks, chosen at random, are replaced by ``I``; the
random draws are peft's, so one seed drops the same blocks in both (with one active adapter per
layer: of several, peft draws for the first first, minipeft for the one it applies first, the
last on a linear layer and the first on a convolution).

Initialisation: ``Q = 0`` and ``s = 1``, the unchanged model; ``init_weights=False`` draws the
stored ``R`` (whose skew part is ``Q``) from N(0, 0.1^2) and ``s`` from N(1, 0.1^2), as peft.

peft builds the butterfly only when its CUDA extension compiles; elsewhere (a CPU, no ninja) it
sets ``boft_n_butterfly_factor`` to 1 with a warning, keeps the configured value in the saved
config, and saves tensors for one factor. minipeft computes every factor on any device. A file
whose tensors hold one factor while its config asks for more is such a file: it loads as one
factor, with a warning (``fit_factor_count``). The other way round, a minipeft file with several
factors loads in peft only where its extension builds (elsewhere peft expects one factor's tensors
and stops with a size mismatch).

Layers: ``nn.Linear`` and ``nn.Conv2d`` as in peft (the flattened kernel, ``d = in x kh x kw``);
GPT-2's ``Conv1D``, ``nn.Conv1d/3d``, dilated and grouped convolutions too. The forward, merging and
the order of several adapters are ``weight_transform.py``'s, with ``M = R^T``. Checkpoints:
``<layer>.boft_R`` (m, D, b, b) and ``<layer>.boft_s`` ((out, 1); (1, out) on a convolution),
peft's keys and shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, check_probability, is_positive_int
from ..targeting import CONVOLUTIONS, innermost, is_gpt2_conv1d, linear_weight_layout
from .base import wide
from .oft import cayley, rotate
from .weight_transform import InputTransformConv, InputTransformLayer, index_cache, refuse_wrapped_convolution


@dataclass
class BOFTConfig(PeftConfig):
    """BOFT hyper-parameters, with peft's field names, meanings and defaults.

    boft_block_size / boft_block_num: the size ``b`` of each orthogonal block, or the number ``D``
        of blocks per factor; give one of the two (the other 0), ``D b`` is the layer's input size.
    boft_n_butterfly_factor: the number ``m`` of butterfly factors (1: OFT with a scale).
    boft_dropout: the fraction of one factor's blocks replaced by ``I`` in each training forward.
    init_weights: True starts at ``R = I``, ``s = 1`` (the base model); False draws both (for tests).
    bias: which biases train, ``"none"``, ``"all"`` or ``"boft_only"`` (those of BOFT's layers).
    fan_in_fan_out: weights stored ``(in, out)``; set automatically for GPT-2's Conv1D.
    target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as for LoRA.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOFT
        for name in ("boft_block_size", "boft_block_num"):
            if not is_positive_int(getattr(self, name)) and getattr(self, name) != 0:
                raise ValueError(f"BOFT's {name} is a positive integer, or 0 to derive it from the other one; "
                                 f"got {name}={getattr(self, name)!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                "give BOFT either boft_block_size (the size of each block) or boft_block_num (blocks per factor), "
                "and set the other to 0, since their product is the layer's input size; got "
                f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}"
            )
        if not is_positive_int(self.boft_n_butterfly_factor):
            raise ValueError(f"boft_n_butterfly_factor is the number of butterfly factors, a positive integer "
                             f"(1 is OFT); got {self.boft_n_butterfly_factor!r}")
        check_probability(self, "boft_dropout", "a fraction of blocks", one_allowed=True)
        check_bias(self, "boft_only")
        check_layer_selection(self)


# -- the butterfly ------------------------------------------------------------------------------
@index_cache
def butterfly_permutation(size: int, block_size: int, factor: int, device: torch.device) -> torch.Tensor:
    """``perm`` of factor ``factor``, with ``P[k, perm[k]] = 1`` (module docstring): in each group of
    ``b 2^i`` features, chunk ``order[c]`` of ``b / 2`` features moves to place ``c``, the even chunks
    first. The identity for factor 0."""
    if factor == 0:
        return torch.arange(size, device=device)
    half, group = block_size // 2, block_size * 2**factor
    chunks = torch.arange(2 ** (factor + 1))
    order = torch.cat([chunks[0::2], chunks[1::2]])
    within = (order[:, None] * half + torch.arange(half)).flatten()  # (group,)
    return (torch.arange(0, size, group)[:, None] + within).flatten().to(device)


@index_cache
def inverse_permutation(size: int, block_size: int, factor: int, device: torch.device) -> torch.Tensor:
    return torch.argsort(butterfly_permutation(size, block_size, factor, device))


def butterfly_fits(size: int, block_size: int, factors: int) -> bool:
    """Whether ``factors`` butterfly factors fit blocks of ``block_size`` on ``size`` features: one
    always does; more need an even block size and a block count divisible by ``2^(factors - 1)``."""
    blocks = size // block_size
    return factors == 1 or (block_size % 2 == 0 and blocks % 2 ** (factors - 1) == 0)


def check_butterfly(size: int, block_size: int, factors: int, key: str) -> None:
    """Refuse a butterfly that does not fit, naming the settings that would."""
    if butterfly_fits(size, block_size, factors):
        return
    most = max(m for m in range(1, factors) if butterfly_fits(size, block_size, m))
    sizes = [b for b in range(2, size + 1) if size % b == 0 and butterfly_fits(size, b, factors)]
    other = (f", or for {factors} factors boft_block_size one of {sizes}" if sizes else
             f"; no block size gives {factors} factors here (the size would have to be a multiple of {2 ** factors})")
    raise ValueError(
        f"BOFT on {key!r}: {factors} butterfly factors need an even block size and a number of blocks divisible by "
        f"2^{factors - 1} = {2 ** (factors - 1)}; got {size // block_size} blocks of {block_size} (size {size}). "
        f"Use boft_n_butterfly_factor <= {most} with these blocks{other}"
    )


def block_count(size: int, config: BOFTConfig, key: str) -> tuple[int, int]:
    """``(D, b)`` for a layer of input size ``size``: peft requires the given one to divide it."""
    given, field = ((config.boft_block_size, "boft_block_size") if config.boft_block_size
                    else (config.boft_block_num, "boft_block_num"))
    if size % given:
        divisors = [v for v in range(1, size + 1) if size % v == 0]
        raise ValueError(f"BOFT on {key!r}: {field}={given} does not divide its size {size}; "
                         f"use one of {divisors[:12]}{' ...' if len(divisors) > 12 else ''}")
    return (size // given, given) if field == "boft_block_size" else (given, size // given)


# -- the layers (the forward, merging and their order are weight_transform.py's: M = R^T) ---------
class BOFTLayer(InputTransformLayer):
    """BOFT around a linear layer (``nn.Linear``, GPT-2's ``Conv1D``): the input multiplied by each
    active adapter's ``R``, the output (less the bias) by its ``s``."""

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")
    adapter_key_name = "boft_block_size"
    scale_names = ("boft_s",)
    scales_outputs = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}

    def scale_shape(self, out_features: int) -> tuple[int, int]:
        return (out_features, 1)  # peft's shape on a linear layer

    def update_layer(self, adapter_name: str, config: BOFTConfig, key: str) -> None:
        d, factors = self.transformed_size(), config.boft_n_butterfly_factor
        blocks, block_size = block_count(d, config, key)
        check_butterfly(d, block_size, factors, key)
        rotations = torch.zeros(factors, blocks, block_size, block_size)
        weight = self.get_base_layer().weight
        scale = torch.ones(self.scale_shape(weight.shape[1] if self.fan_in_fan_out else weight.shape[0]))
        if not config.init_weights:
            nn.init.normal_(rotations, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name], self.boft_s[adapter_name] = nn.Parameter(rotations), nn.Parameter(scale)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = block_size, blocks
        self.boft_dropout[adapter_name] = config.boft_dropout
        self.place_adapter(adapter_name, weight)

    def output_scale(self, adapter_name: str) -> torch.Tensor:
        return self.boft_s[adapter_name].flatten()

    def factor_blocks(self, adapter_name: str, in_forward: bool) -> torch.Tensor:
        """The blocks of ``B_0 ... B_{m-1}``, (m, D, b, b), orthogonal; in a training forward, with
        ``boft_dropout``'s blocks replaced by ``I``, drawn as peft draws them."""
        stored = self.boft_R[adapter_name]
        m, blocks, b, _ = stored.shape
        # its skew part is Q; solved in fp32 at least (no half-precision solve in torch), as peft does
        rotations = cayley(wide(0.5 * (stored - stored.transpose(-2, -1))), None).to(stored.dtype)
        p = self.boft_dropout[adapter_name]
        if in_forward and self.training and p > 0:
            factor = int(torch.randint(0, m, (1,)))
            # peft shuffles int(p D) ones among D positions: block j drops where perm[j] < int(p D).
            # (Both draws from the CPU generator, as peft's, also for CUDA tensors.)
            dropped = (torch.randperm(blocks) < int(p * blocks)).to(stored.device)
            eye = torch.eye(b, dtype=rotations.dtype, device=rotations.device)
            rotations = rotations.clone()
            rotations[factor] = torch.where(dropped[:, None, None], eye, rotations[factor])
        return rotations

    def apply_map(self, t: torch.Tensor, adapter_name: str, transpose: bool, inverse: bool = False,
                  in_forward: bool = True) -> torch.Tensor:
        """``t M`` with ``M = R^T``; ``t R`` with ``transpose``, the inverses with ``inverse``.

        ``R = F_{m-1} ... F_0`` with ``F_i = P_i B_i P_i^T``, so ``t R`` applies ``F_{m-1}`` first
        and ``t R^T = t F_0^T ... F_{m-1}^T`` applies ``F_0`` first, with blocks transposed; the
        inverses (``M^{-1} = R^{-T}``, ``M^{-T} = R^{-1}``) take the inverse blocks, the other order.
        One factor: ``t P`` gathers the features by the inverse permutation, ``t B`` multiplies
        block by block, ``P^T`` gathers by the permutation."""
        blocks = self.factor_blocks(adapter_name, in_forward)
        if inverse:  # exact Cayley blocks are orthogonal; the inverse keeps merge/unmerge exact anyway
            blocks = torch.linalg.inv(wide(blocks))
        if not transpose:
            blocks = blocks.transpose(-2, -1)
        dtype = torch.promote_types(t.dtype, blocks.dtype)
        t, blocks = t.to(dtype), blocks.to(dtype)
        size, block_size = t.shape[-1], blocks.shape[-1]
        order = range(len(blocks)) if transpose == inverse else reversed(range(len(blocks)))
        for i in order:
            if i:  # P_0 = I
                t = t[..., inverse_permutation(size, block_size, i, t.device)]
            t = rotate(t, blocks[i])
            if i:
                t = t[..., butterfly_permutation(size, block_size, i, t.device)]
        return t


class BOFTConv(InputTransformConv, BOFTLayer):
    """BOFT around ``nn.Conv1d/2d/3d``: the kernel's rows, ``diag(s) W R^T``, and the layer's own
    convolution run with them."""

    def scale_shape(self, out_features: int) -> tuple[int, int]:
        return (1, out_features)  # peft's shape on a convolution


SUPPORTED = "nn.Linear, transformers' GPT-2 Conv1D and nn.Conv1d/2d/3d"


def wrap_module(target: nn.Module, adapter_name: str, config: BOFTConfig, key: str) -> BOFTLayer:
    """Build the BOFT wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    base = innermost(target)
    if isinstance(base, CONVOLUTIONS):
        layer = BOFTConv(target)
    else:
        layer = BOFTLayer(target, fan_in_fan_out=linear_weight_layout(base, config, key))
    layer.add_adapter(adapter_name, config, key)
    return layer


def check_target(target: nn.Module, config: BOFTConfig, key: str) -> None:
    """The errors adding BOFT to ``target`` would meet, raised before the model is changed."""
    base = innermost(target)
    if not isinstance(base, (nn.Linear, *CONVOLUTIONS)) and not is_gpt2_conv1d(base):
        raise ValueError(f"cannot apply BOFT to {key!r}: it is a {type(base).__name__}; BOFT supports {SUPPORTED}")
    refuse_wrapped_convolution(target, base, BOFTConv, "BOFT", key)
    size = base.weight[0].numel() if isinstance(base, CONVOLUTIONS) else (
        base.weight.shape[0] if is_gpt2_conv1d(base) else base.in_features)
    _, block_size = block_count(size, config, key)
    check_butterfly(size, block_size, config.boft_n_butterfly_factor, key)


def fit_factor_count(config: BOFTConfig, tensors: dict[str, torch.Tensor], source: str) -> BOFTConfig:
    """A file from peft without its CUDA extension: the config asks for ``m > 1`` factors, but peft
    trained and saved one (module docstring). Its tensors say so; it loads as one factor."""
    stored = {t.shape[0] for k, t in tensors.items() if k.endswith("boft_R") and t.dim() == 4}
    if config.boft_n_butterfly_factor > 1 and stored == {1}:
        warnings.warn(f"{source}: the config asks for boft_n_butterfly_factor={config.boft_n_butterfly_factor}, "
                      "but the tensors hold one factor: peft without its CUDA extension trains one factor whatever "
                      "the config says (it warned then). Loaded as boft_n_butterfly_factor=1, which is what was "
                      "trained", stacklevel=3)
        config.boft_n_butterfly_factor = 1
    return config


def read_factor_count(data: dict, source: str) -> dict:
    """A saved config whose ``boft_n_butterfly_factor`` is 0 or less: peft without its extension
    accepts one, and trains one factor whatever the value. It loads as one factor."""
    factors = data.get("boft_n_butterfly_factor", 1)
    if isinstance(factors, int) and not isinstance(factors, bool) and factors < 1:
        warnings.warn(f"{source}: boft_n_butterfly_factor={factors}, which peft without its CUDA extension trains "
                      "as one factor; loaded as boft_n_butterfly_factor=1", stacklevel=3)
        data = {**data, "boft_n_butterfly_factor": 1}
    return data

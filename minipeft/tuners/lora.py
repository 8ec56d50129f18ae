"""LoRA: Low-Rank Adaptation (Hu et al. 2021), with rsLoRA scaling and DoRA.

A frozen linear map ``W`` (out x in) is adapted by a trainable low-rank update:

    y = W x + b + s * B A dropout(x),      A: (r, in),  B: (out, r),  s = alpha / r

``A`` starts Kaiming-uniform and ``B`` at zero, so the adapted model equals the base model
at initialisation. rsLoRA (Kalajdzievski 2023) uses ``s = alpha / sqrt(r)`` so the update's
scale does not shrink as the rank grows. DoRA (Liu et al. 2024) splits the adapted weight
into a direction and a trainable per-row magnitude ``m``:

    W' = m * (W + s B A) / ||W + s B A||_row

W is the base weight without other adapters merged into it (``dora_base_weight``). A row is
one output unit: a row of a linear weight, an output channel's whole kernel of a convolution,
and, for an embedding, one of the ``dim`` features across the whole vocabulary (a column of the
table; peft's choice, so that one token's lookup is rescaled feature by feature).

Because ``B A`` is a matrix of the same shape as ``W``, the update can be folded into the
weight (``merge``) for inference at zero cost and taken out again (``unmerge``).

With ``lora_bias=True`` (peft's option, e.g. for adapters extracted from a full fine-tune whose
biases changed too) B is an affine map with its own trainable bias ``b_B`` (out,), scaled with
the rest of the update and folded into the base bias on merge:

    y = W x + b + s * (B A dropout(x) + b_B),       merged:  W + s B A,  b + s b_B

Adapters combine into a new one, a weighted sum of their updates ``s_i B_i A_i``
(``PeftModel.add_weighted_adapter``): that is in ``lora_combine.py``. PiSSA and OLoRA start A and
B on a decomposition of ``W`` and leave the residual in the base layer: ``lora_init.py``. EVA
starts A on the principal directions of each layer's inputs, measured on data: ``lora_eva.py``.

Parameter names match peft's: ``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``,
``lora_B.<adapter>.bias``, ``lora_embedding_A.<adapter>``, ``lora_magnitude_vector.<adapter>.weight``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    PeftConfig, PeftType, check_bias, check_layer_selection, check_number, check_probability, is_positive_int,
    pattern_value,
)
from ..targeting import CONVOLUTIONS, innermost, is_gpt2_conv1d, linear_weight_layout, wrapper_chain
from . import lora_init, trainable_tokens
from .lora_loftq import loftq_init
from .quantized import dequantized_weight, linear_features, quantization
from .base import AdapterLayer, dropout_or_identity, embed_scale, plus, wide


@dataclass
class EvaConfig:
    """EVA's options (``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))``, as in peft;
    the method is in ``lora_eva.py``).

    rho: how far ranks may move between layers: a layer takes at most ``round(r * rho)``
        (``rho = 1``: every layer keeps r). Must be >= 1.
    tau: a direction has converged when its cosine similarity to the one found a batch earlier
        is at least tau (0 to 1).
    use_label_mask / label_mask_value: leave out the tokens whose label is ``label_mask_value``
        (-100: the padding and prompt tokens a language-model loss ignores).
    whiten: divide each direction by the square root of its singular value.
    adjust_scaling_factors: scale a layer's lora_alpha with its new rank (``alpha r' / r``), so
        that ``alpha / r`` and with it the update's scale stays the same.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        check_number("EvaConfig.rho", self.rho, "a number >= 1 (a layer may take up to round(r * rho) ranks; 1 keeps "
                     "every layer at r)", lambda v: v >= 1)
        check_number("EvaConfig.tau", self.tau, "a cosine similarity between 0 and 1", lambda v: 0 <= v <= 1)
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EvaConfig.{name} must be True or False, not {getattr(self, name)!r}")
        if not isinstance(self.label_mask_value, int) or isinstance(self.label_mask_value, bool):
            raise ValueError(f"EvaConfig.label_mask_value must be an integer label, not {self.label_mask_value!r}")


@dataclass
class LoftQConfig:
    """LoftQ's options (``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``,
    as in peft; the method is in ``lora_loftq.py``).

    loftq_bits: the bits the base weight is quantized to, as bitsandbytes stores it: 4 (NF4, in
        blocks of 64) or 8 (int8 rows).
    loftq_iter: how many times to alternate quantizing and fitting the low-rank part (>= 1).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8) or isinstance(self.loftq_bits, bool):
            raise ValueError(f"LoftQConfig.loftq_bits is 4 (NF4) or 8 (int8), as bitsandbytes stores weights; "
                             f"got {self.loftq_bits!r}")
        if not is_positive_int(self.loftq_iter):
            raise ValueError(f"LoftQConfig.loftq_iter is a number of alternations, an int >= 1; got {self.loftq_iter!r}")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA hyper-parameters, with peft's field names and meanings.

    r: rank of the update. lora_alpha: numerator of the scaling ``alpha / r``.
    target_modules: names (exact or dotted suffix), a full-match regex, or ``"all-linear"``.
    rank_pattern / alpha_pattern: per-module overrides, ``{"regex": value}`` matched against the
    end of the qualified name. bias: which biases train (``"none"``, ``"all"``, ``"lora_only"``).
    init_lora_weights: ``True`` (Kaiming-uniform A, zero B), ``"gaussian"`` (normal A with std
    1/r, zero B), ``False`` (both random: the adapter changes the output from the start), or, for
    linear layers, ``"orthogonal"`` (both random with B A = 0; an even rank per layer) or
    ``"pissa"`` / ``"pissa_niter_<n>"`` / ``"olora"``: A and B start on the top-r
    SVD (PiSSA) or QR (OLoRA) part of W, which is subtracted from the base weight (lora_init.py),
    or ``"loftq"``: the base weight quantized, and A and B on what quantizing lost (for QLoRA on
    an nn.Linear; lora_loftq.py), or ``"eva"``: A on the principal directions of each layer's inputs, computed by
    ``initialize_lora_eva_weights(model, dataloader)`` after ``get_peft_model`` (lora_eva.py;
    until then, and on layers it does not cover, the init of ``True``).
    eva_config: EVA's options (EvaConfig; the defaults when ``init_lora_weights="eva"`` leaves it out).
    loftq_config: LoftQ's options (LoftQConfig; the defaults when ``init_lora_weights="loftq"``
        leaves it out).
    layer_replication: ranges ``[start, end)`` of the model's layers laid end to end, the copies
        sharing their weights, before the adapter is added (layer_replication.py).
    lora_bias: give B a trainable bias ``b_B`` (out,), so the update is ``s (B A x + b_B)``; it starts
    at zero (random with ``init_lora_weights=False``) and merges into the base bias. Linear, Conv1D
    and conv layers only; not with DoRA, nor with inits other than True and False (peft's rules).
    trainable_token_indices: also train these rows of an embedding table (trainable_tokens.py): a
    list of token ids for the input embedding, or ``{embedding name: token ids}``.
    target_parameters: bare parameters to adapt, e.g. MoE experts' 3-D ``"mlp.experts.gate_up_proj"``,
    matched against ``<module>.<parameter>`` exactly or as a dotted suffix (lora_parameter.py); with
    them, ``target_modules=None`` means no module (recorded as ``[]``). Not with dropout, DoRA, lora_bias.
    use_fused_kernels: minipeft only, not saved: use the Triton path on CUDA when available.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    eva_config: EvaConfig | None = None
    loftq_config: LoftQConfig | None = None
    layer_replication: list[list[int]] | None = None
    use_fused_kernels: bool = True

    runtime_only_fields: ClassVar[tuple[str, ...]] = ("use_fused_kernels",)
    # lora_bias is easily confused with ``bias``, whose strings would all read as true.
    field_advice: ClassVar[dict[str, str]] = {
        "lora_bias": "it is a trainable bias on LoRA's B; to train the base model's biases use bias='all' or bias='lora_only'",
        "target_parameters": "a regex is not supported here, as in peft",
        "init_lora_weights": f"use one of {lora_init.INIT_CHOICES}",
    }

    def __post_init__(self) -> None:
        # Token ids as a tensor, an array or numpy ints become a list before the type check.
        self.trainable_token_indices = trainable_tokens.normalize_lora_token_indices(self.trainable_token_indices)
        if isinstance(self.layer_replication, (list, tuple)):  # [(0, 4), (2, 5)] as JSON holds it
            self.layer_replication = [list(pair) if isinstance(pair, (list, tuple)) else pair
                                      for pair in self.layer_replication]
        if self.loftq_config == {}:
            self.loftq_config = None  # (peft's default, written by every peft LoRA config)
        super().__post_init__()
        self.peft_type = PeftType.LORA
        for name, value in [("r", self.r), *self.rank_pattern.items()]:
            if not is_positive_int(value):
                raise ValueError(f"LoRA rank must be a positive integer, got {name}={value!r}")
        check_probability(self, "lora_dropout")
        check_bias(self, "lora_only")
        if self.lora_alpha == 0 and not self.inference_mode:  # (peft says nothing)
            warnings.warn("lora_alpha=0 scales every update by 0: the adapter changes nothing, and its factors get no "
                          "gradient (alpha is usually r or 2 r)", stacklevel=3)
        if self.init_lora_weights not in (True, False, "gaussian", lora_init.ORTHOGONAL, lora_init.EVA) and not \
                lora_init.base_changing_init(self.init_lora_weights):
            raise ValueError(f"init_lora_weights must be {lora_init.INIT_CHOICES}, got {self.init_lora_weights!r}")
        for init, name, default in ((lora_init.EVA, "eva_config", EvaConfig), (lora_init.LOFTQ, "loftq_config", LoftQConfig)):
            if self.init_lora_weights == init and getattr(self, name) is None:
                setattr(self, name, default())  # (peft warns of a missing eva_config, refuses a missing loftq_config)
            elif self.init_lora_weights != init and getattr(self, name) is not None:
                warnings.warn(f"{name} is used by init_lora_weights={init!r} only; with init_lora_weights="
                              f"{self.init_lora_weights!r} it changes nothing", stacklevel=3)
        # The same checks as peft, so that every config minipeft saves is one peft loads.
        if self.lora_bias and self.use_dora:
            raise ValueError(
                "lora_bias=True does not combine with use_dora=True (peft refuses it too): DoRA rescales the "
                "adapted weight's rows by m / ||W + s B A||, which leaves no place for a bias on B. "
                "Set use_dora=False or lora_bias=False"
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True works with init_lora_weights=True (the bias starts at zero) or False (random), "
                f"got {self.init_lora_weights!r}; peft refuses every other init with it, so a config holding both "
                "would not load there. Use init_lora_weights=True, or lora_bias=False"
            )
        check_layer_selection(self)
        if self.target_parameters is not None:
            from .lora_parameter import check_config  # late: lora_parameter builds on this file

            check_config(self)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["loftq_config"] is None:
            out["loftq_config"] = {}  # peft's "none", which peft writes
        return out

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Rank and alpha for the module named ``key``, after rank_pattern / alpha_pattern."""
        return pattern_value(self.rank_pattern, key, self.r), pattern_value(self.alpha_pattern, key, self.lora_alpha)


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude vector ``m`` (one entry per output row), stored as ``.weight``
    in peft's shape: (out,) for linear layers and embeddings, (1, out, 1, ...) for convolutions."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(AdapterLayer):
    """Bookkeeping shared by the LoRA wrappers: rank, scaling and dropout per adapter."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_fused_kernels")
    adapter_key_name = "r"  # every LoRA adapter here has a rank
    scale_names = ("lora_magnitude_vector",)
    supports_mixed_batch = True
    mergeable = True
    takes_quantized_base = True  # QLoRA (quantized.py)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_fused_kernels: dict[str, bool] = {}
        # The name rank_pattern and alpha_pattern are matched against: the target's, which for
        # the LoraLinear on an attention's out_proj is the attention's (hotswap.py reads it).
        self.pattern_key: str | None = None

    def update_layer(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        # Before anything changes: PiSSA/OLoRA rewrite the base weight. Asked of the module this layer
        # adapts, not of the layer: a LoraParameter is no target_modules target, but it is a LoraLayer.
        check_target(self.get_base_layer(), config, key)
        r, alpha = config.rank_and_alpha(key)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.pattern_key = key
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = dropout_or_identity(config.lora_dropout)
        self.use_dora[adapter_name] = config.use_dora
        self.use_fused_kernels[adapter_name] = config.use_fused_kernels
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            base = type(self.get_base_layer()).__name__
            warnings.warn(
                f"lora_bias=True on {key!r}, a {base} without bias: the adapter trains and runs, but cannot be "
                "merged, as there is no base bias to fold s * lora_B.bias into (peft warns the same)"
            )
        self.create_adapter(adapter_name, r, config.lora_bias)
        if lora_init.base_changing_init(config.init_lora_weights) and not quantization(self.get_base_layer()):
            # Factors from W itself, computed where W lives: put the adapter there first. (A
            # quantized base under LoftQ is its Q already, saved after LoftQ and loaded quantized:
            # the factors start as plain LoRA's, for a checkpoint's to replace.)
            self._move_adapter_to_base(adapter_name)
            self.init_from_base_weight(adapter_name, config.init_lora_weights, config.loftq_config)
        else:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            self._move_adapter_to_base(adapter_name)
        if config.use_dora:
            # ||W0 + s B A|| needs A and B on the base weight's device first (after PiSSA/OLoRA
            # it is ||W_res + s B0 A0|| = ||W||, the same magnitude as plain LoRA starts from;
            # after LoftQ ||Q + s B0 A0||, close to it).
            norm = self._row_norm(adapter_name, self.dora_base_weight())
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.detach().view(self.magnitude_shape))
            self._move_adapter_to_base(adapter_name)

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        """Create adapter ``adapter_name``'s factors of rank ``r`` (``bias``: B gets a bias, lora_bias)."""
        raise TypeError(f"{type(self).__name__} must define create_adapter")

    def reset_lora_parameters(self, adapter_name: str, init: bool | str) -> None:
        if init is False:
            return
        if adapter_name in self.lora_A:
            A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            if init == lora_init.ORTHOGONAL:
                with torch.no_grad():
                    A0, B0 = lora_init.orthogonal_factors(self.r[adapter_name], A.shape[1], B.shape[0])
                    A.copy_(A0)
                    B.copy_(B0)
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                # The same init nn.Linear gives its weight (He et al. with a = sqrt(5)).
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            if self.lora_B[adapter_name].bias is not None:
                nn.init.zeros_(self.lora_B[adapter_name].bias)  # so the update starts at zero
        if adapter_name in self.lora_embedding_A:
            # Embeddings swap the roles: A at zero, B normal, as an nn.Embedding is initialised.
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    @torch.no_grad()
    def init_from_base_weight(self, adapter_name: str, init: str, loftq: LoftQConfig | None = None) -> None:
        """PiSSA / OLoRA: A0, B0 from a decomposition of W, and W <- W - s B0 A0 (lora_init.py).
        The residual is computed from the factors as stored, so W_res + s B0 A0 = W holds for
        the adapter the forward will use. LoftQ: A0, B0 and W <- Q (lora_loftq.py)."""
        base, s = self.get_base_layer(), self.scaling[adapter_name]
        weight = self.as_rows(base.weight)  # (out, in): only linear layers get here
        if lora_init.base_changing_init(init) == lora_init.LOFTQ:
            A0, B0, quantized = loftq_init(weight, self.r[adapter_name], s, loftq.loftq_bits, loftq.loftq_iter)
            self.set_lora_factors(adapter_name, A0, B0)
            base.weight.copy_(self.from_rows(quantized, base.weight))
            return
        self.set_lora_factors(adapter_name, *lora_init.decompose(weight, self.r[adapter_name], s, init))
        A0, B0 = self.lora_factors(adapter_name)
        base.weight.copy_(self.from_rows(lora_init.residual(weight, A0, B0, s), base.weight))  # cast back to W's dtype

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        """Put the adapter beside the base weight (fp32 on a half-precision base: ``adapter_placement``)."""
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    # -- merging ------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update ``s * B A`` in the base weight's own layout, in at least fp32 (merging rounds the sum once)."""
        raise TypeError(f"{type(self).__name__} must define delta_weight")

    def delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """The bias update ``s * b_B`` (out,) in at least fp32, or None without lora_bias.
        Merging needs a base bias to add it to (see merge_blocker)."""
        bias = self.lora_B[adapter_name].bias if adapter_name in self.lora_B else None
        if bias is None:
            return None
        return self.scaling[adapter_name] * wide(bias)

    def merge_blocker(self, adapter_name: str) -> str | None:
        base = self.get_base_layer()
        has_lora_bias = adapter_name in self.lora_B and self.lora_B[adapter_name].bias is not None
        if has_lora_bias and getattr(base, "bias", None) is None:
            return (f"it trains a bias on lora_B (lora_bias=True), but this {type(base).__name__} has no bias to fold "
                    "s * lora_B.bias into; use the adapter unmerged (it computes the same), or train it with "
                    "lora_bias=False")
        return None

    def factor_parameters(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A and B parameters themselves, in the layout they are stored in."""
        if name in self.lora_A:
            return self.lora_A[name].weight, self.lora_B[name].weight
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s A (r, fan_in) and B (fan_out, r) as matrices whose product B A, times
        ``scaling``, is the update: conv kernels flattened to (r, in * k...) and (out, r); for an
        embedding B A is the (dim, num_embeddings) transpose of the table's update."""
        A, B = self.factor_parameters(name)
        return A.detach().flatten(1), B.detach().flatten(1)

    def set_lora_factors(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Overwrite adapter ``name``'s factors with matrices shaped as ``lora_factors`` gives them."""
        old_A, old_B = self.factor_parameters(name)
        with torch.no_grad():
            old_A.copy_(A.reshape(old_A.shape))
            old_B.copy_(B.reshape(old_B.shape))

    # -- rank padding (hot-swapping into a compiled model, hotswap.py) -------------------------
    # B A is a sum of rank-one terms, column k of B times row k of A. Terms with zero factors add
    # nothing, so an adapter grown to a higher rank by zeros computes the same update. A model
    # padded once to the largest rank it will serve takes in every smaller adapter, padded the
    # same way, without a tensor changing shape (which would recompile it).
    def padded_factors(self, A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``B``, in the layout their parameters have, grown to ``rank`` by zero terms.
        Here A's rank is its first dimension, B's its second."""
        return zero_padded(A, 0, rank), zero_padded(B, 1, rank)

    @torch.no_grad()
    def pad_rank(self, adapter_name: str, rank: int, use_rslora: bool) -> None:
        """Grow adapter ``adapter_name`` to rank ``rank`` by zero terms: the same update and the
        same scaling, in new parameters (an optimizer holding the old ones must be made again).
        lora_alpha becomes the alpha that gives that scaling at the new rank."""
        A, B = self.factor_parameters(adapter_name)
        padded = self.padded_factors(A.detach(), B.detach(), rank)  # A's and B's dtype and device
        bias = self.lora_B[adapter_name].bias if adapter_name in self.lora_B else None
        with torch.random.fork_rng(devices=[]):  # (the new parameters' random init is overwritten)
            self.create_adapter(adapter_name, rank, bias is not None)
        for new, value, old in zip(self.factor_parameters(adapter_name), padded, (A, B)):
            new.data = value  # (as Module.to() moves a parameter)
            new.requires_grad_(old.requires_grad)
        if bias is not None:
            self.lora_B[adapter_name].bias = bias  # (out,): no rank in it
        self.lora_alpha[adapter_name] = alpha_at_rank(self.lora_alpha[adapter_name], self.r[adapter_name], rank,
                                                      use_rslora)
        self.r[adapter_name] = rank

    # -- DoRA ---------------------------------------------------------------------------------
    # DoRA sees a weight (or an update) as a matrix whose rows it normalises, one row per entry
    # of m: `as_rows` gives that matrix from the layout the base stores, `from_rows` the inverse.
    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no DoRA")

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no DoRA")

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of DoRA's ``m`` as peft stores it (see DoraMagnitude)."""
        return (self.out_features,)

    def dora_base_weight(self) -> torch.Tensor:
        """W0, the base weight without the adapters merged into it, which DoRA's norms are taken
        of, so that merging another adapter changes no DoRA output and a new DoRA adapter starts
        as the identity (peft takes the weight as it stands, merges included). The live weight
        when nothing is merged; else computed once per merged state and kept (a copy of W)."""
        if not self.merged_adapters:
            return self.unmerged_base_tensors()["weight"]
        weight = self.get_base_layer().weight
        state = (tuple(self.merged_adapters), weight._version, weight.data_ptr(), weight.dtype)
        kept = self.__dict__.get("_dora_unmerged_weight")
        if kept is None or kept[0] != state:
            kept = self.__dict__["_dora_unmerged_weight"] = (state, self.unmerged_base_tensors()["weight"])
        return kept[1]

    def _row_norm(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + s B A||`` per row (rows,), in fp32; ``weight``: W as the base stores it."""
        return self.as_rows(wide(weight) + self.delta_weight(adapter_name)).norm(p=2, dim=1)

    def dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``m / ||W0 + s B A||_row`` (rows,) in ``dtype``, for the forward: the norm is a constant
        to autograd (DoRA section 4.3: it follows the update but passes no gradient). The
        product of ``lora_factors``' A and B is the update already laid out as rows."""
        A, B = self.lora_factors(name)  # detached
        weight = self.as_rows(self.dora_base_weight()).to(dtype)
        norm = (weight + self.scaling[name] * (B @ A).to(dtype)).norm(p=2, dim=1).detach()
        return self.lora_magnitude_vector[name].weight.reshape(-1).to(dtype) / norm

    def merge_is_addition(self, adapter_name: str) -> bool:
        return not self.use_dora[adapter_name]  # DoRA rescales rows by the weight's own norms

    def merge_order(self) -> list[str] | None:
        """A DoRA adapter rescales the output of the adapters the forward applies before it, so
        beside one, merges keep the active order (plain LoRA updates alone commute)."""
        active = [a for a in self.active_adapters if a in self.adapter_names]
        return active if any(self.use_dora[a] for a in active) else None

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        """The weight (and with lora_bias the bias) with adapter ``adapter_name`` folded in:

            LoRA:  W + s B A,   b + s b_B   (lora_bias; else b is unchanged)
            DoRA:  f * (W + s B A),   f = m / ||W0 + s B A||_row   (kept: unmerging divides by it)

        W is the weight as it stands, holding the adapters merged before this one; W0 the base
        weight without them, which DoRA's forward takes its norm of (``dora_base_weight``).
        """
        weight, delta = tensors["weight"], self.delta_weight(adapter_name)
        if not self.use_dora[adapter_name]:
            delta_bias = self.delta_bias(adapter_name)
            if delta_bias is None:
                return {"weight": plus(weight, delta)}, None
            return {"weight": plus(weight, delta), "bias": plus(tensors["bias"], delta_bias)}, None
        norm = self._row_norm(adapter_name, self.dora_base_weight())  # (rows,)
        factor = self.lora_magnitude_vector[adapter_name].weight.reshape(-1) / norm
        merged = factor.view(-1, 1) * self.as_rows(wide(weight) + delta)  # (rows, fan)
        return {"weight": self.from_rows(merged, weight).to(weight.dtype)}, factor

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        """The adapter taken out again: W - s B A (and b - s b_B); DoRA: W / f - s B A, with the
        row factor f that merging kept."""
        weight, delta = tensors["weight"], self.delta_weight(adapter_name)
        if not self.use_dora[adapter_name]:
            delta_bias = self.delta_bias(adapter_name)
            if delta_bias is None:
                return {"weight": plus(weight, delta, -1)}
            return {"weight": plus(weight, delta, -1), "bias": plus(tensors["bias"], delta_bias, -1)}
        unscaled = self.as_rows(wide(weight)) / kept.to(weight.device).view(-1, 1)  # (rows, fan); kept may predate a .to()
        return {"weight": self.from_rows(unscaled - self.as_rows(delta), weight).to(weight.dtype)}


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (``fan_in_fan_out``: weight stored (in, out))."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        out_features, in_features = linear_features(innermost(base_layer), fan_in_fan_out)
        super().__init__(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=bias)

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight as stored, (out, in) or with fan_in_fan_out (in, out), as (out, in)."""
        return weight.T if self.fan_in_fan_out else weight

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        return rows.T if self.fan_in_fan_out else rows

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (wide(B) @ wide(A)) * self.scaling[adapter_name]  # (out, in)
        return self.from_rows(delta)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        adapters = self.adapters_to_apply()
        if adapters and self._fused_path_applies(x, adapters):
            return self._fused_forward(x, adapters[0])
        result = self.base_layer(x, *args, **kwargs)
        return self.apply_adapters(result, x, self._add_term, adapters)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora[name]:
            return self._add_dora_term(result, x, name)
        return self._add_lora_term(result, x, name)

    def _add_lora_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result + s * ((dropout(x) A^T) B^T + b_B), without copying x and, when possible, in place
        (b_B: B's bias (out,) with lora_bias, else absent)."""
        dropout, s = self.lora_dropout[name], self.scaling[name]
        x = x if isinstance(dropout, nn.Identity) else dropout(x)
        A, B, b = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias
        if result.dtype == x.dtype and result.is_contiguous() and not result.is_nested:  # (a view needs rows)
            if A.dtype != x.dtype:
                # Cast the small (r x in) and (out x r) weights to the input's dtype, not x to fp32.
                A, B = A.to(x.dtype), B.to(x.dtype)
                b = None if b is None else b.to(x.dtype)
            xa = F.linear(x, A)  # (..., r)
            out2d, xa2d = result.view(-1, self.out_features), xa.reshape(-1, xa.shape[-1])
            if (result.dim() == 2 or not torch.is_grad_enabled()) and self.base_output_is_private():
                # Under autograd on result itself, not on a view of it: an in-place op on a view,
                # even one of the same shape, makes the backward clone and copy the whole output
                # gradient (CopySlices), three passes over an (M, out) tensor.
                rows = result if result.dim() == 2 else out2d
                rows.addmm_(xa2d, B.T, alpha=s)
                if b is not None:
                    rows.add_(b, alpha=s)  # (out,) broadcast over the rows
                return result
            # Under autograd, updating a view of (batch, seq, out) in place makes the backward
            # clone the whole output gradient (CopySlices); a fresh output is cheaper there.
            out2d = torch.addmm(out2d, xa2d, B.T, alpha=s)
            if b is not None:
                out2d.add_(b, alpha=s)  # in place is fine: addmm's backward does not read its output
            return out2d.view(result.shape)
        # Autocast (x in fp32, result in bf16): let autocast choose the matmul dtype.
        return result + s * F.linear(F.linear(x, A), B, b)

    def _add_dora_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """DoRA: y = (m/||W + sBA||) (W x + s B A x) + b, with the norm treated as a constant
        (DoRA section 4.3), written as a correction to the base output already computed."""
        dropout, s = self.lora_dropout[name], self.scaling[name]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        base = self.get_base_layer()
        scale = self.dora_scale(name, x.dtype)  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result if base.bias is None else result - base.bias
        else:
            x = dropout(x)
            weight = dequantized_weight(base) if quantization(base) else base.weight
            base_result = F.linear(x, self.as_rows(weight).to(x.dtype))
        lora_result = F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))
        # In the base output's dtype, as peft returns it (under autocast the terms are wider).
        return (result + (scale - 1) * base_result + scale * lora_result * s).to(result.dtype)

    # -- fused Triton path --------------------------------------------------------------------
    def _fused_path_applies(self, x: torch.Tensor, adapters: list[str]) -> bool:
        """The Triton path runs one plain LoRA adapter on a frozen CUDA nn.Linear; all else is reference."""
        if not (x.device.type in FUSED_DEVICE_TYPES and not x.is_nested and len(adapters) == 1
                and self.use_fused_kernels[adapters[0]]):
            return False
        base, dtype = self.base_layer, _kernel_dtype(x)
        if not _runs_plain_linear(base) or self.use_dora[adapters[0]]:
            return False
        # The kernels take one dtype for x, W and b. Under autocast that is autocast's, as for
        # F.linear: x is cast to it, and the frozen weights must be stored in it (a half-precision
        # model), since casting them on every call is a pass over W that the reference path
        # leaves to autocast.
        if dtype not in (torch.float16, torch.bfloat16, torch.float32) or base.weight.dtype != dtype or (
                base.bias is not None and base.bias.dtype != dtype):
            return False
        kernels = fused_kernels()
        if kernels is None or not (kernels.is_available() and kernels.enabled()):
            return False
        # Under deterministic algorithms, only where the fused function is cuBLAS alone: no
        # autotuned kernel (tiles picked by timing), no atomic adds.
        dropout = self.lora_dropout[adapters[0]]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        if torch.are_deterministic_algorithms_enabled() and not kernels.is_deterministic(
                x.shape[:-1].numel(), base.out_features, base.in_features, self.r[adapters[0]], p, dtype):
            return False
        # The kernels compute no gradient for W or b: a trainable base takes the reference path.
        # (fp32 runs too: the kernels round fp32 to TF32 exactly where torch's own matmuls do,
        # torch.backends.cuda.matmul.fp32_precision, so both paths compute the same function.)
        return not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        kernels = fused_kernels()
        x = x.to(_kernel_dtype(x))  # (under autocast, cast as F.linear would cast it; else x itself)
        base, dropout = self.base_layer, self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        A, B = self.lora_A[name].weight.to(x.dtype), self.lora_B[name].weight.to(x.dtype)
        y = kernels.lora_linear(x, base.weight, base.bias, A, B, self.scaling[name], p, self.training)
        b = self.lora_B[name].bias
        if b is None:
            return y
        # lora_bias: the kernels take only the frozen base bias (they compute no gradient for it),
        # so s * b_B (N,) is added to their output here, in place, one pass over y, and autograd
        # gives b_B its gradient s * dy summed over the rows.
        return y.add_(b.to(x.dtype), alpha=self.scaling[name])


def zero_padded(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` grown along ``dim`` to ``size`` entries, the new ones zero."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def alpha_at_rank(alpha: float, r: int, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives rank ``rank`` the scaling ``alpha`` gives rank ``r``:
    alpha' / rank = alpha / r, or alpha' / sqrt(rank) = alpha / sqrt(r) under rsLoRA."""
    if rank == r:
        return alpha
    return alpha * (math.sqrt(rank / r) if use_rslora else rank / r)


def _kernel_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused kernels would compute on x in: autocast's where autocast is on for x's
    device and would cast x (it casts fp32, fp16 and bf16, not fp64), x's own otherwise; None
    where torch cannot tell autocast's dtype per device (before 2.4)."""
    if not hasattr(torch, "get_autocast_dtype"):
        return None if torch.is_autocast_enabled() else x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _runs_plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` computes F.linear(x, weight, bias) and nothing else, which the
    kernels then compute in its place: an nn.Linear itself (a subclass, such as a QAT Linear,
    may compute otherwise), with no forward of its own set on it (accelerate's offloading) and
    no hooks, forward or backward, its own or torch's global ones, that the kernels would skip."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    everywhere = nn.modules.module
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and not any(getattr(module, name) for name in hooks)
            and not any(getattr(everywhere, "_global" + name) for name in hooks))


# Where the fused path runs: CUDA tensors. (Tests add "cpu" under TRITON_INTERPRET=1, whose
# interpreter runs the kernels on CPU tensors, to check the layer's whole route on a CPU.)
FUSED_DEVICE_TYPES = ("cuda",)

_kernels = None  # minipeft.kernels once looked up (False where it cannot be imported)


def fused_kernels():
    """minipeft.kernels, or None where it cannot be imported. The wheel installs kernels/ as
    minipeft.kernels; a source checkout put on sys.path without `pip install -e .` has kernels/
    beside minipeft/ instead, and then LoRA runs its reference path, after one warning. Looked up
    on the first forward on CUDA (importing triton takes a while) and kept in a global, not a
    functools.cache: torch.compile traces this on every LoRA layer, and it warns at cached functions."""
    global _kernels
    if _kernels is None:
        try:
            from .. import kernels as _kernels
        except ImportError as error:
            warnings.warn(f"minipeft.kernels cannot be imported ({error}); is minipeft used from a checkout without "
                          "`pip install -e .`? LoRA layers on CUDA run the pure-PyTorch reference path", stacklevel=2)
            _kernels = False
    return _kernels or None


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: the update ``s * (B A)^T`` is a (num_embeddings x dim) table.

    An embedding that scales its lookup (``embed_scale``, Gemma-3) returns ``c W[x]``; the LoRA
    term is scaled by ``c`` too, as peft does, so the adapted lookup is ``c (W + s (B A)^T)[x]``.
    That is what the merged table ``W + s (B A)^T`` gives under the module's own scaling, so
    merging needs no ``c``."""

    def __init__(self, base_layer: nn.Module) -> None:
        num_embeddings, dim = innermost(base_layer).weight.shape
        super().__init__(base_layer, num_embeddings, dim)

    # DoRA's rows are the table's columns: one magnitude per feature, over the whole vocabulary.
    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (dim, num_embeddings)

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.T

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        # bias is False here: check_target refuses lora_bias on embeddings (their factors are bare tables).
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (wide(B) @ wide(A)).T * self.scaling[adapter_name]  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        emb = self.get_base_layer()
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        # Look rows up in A^T (num_embeddings, r), then project up with B: (..., r) @ (r, dim). The
        # base's options apply, as in peft, but sparse: A is small, and a sparse gradient of the
        # transposed view A^T cannot be turned back into one of A.
        after_a = F.embedding(x, A.T, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq)
        term = (after_a @ B.T).to(result.dtype) * self.scaling[name]
        scale = embed_scale(emb)  # the base lookup in result already carries it
        if scale is not None:
            term = term * scale.to(result.dtype)
        if self.use_dora[name]:
            # DoRA: each feature of the adapted lookup, base and update, times m / ||W + s (B A)^T||
            # over that feature's column (an embedding has no dropout and no bias to leave out).
            dora = self.dora_scale(name, result.dtype)  # (dim,)
            return dora * result + dora * term
        return result + term


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: A is a conv with the base
    kernel down to r channels, B a 1x1 conv back up, so ``B A`` is again a kernel of the base's
    shape. DoRA's rows are the output channels, each with its whole kernel (in * k...).

    A grouped convolution (``groups = g``, a depthwise one included) gets peft's adapter: B is
    grouped too, its ``r / g`` channels per group back up to that group's outputs, while A reads
    every input channel. The update then mixes channels across groups, which the grouped kernel
    (out, in / g, k...) cannot hold: it trains, saves and loads, but does not merge (as in peft)."""

    def __init__(self, base_layer: nn.Module) -> None:
        conv = innermost(base_layer)
        super().__init__(base_layer, conv.in_channels, conv.out_channels)

    def as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)  # (out, in * k...)

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self.get_base_layer().weight.dim() - 2)  # peft's (1, out, 1, ...)

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        conv = self.get_base_layer()
        conv_cls = type(conv)
        ones = (1,) * len(conv.kernel_size)
        self.lora_A[adapter_name] = conv_cls(
            self.in_features, r, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            bias=False, padding_mode=conv.padding_mode,  # so that merging keeps the base's padding
        )
        self.lora_B[adapter_name] = conv_cls(r, self.out_features, ones, ones, groups=conv.groups,
                                             bias=bias)  # b_B: one per out channel

    def padded_factors(self, A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self.get_base_layer().groups
        if groups == 1:
            return super().padded_factors(A, B, rank)
        if rank % groups:
            raise ValueError(f"a LoRA rank on a convolution with groups={groups} is a multiple of {groups}; "
                             f"{rank} is not")
        # B (out, r / g, 1...) is grouped: output group j reads A's channels j r/g ... (j + 1) r/g - 1.
        # So each group's block of A's channels grows alone, and B's inputs per group.
        grouped_A = A.view(groups, A.shape[0] // groups, *A.shape[1:])
        return zero_padded(grouped_A, 1, rank // groups).flatten(0, 1), zero_padded(B, 1, rank // groups)

    def merge_blocker(self, adapter_name: str) -> str | None:
        groups = self.get_base_layer().groups
        if groups > 1:
            return (f"the convolution is grouped (groups={groups}) and LoRA's update reads every input channel, which "
                    "its grouped kernel cannot hold (peft cannot merge it either); use unload() to drop the adapter")
        return super().merge_blocker(adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.get_base_layer().groups > 1:
            raise TypeError(f"LoRA on a grouped convolution has no update of the kernel's shape: {self.merge_blocker(adapter_name)}")
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        # B: (out, r, 1, ...), A: (r, in, k, ...) -> (out, in, k, ...)
        return torch.einsum("or,ri...->oi...", wide(B.flatten(1)), wide(A)) * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        x_in = x if isinstance(dropout, nn.Identity) else dropout(x)
        A, B = self.lora_A[name], self.lora_B[name]
        # Cast the small kernels to the input's dtype, never the activation to fp32.
        xa = A._conv_forward(x_in, A.weight.to(x_in.dtype), None)
        b = None if B.bias is None else B.bias.to(x_in.dtype)  # lora_bias: s * b_B per output channel
        term = B._conv_forward(xa, B.weight.to(x_in.dtype), b) * self.scaling[name]
        if self.use_dora[name]:
            return self._add_dora_term(result, x, x_in, term, name)
        return result + term

    def _add_dora_term(self, result: torch.Tensor, x: torch.Tensor, x_in: torch.Tensor, term: torch.Tensor,
                       name: str) -> torch.Tensor:
        """DoRA, as for a linear layer with output channels for rows: y = f * (W * x + s B A x) + b,
        f = m / ||W + s B A|| per channel, as a correction to the base output (* the convolution)."""
        base = self.get_base_layer()
        channels = (-1,) + (1,) * (base.weight.dim() - 2)  # (out, 1, ...): over positions, batched or not
        f = self.dora_scale(name, x.dtype).view(channels)
        if x_in is x or not self.training:
            base_result = result if base.bias is None else result - base.bias.view(channels)
        else:  # the base term of the dropped input, as peft computes it (its padding mode kept)
            base_result = base._conv_forward(x_in, base.weight.to(x_in.dtype), None)
        # In the base output's dtype, as peft returns it (under autocast the terms are wider).
        return (result + (f - 1) * base_result + f * term).to(result.dtype)


def check_target(target: nn.Module, config: LoraConfig, key: str) -> None:
    """The errors adding the adapter to ``target`` (the module named ``key``, wrapped or not)
    would meet, raised before anything changes: a module whose parameters LoRA adapts already
    (target_parameters: those wrappers change a parameter, not the module's output), DoRA on a
    layer it does not cover (an nn.MultiheadAttention), lora_bias on an embedding, every reason an init that rewrites the
    base weight (PiSSA, OLoRA) cannot, a grouped convolution, and an nn.MultiheadAttention whose
    projections differ in width or with lora_bias. Injection runs it on every target first (through
    the registry's ``check``, ``check_module``), so that a model is never left with some weights
    rewritten and no adapter; ``update_layer`` runs it too, for callers other than injection."""
    from .lora_parameter import LoraParameter  # late: lora_parameter builds on this file

    if isinstance(target, LoraParameter):
        adapted = [w.parameter_name for w in wrapper_chain(target) if isinstance(w, LoraParameter)]
        raise ValueError(
            f"{key!r} is in target_modules, but its parameters {adapted[::-1]} are adapted through target_parameters "
            "already, by wrappers that change those parameters, not the module's output; leave it out of "
            "target_modules, and give this adapter target_parameters for those parameters instead"
        )
    base = innermost(target)
    if config.use_dora and not (isinstance(base, (nn.Linear, nn.Embedding, *CONVOLUTIONS)) or is_gpt2_conv1d(base)):
        raise TypeError(
            f"DoRA is implemented for linear layers, embeddings and convolutions (as in peft); {key!r} is a "
            f"{type(base).__name__}: leave it out of target_modules, or set use_dora=False"
        )
    if config.lora_bias and isinstance(base, nn.Embedding):
        raise ValueError(
            f"lora_bias=True on {key!r}, an nn.Embedding: LoRA's embedding factors are bare tables with no bias "
            "(peft refuses this too). Leave it out of target_modules (or list it in exclude_modules), or adapt it "
            "in a second adapter with lora_bias=False"
        )
    init = config.init_lora_weights
    if init == lora_init.ORTHOGONAL:
        if not (isinstance(base, nn.Linear) or is_gpt2_conv1d(base)):
            raise TypeError(
                f"init_lora_weights='orthogonal' is for linear layers (as in peft); {key!r} is a {type(base).__name__}. "
                "Target nn.Linear / Conv1D layers only, or adapt this one in a second adapter with init_lora_weights=True"
            )
        r = config.rank_and_alpha(key)[0]
        if r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' splits the rank into two halves and needs an even rank; "
                             f"{key!r} gets r={r} (from r or rank_pattern)")
    # (LoftQ on a quantized layer takes it for its Q as it is: update_layer leaves it alone.)
    if lora_init.base_changing_init(init) and not (quantization(base) and lora_init.base_changing_init(init) == lora_init.LOFTQ):
        if quantization(base):
            raise TypeError(
                f"init_lora_weights={init!r} rewrites the base weight from the full-precision one, and {key!r} is "
                f"stored {quantization(base)} (bitsandbytes) already; use init_lora_weights=True (QLoRA's), or "
                "initialise on the base loaded in 16 bits"
            )
        if not (isinstance(base, nn.Linear) or is_gpt2_conv1d(base)):
            raise TypeError(
                f"init_lora_weights={init!r} decomposes the weight of a linear layer; {key!r} is a "
                f"{type(base).__name__}. Target nn.Linear / Conv1D layers only, or adapt this one in a second adapter "
                "with init_lora_weights=True"
            )
        lora_init.check_decomposable(init, key, base.weight, config.rank_and_alpha(key)[0], is_gpt2_conv1d(base))
    if isinstance(base, nn.MultiheadAttention):
        if not base._qkv_same_embed_dim:
            raise ValueError(
                f"LoRA on {key!r}, an nn.MultiheadAttention, needs query, key and value of one width (kdim = vdim = "
                f"embed_dim: one (3E, E) in_proj_weight); it has kdim={base.kdim}, vdim={base.vdim}, "
                f"embed_dim={base.embed_dim} (peft refuses it too). Leave it out of target_modules"
            )
        if config.lora_bias:
            raise ValueError(
                f"lora_bias=True on {key!r}, an nn.MultiheadAttention: its LoRA lives in the weights, with no bias "
                "beside them to train; leave it out of target_modules, or adapt it with lora_bias=False"
            )
    if isinstance(base, CONVOLUTIONS) and base.groups != 1:
        # B is grouped (LoraConv): each group's r / g channels go back up to that group's outputs.
        r = config.rank_and_alpha(key)[0]
        if r % base.groups:
            raise ValueError(
                f"LoRA on {key!r}, a convolution with groups={base.groups}, needs a rank divisible by the groups (B is "
                f"grouped as the convolution is, as in peft); {key!r} gets r={r}: use a multiple of {base.groups} "
                "(rank_pattern for this layer), or leave it out of target_modules"
            )
        if config.use_dora:
            raise ValueError(f"DoRA on {key!r}, a convolution with groups={base.groups}: its norms are of the update's "
                             "kernel, which a grouped convolution's LoRA does not have; set use_dora=False for it")


SUPPORTED = "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and transformers' GPT-2 Conv1D"


def wrap_module(target: nn.Module, adapter_name: str, config: LoraConfig, key: str) -> LoraLayer:
    """Build the LoRA wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if isinstance(base, nn.Linear) or is_gpt2_conv1d(base):
        layer: LoraLayer = LoraLinear(target, fan_in_fan_out=linear_weight_layout(base, config, key))
    elif isinstance(base, nn.Embedding):
        layer = LoraEmbedding(target)
    elif isinstance(base, CONVOLUTIONS):
        layer = LoraConv(target)
    elif isinstance(base, nn.MultiheadAttention):
        from .lora_attention import LoraMultiheadAttention  # late: lora_attention builds on this file

        layer = LoraMultiheadAttention(target)
    else:
        raise _unsupported(base, key)
    layer.add_adapter(adapter_name, config, key)
    return layer


def _unsupported(base: nn.Module, key: str) -> ValueError:
    return ValueError(f"cannot apply LoRA to {key!r}: it is a {type(base).__name__}; LoRA supports {SUPPORTED}")


def check_module(target: nn.Module, config: LoraConfig, key: str) -> None:
    """The registry's check on each target, before any wrapper is built: a type LoRA supports
    (a wrapper may change its module as it is built: the attention's out_proj), then ``check_target``."""
    base = innermost(target)
    supported = (nn.Linear, nn.Embedding, *CONVOLUTIONS, nn.MultiheadAttention)
    if not isinstance(target, LoraLayer) and not (isinstance(base, supported) or is_gpt2_conv1d(base)):
        raise _unsupported(base, key)
    inner = [type(w).__name__ for w in wrapper_chain(target)
             if isinstance(w, AdapterLayer) and not isinstance(w, LoraLayer)]  # (not a TrainableTokensWrapper)
    if config.use_dora and inner:
        raise ValueError(
            f"cannot add a DoRA adapter around {key!r}: another method's layer ({inner[0]}) is inside it, whose "
            "unmerged update DoRA's row norms (read from the original weight) leave out and a merge would put in, "
            "so merging would change the model. Add the DoRA adapter first (other methods may then wrap it), or "
            "use plain LoRA"
        )
    check_target(target, config, key)


# -- the registry's hooks beyond check_module and wrap_module (tuners/__init__.py) -------------------
def check_model(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """The errors that need the whole model: trainable_token_indices' and target_parameters'."""
    from .lora_parameter import find_parameters

    trainable_tokens.check_token_targets(model, config, targets)
    if config.target_parameters:
        find_parameters(model, config, targets)


def wrap_more(model: nn.Module, config: LoraConfig, adapter_name: str, holders: dict, updated: list) -> list:
    """Wrappers beyond the targets: trainable tokens' layers, then one per adapted parameter."""
    from .lora_parameter import wrap_parameters

    plan = trainable_tokens.wrap_beside(model, config, adapter_name, holders, updated)
    if config.target_parameters:
        plan += wrap_parameters(model, config, adapter_name, [*holders, *(name for name, _, _ in plan)], updated)
    return plan

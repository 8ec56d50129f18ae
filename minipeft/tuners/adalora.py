"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al., ICLR 2023).

LoRA gives every layer the same rank. AdaLoRA starts every layer at ``init_r`` and, while
training, moves a total budget of ranks to where they matter, ending at ``target_r`` per layer
on average. To prune a rank it writes the update as a singular value decomposition:

    Delta W = s / (R + 1e-5) * P diag(E) Q,    P: (out, r) "lora_B",  E: (r,) "lora_E",  Q: (r, in) "lora_A"

``s = lora_alpha`` (not divided by r; the layer's rank where ``lora_alpha <= 0``, as in peft), ``R = init_r``
the rank the layer started at. Pruning the
i-th triplet (P[:, i], E[i], Q[i]) is setting E[i] = 0, which keeps P and Q intact for a triplet
that comes back. E starts at zero (so the update does), P and Q at N(0, 0.02^2); what pulls the
triplets towards singular vectors is an orthogonal regulariser added to the training loss,
``orth_reg_weight * mean over factors of ||Q Q^T - I||_F`` and ``||P^T P - I||_F``
(``add_orthogonal_regularization``, applied to a forward's ``outputs.loss`` as peft applies it,
but in training mode only, and also for a config without ``task_type``, whose forward peft 0.21
sends past AdaLoRA's, so that its losses there lack the regulariser).

Which triplets to keep is decided from how much the loss depends on them, smoothed over steps:
``adalora_budget.py`` (``RankAllocator``). A training loop calls
``peft_model.base_model.update_and_allocate(step)`` after each optimizer step, as with peft;
``minipeft.train`` passes the number of steps taken, 1 to total_step, which gives exactly
``tinit`` warm-up and ``tfinal`` fine-tuning steps (peft's example loops pass 0 to total_step - 1,
which prunes one step later). A loaded adapter whose ranks were allocated (a ``rank_pattern`` in
its config) fine-tunes at those ranks, without an allocator. Layers: nn.Linear, GPT-2's
Conv1D and nn.Conv2d (its kernel flattened to a matrix, as peft's SVDConv2d).

Checkpoints are peft's: ``<layer>.lora_A`` (r, in), ``lora_B`` (out, r), ``lora_E`` (r, 1), no
``.weight`` suffix. Once ranks have been allocated, ``rank_pattern`` holds, per layer, which
triplets survive (``{"<layer>.lora_E": [True, False, ...]}``); a checkpoint keeps only those (a
layer of rank ``sum(mask)``), and loading it builds each layer at that rank, with R = init_r.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, check_probability, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d, out_in_features
from .base import AdapterLayer, AddedUpdate, dropout_or_identity, wide

SUPPORTED = "nn.Linear, nn.Conv2d and transformers' GPT-2 Conv1D"
MASK_SUFFIX = ".lora_E"  # rank_pattern's keys: "<layer>.lora_E"


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA hyper-parameters, with peft's field names and meanings.

    init_r / target_r: every layer's starting rank, and the average rank the budget ends at.
    tinit / tfinal: steps of warm-up before any pruning, and of fine-tuning after the last.
    deltaT: prune every deltaT steps between the two.
    beta1 / beta2: smoothing of the importance (EMA) and of its uncertainty.
    orth_reg_weight: weight of the orthogonal regulariser in the loss.
    total_step: the number of training steps; the budget schedule is laid over them.
    rank_pattern: which triplets each layer keeps, written by the allocator (``{layer.lora_E: mask}``).
    lora_alpha: the scale s (the update is s / init_r times P diag(E) Q).
    r: unused (LoRA's rank; peft's AdaLoRA config carries it too, and ignores it).
    lora_dropout / target_modules / exclude_modules / layers_to_transform / layers_pattern /
    fan_in_fan_out / bias / modules_to_save / init_lora_weights: as for LoRA.
    use_rslora / lora_bias / alpha_pattern: not fields here. peft's AdaLoRA config inherits them
    and its layers ignore them; a peft file that sets them loads with a warning (``peft_ignores``).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    lora_alpha: float = 8
    r: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True

    # peft's AdaLoraConfig inherits these from its LoraConfig, but its SVD layers never read them
    # (the same outputs with or without them: tests/test_adalora.py).
    peft_ignores = ("use_rslora", "lora_bias", "alpha_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADALORA
        for name in ("init_r", "target_r", "deltaT"):
            if not is_positive_int(getattr(self, name)):
                raise ValueError(f"AdaLoRA's {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} is the average rank the budget shrinks to from init_r="
                             f"{self.init_r}; it cannot be larger")
        for name in ("tinit", "tfinal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} is a number of steps, >= 0; got {getattr(self, name)!r}")
        if not is_positive_int(self.total_step):
            raise ValueError(
                f"AdaLoRA lays its rank budget over the training steps: give total_step, the number of steps "
                f"(got {self.total_step!r})"
            )
        if self.tinit >= self.total_step - self.tfinal or self.total_step - self.tfinal < 2:
            raise ValueError(
                f"tinit={self.tinit} and tfinal={self.tfinal} leave no step to allocate ranks in (total_step="
                f"{self.total_step}): the budget shrinks between step tinit and step total_step - tfinal, and the "
                "final pruning needs the importance of a step before it"
            )
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} is an EMA coefficient in (0, 1), got {getattr(self, name)!r}")
        if self.r != 8:
            warnings.warn(f"AdaLoRA does not use r={self.r}: its layers start at init_r={self.init_r} (as in peft)")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        check_probability(self, "lora_dropout")
        check_bias(self, "lora_only")
        check_layer_selection(self)

    def rank(self, key: str) -> int:
        """The rank of the layer named ``key``: the triplets ``rank_pattern`` keeps, else init_r."""
        mask = (self.rank_pattern or {}).get(key + MASK_SUFFIX)
        return self.init_r if mask is None else sum(bool(m) for m in mask)


class SVDLinear(AddedUpdate, AdapterLayer):
    """AdaLoRA around an ``nn.Linear`` or GPT-2's ``Conv1D`` (``fan_in_fan_out``: weight (in, out))."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    scale_names = ("lora_E",)  # the singular values
    other_param_names = ("r", "lora_alpha", "scaling", "ranknum", "lora_dropout")
    adapter_key_name = "r"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = innermost(base_layer).weight
        # A convolution's kernel (out, in / groups, kh, kw) is adapted flattened: in = its other sides.
        self.out_features, self.in_features = out_in_features(weight.flatten(1), fan_in_fan_out)
        self.lora_A, self.lora_B, self.lora_E = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, key: str) -> None:
        r = config.rank(key)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(config.init_r)  # R: the rank the budget started from, also after pruning
        self.lora_dropout[adapter_name] = dropout_or_identity(config.lora_dropout)
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features))  # Q
        self.lora_E[adapter_name] = nn.Parameter(torch.zeros(r, 1))  # the singular values: a zero update
        self.lora_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))  # P
        std = 0.02 if config.init_lora_weights else 1.0  # False: everything N(0, 1), a non-zero update (tests)
        nn.init.normal_(self.lora_A[adapter_name], std=std)
        nn.init.normal_(self.lora_B[adapter_name], std=std)
        if not config.init_lora_weights:
            nn.init.normal_(self.lora_E[adapter_name])
        self.place_adapter(adapter_name, self.get_base_layer().weight)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s / (R + 1e-5) * P diag(E) Q`` in the base weight's layout, in at least fp32."""
        A, B, E = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        delta = wide(B) @ (wide(A) * wide(E)) * (self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5))
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B, E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        x_in = self.lora_dropout[name](x).to(A.dtype)
        scale = self.scaling[name] / (self.ranknum[name] + 1e-5)
        # (..., in) -> (..., r) -> (..., out) in the adapter's dtype, added and rounded once (as peft)
        return (result + (x_in @ (A * E).T @ B.T) * scale).to(result.dtype)


class SVDConv2d(SVDLinear):
    """AdaLoRA around an ``nn.Conv2d``: the update is the kernel flattened to a matrix,
    (out, in / groups * kh * kw), and runs as the layer's own convolution (stride, padding, ...)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update as a kernel, (out, in / groups, kh, kw), in at least fp32."""
        return super().delta_weight(adapter_name).reshape(self.get_base_layer().weight.shape)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        delta = self.delta_weight(name)
        x_in = self.lora_dropout[name](x).to(delta.dtype)
        conv = self.get_base_layer()
        return (result + conv._conv_forward(x_in, delta, None)).to(result.dtype)  # added, rounded once


def wrap_module(target: nn.Module, adapter_name: str, config: AdaLoraConfig, key: str) -> SVDLinear:
    """Build the AdaLoRA wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if isinstance(base, nn.Conv2d):
        layer = SVDConv2d(target)
    elif isinstance(base, nn.Linear) or is_gpt2_conv1d(base):
        config.fan_in_fan_out = is_gpt2_conv1d(base)  # as peft records it in the config it saves
        layer = SVDLinear(target, fan_in_fan_out=config.fan_in_fan_out)
    else:
        raise ValueError(f"cannot apply AdaLoRA to {key!r}: it is a {type(base).__name__}; AdaLoRA supports {SUPPORTED}")
    layer.add_adapter(adapter_name, config, key)
    return layer


# -- the pieces beyond the layers ------------------------------------------------------------------
def orthogonal_regularization(model: nn.Module, adapter_name: str) -> torch.Tensor | float:
    """``mean over the adapter's factors of ||Q Q^T - I||_F`` (each lora_A, (r, r)) and
    ``||P^T P - I||_F`` (each lora_B): zero when the rows of Q and the columns of P are orthonormal."""
    terms = []
    for module in model.modules():
        if isinstance(module, SVDLinear) and adapter_name in module.lora_A:
            for gram in (module.lora_A[adapter_name] @ module.lora_A[adapter_name].T,
                         module.lora_B[adapter_name].T @ module.lora_B[adapter_name]):
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)))
    return torch.stack(terms).mean() if terms else 0.0


def add_orthogonal_regularization(peft_model: nn.Module, adapter_name: str, config: AdaLoraConfig, outputs):
    """peft's AdaLoRA forward: a trainable adapter's regulariser goes into ``outputs.loss``, when the
    forward computed one (labels were given). Only in training mode: it is a training objective,
    and peft's adding it at eval too puts it into every evaluation loss (and perplexity) reported.
    ``outputs`` may be transformers' output, or a plain dict, namedtuple or dataclass with a ``loss``."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor) and peft_model.training and not config.inference_mode and config.orth_reg_weight > 0:
        loss = loss + config.orth_reg_weight * orthogonal_regularization(peft_model.get_base_model(), adapter_name)
        return _with_loss(outputs, loss)
    return outputs


def _with_loss(outputs, loss: torch.Tensor):
    """``outputs`` with ``loss`` in place of its own."""
    if isinstance(outputs, dict):  # a plain dict, or transformers' ModelOutput (a dict of its fields)
        outputs["loss"] = loss
        return outputs
    if hasattr(outputs, "_replace"):  # a namedtuple, which cannot be set
        return outputs._replace(loss=loss)
    if dataclasses.is_dataclass(outputs):  # frozen or not: a copy with the new loss
        return dataclasses.replace(outputs, loss=loss)
    outputs.loss = loss
    return outputs


def kept_triplets(config: AdaLoraConfig | None, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with each layer cut to the triplets ``rank_pattern`` keeps (peft's
    files hold those only). ``prefix``: what the keys carry before the layer's name."""
    if config is None or not config.rank_pattern:
        return tensors
    out = dict(tensors)
    for mask_key, mask in config.rank_pattern.items():
        layer = prefix + mask_key[: -len(MASK_SUFFIX)]
        keep = torch.tensor([bool(m) for m in mask])
        for name, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            key = f"{layer}.{name}"
            if key in out and out[key].shape[axis] == len(mask):  # full rank in memory: cut it
                out[key] = out[key][keep] if axis == 0 else out[key][:, keep]
    return out

"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort and Asano, ICLR 2024).

LoRA adapts a frozen linear map ``W`` (out x in) with a trained low-rank product ``B A``. VeRA
keeps the product but trains neither factor. It draws one pair of random matrices for the whole
model, freezes it, and learns only how strongly each layer uses each of its directions:

    A: (r, in_max)      B: (out_max, r)      frozen, Kaiming-uniform, drawn from a seed
    d: (r,)             b: (out,)            trained, one pair of vectors per adapted layer

A layer reads ``x`` of width ``n = in_features`` and writes ``m = out_features``. It uses the
top-left corner of the shared pair, ``A_n = A[:, :n]`` (r, n) and ``B_m = B[:m, :]`` (m, r);
that is why the pair is drawn at the largest input and output widths among the targets. With
``Lambda_d = diag(d)`` and ``Lambda_b = diag(b)`` (the paper's notation):

    y = W x + bias + Lambda_b B_m Lambda_d A_n dropout(x)

which is computed without forming a matrix, as two thin products and two scalings
(``*`` elementwise, broadcast over the leading batch dimensions):

    h = A_n dropout(x)      (..., n) -> (..., r)
    h = d * h               (..., r)
    u = B_m h               (..., r) -> (..., m)
    y = W x + bias + b * u  (..., m)

A layer trains ``r + m`` numbers where LoRA of rank ``r`` trains ``r (n + m)``, so VeRA affords
a much larger ``r`` (256 by default): each extra random direction costs one number per layer.

Initialisation: ``b = 0`` and ``d = d_initial`` (0.1), so the update is zero and the adapted
model starts as the base model. ``d`` is small but not zero so that ``b`` gets a gradient from
the first step (``dL/db = u * dL/dy``, and ``u`` vanishes with ``d``); ``d`` gets one as soon as
``b`` has moved. ``init_weights=False`` starts at ``b = 1``, ``d ~ N(0, 1)`` instead, a non-zero
update (for tests). The pair is drawn from a ``torch.Generator`` seeded with
``projection_prng_key``, ``A`` first, then ``B``, each uniform on ``[-sqrt(6 / fan_in),
+sqrt(6 / fan_in)]`` (He et al. for ReLU; ``fan_in`` is ``in_max`` for ``A`` and ``r`` for ``B``):
the same numbers as peft draws for the same key.

Merging. The update is the matrix ``Delta W = Lambda_b B_m Lambda_d A_n`` (m, n), so it folds into
the weight as LoRA's does (``W + Delta W``, transposed for GPT-2's (in, out) ``Conv1D``) and is
subtracted again to unmerge. Biases are left alone.

Several adapters. peft keeps one pair per model: a later adapter uses the pair the first one
drew, so it must have the same ``projection_prng_key``, ``save_projection`` and ``r``, and its
layers must fit inside the pair. minipeft applies the same rules (and says which one failed),
so every set of adapters it holds is one peft holds too, with the same numbers; each later
adapter keeps its own copy of them (``attach_projection`` says why).

Checkpoints, peft's layout: ``<layer>.vera_lambda_b`` (out,) and ``<layer>.vera_lambda_d`` (r,)
per layer; with ``save_projection=True`` (the default) also the pair, once, as
``base_model.vera_A`` (r, in_max) and ``base_model.vera_B`` (out_max, r), which makes the file
independent of how a platform's generator draws. With ``save_projection=False`` the pair is
drawn again from the key when the adapter is loaded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, check_bias, check_layer_selection, check_probability, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d, linear_weight_layout, out_in_features
from .base import AdapterLayer, AddedUpdate, adapter_placement, dropout_or_identity

SUPPORTED = "nn.Linear and transformers' GPT-2 Conv1D"


@dataclass
class VeraConfig(PeftConfig):
    """VeRA hyper-parameters, with peft's field names and meanings.

    r: number of shared random directions (rows of A, columns of B); 256 by default, as in peft.
    target_modules: linear layers to adapt (names exact or as a dotted suffix, a full-match regex,
        or ``"all-linear"``); None: peft's choice for the model's architecture (``architecture_targets.VERA``).
    projection_prng_key: seed of the generator that draws the shared pair A, B.
    save_projection: write A and B into the checkpoint (default), so that it loads to the same
        numbers on any platform; False keeps files small and redraws them from the key on load.
    vera_dropout: dropout on the input of the VeRA branch.
    d_initial: the starting value of every entry of d (b starts at zero).
    fan_in_fan_out: weights stored (in, out); set per layer automatically for GPT-2's Conv1D.
    bias: which base biases train with the adapter: ``"none"``, ``"all"`` or ``"vera_only"``
        (those of the adapted layers).
    modules_to_save: modules trained whole beside the adapter (e.g. a classifier head).
    init_weights: True starts at b = 0, d = d_initial (the base model); False at b = 1, d ~ N(0, 1).
    layers_to_transform / layers_pattern: adapt only the blocks with these indices (peft's rules).
    """

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    field_advice: ClassVar[dict[str, str]] = {"projection_prng_key": "it seeds the generator that draws the shared projections",
                                                "d_initial": "it is the starting value of the vector d"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.VERA
        if not is_positive_int(self.r):
            raise ValueError(f"VeRA's r must be a positive integer, got r={self.r!r}")
        check_probability(self, "vera_dropout")
        check_bias(self, "vera_only")
        check_layer_selection(self)
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: checkpoints will not hold VeRA's random matrices A and B; loading draws them "
                f"again from projection_prng_key={self.projection_prng_key}, which gives the same numbers only where "
                "torch's CPU generator draws as it did here. Keep save_projection=True for files that load the same "
                "everywhere",
                stacklevel=3,
            )


class VeraProjection(nn.Module):
    """An adapter's frozen random pair: ``vera_A`` (r, in_max) and ``vera_B`` (out_max, r).

    Buffers, not parameters: they never train, optimisers never see them, and
    ``get_nb_trainable_parameters`` does not count them (as in peft). With ``save_projection=False``
    they are non-persistent buffers, left out of every state dict and so out of the checkpoint.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, prng_key: int, saved: bool) -> None:
        super().__init__()
        self.register_buffer("vera_A", A, persistent=saved)
        self.register_buffer("vera_B", B, persistent=saved)
        self.prng_key = prng_key  # what it was drawn from; a later adapter must use the same key
        self.saved = saved

    @classmethod
    def draw(cls, r: int, in_max: int, out_max: int, prng_key: int, saved: bool) -> VeraProjection:
        """A (r, in_max), then B (out_max, r), from one CPU generator seeded with ``prng_key``."""
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        A = nn.init.kaiming_uniform_(torch.empty(r, in_max), nonlinearity="relu", generator=generator)
        B = nn.init.kaiming_uniform_(torch.empty(out_max, r), nonlinearity="relu", generator=generator)
        return cls(A, B, prng_key, saved)

    def copy(self, saved: bool) -> VeraProjection:
        """The same pair in storage of its own (see ``attach_projection``)."""
        return VeraProjection(self.vera_A.detach().clone(), self.vera_B.detach().clone(), self.prng_key, saved)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def in_max(self) -> int:
        return self.vera_A.shape[1]

    @property
    def out_max(self) -> int:
        return self.vera_B.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.in_max}, out_max={self.out_max}, prng_key={self.prng_key}, saved={self.saved}"


class VeraLinear(AddedUpdate, AdapterLayer):
    """VeRA around ``nn.Linear`` or GPT-2's ``Conv1D`` (``fan_in_fan_out``: weight stored (in, out)).

    Per adapter: ``vera_lambda_b[name]`` (out,) and ``vera_lambda_d[name]`` (r,), trained;
    ``vera_projection[name]``, the adapter's ``VeraProjection``, shared with its other layers.
    """

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d", "vera_projection")
    scale_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")
    adapter_key_name = "r"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        weight = self.get_base_layer().weight
        self.out_features, self.in_features = out_in_features(weight, fan_in_fan_out)
        self.fan_in_fan_out = fan_in_fan_out
        self.r: dict[str, int] = {}
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        # How the pair is held once. Every layer of adapter X puts the SAME VeraProjection object
        # in its vera_projection[X] (attach_projection does, once all of X's layers exist): one
        # storage, however many layers. It is shared as a module rather than as two tensors
        # because nn.Module.to() / .half() replace a module's own tensors by converted copies:
        # tensors registered in every layer would become one copy per layer on the first
        # .to("cuda"), while a module met from several layers is converted once and then found
        # converted. The state dict lists the pair under every layer, all the same tensor, and
        # checkpoint.py writes it once, under peft's model-level key (shared_checkpoint_key).
        self.vera_projection = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: VeraConfig, key: str) -> None:
        """Add adapter ``adapter_name``'s vectors; its projection comes from ``attach_projection``."""
        r = config.r
        self.r[adapter_name] = r
        self.vera_dropout[adapter_name] = dropout_or_identity(config.vera_dropout)
        # Drawn even when replaced below, as peft does, so the global RNG stream stays in step with it.
        b, d = torch.ones(self.out_features), torch.randn(r)
        if config.init_weights:
            b, d = torch.zeros(self.out_features), torch.full((r,), float(config.d_initial))
        device, dtype = adapter_placement(self.get_base_layer().weight)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b.to(device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(d.to(device, dtype))

    def projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corner of the shared pair: ``A_n`` (r, in) and ``B_m`` (out, r), views."""
        if adapter_name not in self.vera_projection:
            raise RuntimeError(
                f"VeRA adapter {adapter_name!r} has no projection on this layer; a VeraLinear gets it from "
                "attach_projection, which inject_adapter_in_model / get_peft_model / add_adapter run"
            )
        pair = self.vera_projection[adapter_name]
        return pair.vera_A[:, : self.in_features], pair.vera_B[: self.out_features, :]

    def shared_checkpoint_key(self, container: str, rest: str, adapter_name: str) -> str | None:
        """peft keeps the pair on its tuner model and saves it there: ``base_model.vera_A`` and
        ``base_model.vera_B`` (checkpoint.py adds the ``base_model.``)."""
        return rest if container == "vera_projection" else None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        return self.apply_adapters(self.base_layer(x, *args, **kwargs), x, self._add_term)

    def _add_term(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        return result + self._vera_term(x, name).to(result.dtype)

    def _vera_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``b * (B_m (d * (A_n dropout(x))))``: (..., in) -> (..., out), in x's dtype.

        The small tensors are cast to the input (fp32 vectors on a bf16 base compute in bf16);
        the activation is never cast up."""
        A, B = self.projections(name)
        d, b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        A, B, d, b = (t.to(device=x.device, dtype=x.dtype) for t in (A, B, d, b))
        h = F.linear(self.vera_dropout[name](x), A)  # (..., r)
        return b * F.linear(d * h, B)  # (..., out)

    # -- merging ------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``Delta W = diag(b) B_m diag(d) A_n`` (out, in) in at least fp32, in the base weight's layout."""
        A, B = self.projections(adapter_name)
        dtype = torch.promote_types(self.vera_lambda_d[adapter_name].dtype, torch.float32)
        d = self.vera_lambda_d[adapter_name].detach().to(A.device, dtype)
        b = self.vera_lambda_b[adapter_name].detach().to(A.device, dtype)
        delta = (b[:, None] * B.to(dtype)) @ (d[:, None] * A.to(dtype))  # (out, r) @ (r, in)
        return delta.T if self.fan_in_fan_out else delta


# -- injection hooks (registered in tuners/__init__.py) --------------------------------------------
def check_target(target: nn.Module, config: VeraConfig, key: str) -> None:
    """The layer types peft's VeRA adapts (quantised linear layers aside), else a TypeError."""
    base = innermost(target)
    if not (isinstance(base, nn.Linear) or is_gpt2_conv1d(base)):
        raise TypeError(
            f"cannot apply VeRA to {key!r}: it is a {type(base).__name__}, and VeRA (here as in peft) supports "
            f"{SUPPORTED}. Leave it out of target_modules, or adapt it with another method (e.g. LoRA) in a "
            "second adapter"
        )


def wrap_module(target: nn.Module, adapter_name: str, config: VeraConfig, key: str) -> VeraLinear:
    """Build the VeRA wrapper for ``target`` (the module named ``key``) with one adapter's vectors."""
    check_target(target, config, key)
    layer = VeraLinear(target, fan_in_fan_out=linear_weight_layout(innermost(target), config, key))
    layer.add_adapter(adapter_name, config, key)
    return layer


def existing_projection(model: nn.Module) -> tuple[str, VeraProjection] | None:
    """The first VeRA adapter's name and pair found in ``model`` (in module order), or None."""
    for module in model.modules():
        if isinstance(module, VeraLinear):
            for name, pair in module.vera_projection.items():
                return name, pair
    return None


def check_shared_projection(model: nn.Module, config: VeraConfig, targets: list[str]) -> None:
    """peft's rules for a VeRA adapter joining others, which it makes share their pair; checked
    before the model changes (the registry's ``check_model``)."""
    found = existing_projection(model)
    if found is None:
        return
    other, pair = found
    if config.projection_prng_key != pair.prng_key:
        raise ValueError(
            f"VeRA adapters of one model share adapter {other!r}'s random pair, drawn from projection_prng_key="
            f"{pair.prng_key}; this config has projection_prng_key={config.projection_prng_key} (peft refuses it too). "
            f"Use projection_prng_key={pair.prng_key}, or add this adapter to a fresh copy of the base model"
        )
    if config.save_projection != pair.saved:
        raise ValueError(
            f"VeRA adapter {other!r} has save_projection={pair.saved} and this config {config.save_projection}; "
            f"adapters sharing a pair must all save it or all redraw it (peft refuses the mix too). Use "
            f"save_projection={pair.saved}"
        )
    if config.r != pair.r:
        raise ValueError(
            f"VeRA adapters of one model share adapter {other!r}'s random pair, which has r={pair.r}; this config "
            f"has r={config.r}. Use r={pair.r} (peft refuses a larger r, and a smaller one breaks its forward), or "
            "add this adapter to a fresh copy of the base model"
        )
    for name in targets:
        base = innermost(model.get_submodule(name))
        out_features, in_features = out_in_features(base.weight, is_gpt2_conv1d(base))
        if in_features > pair.in_max or out_features > pair.out_max:
            raise ValueError(
                f"{name!r} is {in_features} -> {out_features} wide, larger than the shared VeRA pair of adapter "
                f"{other!r} (A: ({pair.r}, {pair.in_max}), B: ({pair.out_max}, {pair.r})), which was drawn for that "
                "adapter's own targets; peft refuses this too. Add first the adapter whose targets include the "
                "widest layers, or leave this layer out"
            )


def attach_projection(
    model: nn.Module,
    config: VeraConfig,
    adapter_name: str,
    holders: dict[str, AdapterLayer],
    updated: list[AdapterLayer],
) -> list:
    """Give every layer of the new adapter (``holders``: target name -> its VeraLinear) the adapter's
    pair, one object for all (the registry's ``wrap_more``; it wraps nothing more).

    The first VeRA adapter in a model draws its pair at the widest of its targets. A later one uses
    the same numbers, as in peft, where later adapters point at the first one's tensors; here it gets
    a copy in storage of its own, so that loading that adapter's saved pair can never change another
    adapter's (with peft it overwrites the one they all share)."""
    found = existing_projection(model)
    if found is not None:
        pair = found[1].copy(config.save_projection)
    else:
        layers = list(holders.values())
        in_max = max(layer.in_features for layer in layers)
        out_max = max(layer.out_features for layer in layers)
        pair = VeraProjection.draw(config.r, in_max, out_max, config.projection_prng_key, config.save_projection)
        pair.to(*adapter_placement(layers[0].get_base_layer().weight))
    for layer in holders.values():
        layer.vera_projection[adapter_name] = pair
    return []

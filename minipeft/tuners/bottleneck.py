"""Bottleneck adapters: a small residual MLP at the output of a frozen module.

Houlsby et al. 2019 and Pfeiffer et al. 2021 insert, after a module with output ``h`` of
width ``d``, the *sequential* adapter

    h' = h + s * up(act(down(dropout(h))))      down: d -> b,  up: b -> d,  b << d

He et al. 2022 show the *parallel* form, which reads the module's input ``x`` instead and
adds beside the module:

    h' = module(x) + s * up(act(down(dropout(x))))     down: d_in -> b,  up: b -> d_out

``down`` and ``up`` are ``nn.Linear`` with bias, so an adapter has ``2 d b + b + d``
parameters when ``d_in = d_out = d``. ``up`` starts at zero (weight and bias), so the
adapted model equals the base model at initialisation while ``down`` keeps nn.Linear's
random init and gradients reach ``up`` from the first step.

Works on any module, not only linear layers: a whole block, an attention module, an MLP.
Modules that return a tuple (as transformers' attention blocks do) have their first
element, the hidden states, adapted; the rest passes through untouched.

Widths. The output width ``d`` (``d_out``) is, in this order: ``config.hidden_size``; the
module's own ``out_features`` (Linear, GPT-2 Conv1D), ``embedding_dim`` or norm width; an
integer attribute ``hidden_size`` / ``embed_dim`` / ``d_model`` / ``n_embd`` /
``hidden_dim`` or ``module.config.hidden_size``; the width of the last LayerNorm/RMSNorm
inside the module (blocks such as BERT's ``output`` end in one). Otherwise an error asks for
``hidden_size``. For the parallel form the input width ``d_in`` is the module's
``in_features`` when it is a linear layer read at its first argument (position 0 or that
argument's name, ``"input"`` for nn.Linear), and ``d`` otherwise:
the rule is that a wrapped module must map width ``d`` to width ``d`` or be a linear layer
(the forward checks it and says so when it does not hold).

A bottleneck MLP is not a linear map of any weight, so it cannot be merged:
``merge_and_unload()`` refuses and ``unload()`` removes it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType, check_layer_selection, check_probability, is_positive_int
from ..targeting import innermost, is_gpt2_conv1d
from .base import AdapterLayer, adapter_placement, dropout_or_identity

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PLACEMENTS = ("sequential", "parallel")
WIDTH_ATTRIBUTES = ("hidden_size", "embed_dim", "d_model", "n_embd", "hidden_dim")

# Presets: what the papers adapted, as regexes over transformers' module names.
# BERT: "attention.output.dense" also ends with "output.dense", hence anchored regexes
# (the feed-forward output is "layer.<i>.output.dense", with nothing between).
_BERT = {
    "houlsby": dict(target_modules=r"(.*\.)?layer\.\d+\.(attention\.)?output\.dense", placement="sequential"),
    "pfeiffer": dict(target_modules=r"(.*\.)?layer\.\d+\.output\.dense", placement="sequential"),
    # BERT's feed-forward block is split across "intermediate" and "output"; the module that
    # ends it, "output", receives the block's input as its argument "input_tensor". The term
    # lands after that module's residual LayerNorm (He et al. add it just before): the
    # LayerNorm sits inside the module, so by name this is the closest faithful place.
    "parallel": dict(
        target_modules=r"(.*\.)?layer\.\d+\.output", placement="parallel", parallel_input="input_tensor", scaling=4.0
    ),
}
_LLAMA = {
    "houlsby": dict(target_modules=r"(.*\.)?layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)", placement="sequential"),
    "pfeiffer": dict(target_modules=r"(.*\.)?layers\.\d+\.mlp\.down_proj", placement="sequential"),
    "parallel": dict(target_modules=r"(.*\.)?layers\.\d+\.mlp", placement="parallel", scaling=4.0),
}
PRESETS = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck-adapter hyper-parameters (minipeft's own method; peft has no equivalent).

    target_modules: modules whose output is adapted; names exact or as a dotted suffix, or a
        full-match regex (the same rules as LoRA).
    bottleneck_size / reduction_factor: the width ``b``, given directly or as ``d // factor``;
        exactly one of the two.
    non_linearity: ``"relu"``, ``"gelu"`` or ``"silu"``.
    placement: ``"sequential"`` (adapt the module's output) or ``"parallel"`` (read the
        module's input, add beside it).
    parallel_input: for ``"parallel"``, which argument of the module the adapter reads: a
        position (default 0, the first) or a parameter name.
    scaling: ``s``, the factor on the adapter's term (He et al. use 4 for the parallel form).
    adapter_dropout: dropout on the adapter's input.
    hidden_size: the module's output width ``d``, when it cannot be inferred.
    modules_to_save, exclude_modules, layers_to_transform, layers_pattern: as in LoRA.
    Build the papers' setups with ``BottleneckConfig.preset("houlsby", model_type="bert")``.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    placement: str = "sequential"
    parallel_input: int | str = 0
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    hidden_size: int | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    field_advice: ClassVar[dict[str, str]] = {"parallel_input": "the position or name of the forward argument the adapter reads"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            raise ValueError(
                "give exactly one of bottleneck_size (the width b, e.g. 64) and reduction_factor "
                f"(b = hidden // factor, e.g. 16); got bottleneck_size={self.bottleneck_size!r}, "
                f"reduction_factor={self.reduction_factor!r}"
            )
        if self.bottleneck_size is not None and not is_positive_int(self.bottleneck_size):
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a number >= 1, got {self.reduction_factor!r}")
        check_layer_selection(self)
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={self.non_linearity!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_probability(self, "adapter_dropout")
        if self.hidden_size is not None and not is_positive_int(self.hidden_size):
            raise ValueError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")

    @classmethod
    def preset(cls, name: str, model_type: str, **overrides: Any) -> BottleneckConfig:
        """The papers' placements on a BERT- or LLaMA-style model.

        ``"houlsby"``: after the attention output projection and after the feed-forward
        output. ``"pfeiffer"``: after the feed-forward output only. ``"parallel"``: beside the
        feed-forward block with ``scaling=4``. ``reduction_factor`` defaults to 16 (Pfeiffer);
        any field can be overridden, e.g. ``bottleneck_size=64``.
        """
        if model_type not in PRESETS:
            raise ValueError(f"no bottleneck presets for model_type={model_type!r}; known: {sorted(PRESETS)}")
        table = PRESETS[model_type]
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; use one of {sorted(table)}")
        fields = dict(table[name])
        if "bottleneck_size" not in overrides:
            fields["reduction_factor"] = 16
        fields.update(overrides)
        return cls(**fields)

    def size_for(self, hidden: int) -> int:
        """The bottleneck width ``b`` for a module of output width ``hidden``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))


# -- widths -------------------------------------------------------------------------------------
def _own_widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer that states them itself: Linear, GPT-2 Conv1D, Embedding, a norm."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_gpt2_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]  # weight is (in, out)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.embedding_dim  # in is token ids, not a width
    width = _norm_width(module)
    return (width, width) if width else None


def _norm_width(module: nn.Module) -> int | None:
    """Width of a LayerNorm / RMSNorm (nn's or any class named ``*Norm`` with a 1-D weight)."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if type(module).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return None


def infer_widths(module: nn.Module, config: BottleneckConfig, key: str) -> tuple[int, int]:
    """(d_in, d_out) of the adapter on ``module`` by the rules in the module docstring."""
    own = _own_widths(module)
    d_out = config.hidden_size
    if d_out is None and own is not None:
        d_out = own[1]
    if d_out is None:
        d_out = getattr(module, "out_features", None)
    for attr in WIDTH_ATTRIBUTES:
        if d_out is None and is_positive_int(getattr(module, attr, None)):
            d_out = getattr(module, attr)
    if d_out is None and is_positive_int(getattr(getattr(module, "config", None), "hidden_size", None)):
        d_out = module.config.hidden_size
    if d_out is None:
        norms = [w for m in module.modules() if (w := _norm_width(m))]
        d_out = norms[-1] if norms else None
    if not is_positive_int(d_out):
        raise ValueError(
            f"cannot infer the output width of {key!r} ({type(module).__name__}): it has no out_features, "
            f"{'/'.join(WIDTH_ATTRIBUTES)} attribute, config.hidden_size or LayerNorm inside; "
            "pass BottleneckConfig(hidden_size=...)"
        )
    if config.placement == "sequential":
        return d_out, d_out
    if isinstance(module, nn.Embedding):
        raise TypeError(f"a parallel adapter reads the module's input, but {key!r} is an nn.Embedding (token ids)")
    # Parallel: a linear layer read at its first argument (by position or by name) states its
    # input width; anything else must map width d to width d.
    d_in = own[0] if own is not None and config.parallel_input in (0, _first_argument(module)) else d_out
    return d_in, d_out


def _first_argument(module: nn.Module) -> str | None:
    """Name of the first parameter of ``module.forward`` (``"input"`` for nn.Linear)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return params[0].name if params and params[0].kind in positional else None


# -- the layer ----------------------------------------------------------------------------------
class BottleneckLayer(AdapterLayer):
    """A frozen module with bottleneck adapters at its output.

    Per adapter: ``adapter_down[name]`` (d_in -> b), ``adapter_up[name]`` (b -> d_out), and
    its placement, scaling, activation and dropout. Active adapters apply in order: parallel
    terms are computed from the input and added to the module's output, then sequential
    adapters each transform the running output.
    """

    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("placement", "scaling", "non_linearity", "parallel_input", "adapter_dropout")
    adapter_key_name = "adapter_down"
    mergeable = False
    takes_quantized_base = True  # (it reads the module's input and output, never its weight)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.parallel_input: dict[str, int | str] = {}

    def update_layer(self, adapter_name: str, config: BottleneckConfig, key: str) -> None:
        d_in, d_out = infer_widths(self.get_base_layer(), config, key)
        b = config.size_for(d_out)
        down, up = nn.Linear(d_in, b), nn.Linear(b, d_out)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        # Placed by the module's first parameter (or buffer). A module with neither (an activation,
        # say) gets CPU fp32 adapters: the forward says to move them if its input lives elsewhere.
        base = self.get_base_layer()
        ref = next(base.parameters(), None)
        device, dtype = adapter_placement(ref if ref is not None else next(base.buffers(), None))
        self.adapter_down[adapter_name], self.adapter_up[adapter_name] = down.to(device, dtype), up.to(device, dtype)
        self.adapter_dropout[adapter_name] = (
            dropout_or_identity(config.adapter_dropout)
        )
        self.placement[adapter_name] = config.placement
        self.scaling[adapter_name] = float(config.scaling)
        self.non_linearity[adapter_name] = config.non_linearity
        self.parallel_input[adapter_name] = config.parallel_input

    def adapter_term(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``s * up(act(down(dropout(h))))``: (..., d_in) -> (..., d_out), in ``h``'s dtype."""
        down, up = self.adapter_down[name], self.adapter_up[name]
        if h.shape[-1] != down.in_features:
            if self.placement[name] == "parallel":
                where, fix = "the module input", "a parallel adapter needs a module mapping width d to d (or a linear layer)"
            else:
                where, fix = "the module output", "set BottleneckConfig(hidden_size=...) to the module's output width"
            raise ValueError(
                f"bottleneck adapter {name!r} ({self.placement[name]}) expects width {down.in_features} at {where}, "
                f"got {h.shape[-1]}; {fix}"
            )
        if h.device != down.weight.device:
            raise ValueError(
                f"bottleneck adapter {name!r} is on {down.weight.device} but its input is on {h.device}; move the "
                f"whole model after adding adapters, e.g. peft_model.to({str(h.device)!r}) (a wrapped module without "
                "weights, such as an activation, cannot tell where its adapters belong)"
            )
        act = ACTIVATIONS[self.non_linearity[name]]
        z = act(down(self.adapter_dropout[name](h).to(down.weight.dtype)))  # (..., b)
        return (up(z) * self.scaling[name]).to(h.dtype)  # (..., d_out)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        adapters = self.adapters_to_apply()
        if not adapters:
            return out
        h, rebuild = _split_hidden(out)
        for name in adapters:
            if self.placement[name] == "parallel":
                h = h + self.adapter_term(name, self._parallel_input(name, args, kwargs))
        for name in adapters:
            if self.placement[name] == "sequential":
                h = h + self.adapter_term(name, h)
        return rebuild(h)

    def _parallel_input(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The argument a parallel adapter reads: by position, or by name however it was passed."""
        which = self.parallel_input[name]
        if isinstance(which, int):
            if which < len(args):
                return args[which]
            raise ValueError(
                f"parallel adapter {name!r} reads positional argument {which}, but only {len(args)} were given; it was "
                "probably passed by keyword: set parallel_input to the argument's name"
            )
        if which in kwargs:
            return kwargs[which]
        bound = inspect.signature(self.base_layer.forward).bind_partial(*args, **kwargs).arguments
        if which not in bound:
            raise ValueError(
                f"parallel adapter {name!r} reads argument {which!r}, which this call of "
                f"{type(self.base_layer).__name__} did not receive (got {list(bound)})"
            )
        return bound[which]


def _split_hidden(out):
    """The hidden states in a module's output, and how to put a new value back in its place."""
    if isinstance(out, torch.Tensor):
        return out, lambda h: h
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        if isinstance(out, list):
            return out[0], lambda h: [h, *out[1:]]
        if hasattr(out, "_fields"):  # a namedtuple
            return out[0], lambda h: type(out)(h, *out[1:])
        return out[0], lambda h: (h, *out[1:])
    raise TypeError(
        f"a bottleneck adapter needs the module to return a tensor or a tuple whose first element is the "
        f"hidden states, got {type(out).__name__}"
    )


def wrap_module(target: nn.Module, adapter_name: str, config: BottleneckConfig, key: str) -> BottleneckLayer:
    """Build the bottleneck wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if isinstance(base, nn.modules.conv._ConvNd):
        # The MLP acts on the last dimension; a convolution's features are on dimension 1.
        raise TypeError(
            f"cannot put a bottleneck adapter on {key!r}: it is a {type(base).__name__}, whose output is "
            "channels-first, while the adapter acts on the last dimension; target a module whose output is "
            "(..., features), e.g. a Linear, an MLP or a transformer block"
        )
    layer = BottleneckLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

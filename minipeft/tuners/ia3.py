"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022).

A frozen linear map ``y = W x + b`` is adapted by one learned vector ``l`` that rescales
either its output or its input:

    attention keys / values (output side):   y = l * (W x + b),        l: (out,)
    feed-forward modules    (input side):    y = W (l * x) + b,        l: (in,)

The paper scales keys, values and the input of the second feed-forward matrix (the
intermediate activation). ``l`` starts at one, so the adapted model equals the base model
at initialisation, and it costs ``out`` or ``in`` parameters per module.

Both forms are diagonal matrices applied to ``W``, so they fold into the weight:
``diag(l) W`` (and ``l * b``) on the output side, ``W diag(l)`` on the input side.
Unmerging divides again, which is exact unless ``l`` has zero entries.

Parameter names and shapes match peft's so checkpoints load both ways:
``ia3_l.<adapter>`` of shape ``(out, 1)`` on the output side and ``(1, in)`` on the input
side (GPT-2's ``Conv1D`` included: its ``(in, out)`` weight only changes how merging indexes);
on a convolution, which is a linear map over channels at every position, ``(1, C, 1, ...)``
scaling the output or input channels (``IA3Conv``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, PeftType
from ..targeting import innermost, is_gpt2_conv1d, linear_weight_layout, name_matches
from .quantized import linear_features
from . import combining
from .base import AdapterLayer, adapter_placement, wide


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 hyper-parameters, with peft's field names and meanings.

    target_modules: modules that get a vector (names exact or as a dotted suffix, a full-match
        regex, or ``"all-linear"``), e.g. ``["key", "value", "output.dense"]`` for BERT.
    feedforward_modules: which of the targets scale their *input* instead of their output;
        the same matching rules, and a list must be a subset of a list ``target_modules``.
        Required with ``target_modules`` (``[]`` for none): peft guesses it per architecture.
    exclude_modules: never adapted, even when matched by ``target_modules``.
    fan_in_fan_out: weights stored ``(in, out)``; set automatically for GPT-2's Conv1D.
    init_ia3_weights: start the vectors at one (identity); ``False`` draws them from N(0, 1).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        # peft fills a None from its per-architecture table, so guessing here would silently
        # disagree with it (output-side vectors where peft puts input-side ones). Say it instead.
        if self.feedforward_modules is None and self.target_modules is not None:
            raise ValueError(
                "IA3Config needs feedforward_modules when target_modules are given: pass [] to scale "
                "every target's output, or name the feed-forward targets whose input is scaled, as the "
                "(IA)^3 paper does, e.g. ['down_proj'] (LLaMA), ['output.dense'] (BERT) or "
                "['mlp.c_proj'] (GPT-2)"
            )
        # (Both None: both come from the architecture's table, architecture_targets.IA3, as in peft.)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules: {extra} are not in "
                    f"target_modules={self.target_modules}; add them to target_modules or drop them"
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def is_feedforward(self, key: str) -> bool:
        """Whether the module named ``key`` scales its input (feed-forward) or its output."""
        return bool(self.feedforward_modules) and name_matches(key, self.feedforward_modules)


class IA3Linear(AdapterLayer):
    """(IA)^3 around ``nn.Linear`` or GPT-2's ``Conv1D``.

    Each adapter remembers its own side (``is_feedforward[name]``), so two adapters on one
    module may scale different sides; active adapters multiply.
    """

    adapter_layer_names = ("ia3_l",)
    scale_names = adapter_layer_names
    other_param_names = ("is_feedforward",)
    adapter_key_name = "ia3_l"
    supports_mixed_batch = True
    mergeable = True
    takes_quantized_base = True  # (it scales the input or output, and merges through base.py's hooks)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = self.features()
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def features(self) -> tuple[int, int]:
        """(out, in): the sizes the vectors scale."""
        return linear_features(self.get_base_layer(), self.fan_in_fan_out)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        """peft's shape of a vector: ``(1, in)`` scaling the input, ``(out, 1)`` the output."""
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def update_layer(self, adapter_name: str, config: IA3Config, key: str) -> None:
        feedforward = config.is_feedforward(key)
        shape = self.vector_shape(feedforward)
        # Drawn even when overwritten, as peft does, so the global RNG stream stays in step with it.
        init = torch.randn(shape)
        if config.init_ia3_weights:
            init = torch.ones(shape)
        self.ia3_l[adapter_name] = nn.Parameter(init.to(*adapter_placement(self.get_base_layer().weight)))
        self.is_feedforward[adapter_name] = feedforward

    # -- forward ------------------------------------------------------------------------------
    def _combined_vectors(self, adapters: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Product of the active input-side vectors (in,) and output-side vectors (out,)."""
        scale_in = scale_out = None
        for name in adapters:
            l = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                scale_in = l if scale_in is None else scale_in * l
            else:
                scale_out = l if scale_out is None else scale_out * l
        return scale_in, scale_out

    def on_features(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` (features,) shaped to multiply an input or output along its features: the last
        axis of (..., features)."""
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        if self.row_routing is not None:  # a mixed batch: each row scaled by its own adapter's vector
            # A copy: apply_adapters may write into its first argument, and x may be read elsewhere.
            x = self.apply_adapters(x.clone(), x, lambda t, _, name: self._times_vector(t, name, input_side=True))
            result = self.base_layer(x, *args, **kwargs)
            return self.apply_adapters(result, x, lambda t, _, name: self._times_vector(t, name, input_side=False))
        scale_in, scale_out = self._combined_vectors(self.adapters_to_apply())
        if scale_in is not None:
            x = x * self.on_features(scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = result * self.on_features(scale_out).to(result.dtype)
        return result

    def _times_vector(self, t: torch.Tensor, name: str, input_side: bool) -> torch.Tensor:
        """``t`` (an input if ``input_side``, else an output) times adapter ``name``'s vector when
        the vector scales that side; ``t`` itself otherwise."""
        if self.is_feedforward[name] != input_side:
            return t
        return t * self.on_features(self.ia3_l[name].flatten()).to(t.dtype)

    # -- merging ------------------------------------------------------------------------------
    def _weight_scale(self, name: str) -> torch.Tensor:
        """``l`` shaped to broadcast against the stored weight: rows or columns of (out, in)."""
        l = self.ia3_l[name].detach()  # (out, 1) or (1, in): already (out, in)-broadcastable
        return l.T if self.fan_in_fan_out else l

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        """Vector ``adapter_name`` folded in: ``diag(l) W`` and ``l * b`` (output side), or
        ``W diag(l)`` with ``b`` unchanged (input side)."""
        weight, l = tensors["weight"], self.ia3_l[adapter_name].detach()
        merged = {"weight": (wide(weight) * wide(self._weight_scale(adapter_name))).to(weight.dtype)}
        if not self.is_feedforward[adapter_name] and "bias" in tensors:
            bias = tensors["bias"]
            merged["bias"] = (wide(bias) * wide(l.flatten())).to(bias.dtype)
        return merged, None

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        """The vector divided back out (exact up to rounding), where merging multiplied it in."""
        weight, l = tensors["weight"], self.ia3_l[adapter_name].detach()
        if (l == 0).any():
            raise ValueError(
                f"cannot unmerge (IA)^3 adapter {adapter_name!r}: its vector has zero entries, so the rows or "
                "columns they scaled are lost from the merged weight; reload the base weights instead"
            )
        unmerged = {"weight": (wide(weight) / wide(self._weight_scale(adapter_name))).to(weight.dtype)}
        if not self.is_feedforward[adapter_name] and "bias" in tensors:
            bias = tensors["bias"]
            unmerged["bias"] = (wide(bias) / wide(l.flatten())).to(bias.dtype)
        return unmerged


class IA3Conv(IA3Linear):
    """(IA)^3 around ``nn.Conv2d`` / ``nn.Conv3d``, as peft has it. A convolution is a linear map over
    channels at every position, so a vector scales the input or output channels of x (B, C, ...),
    shaped ``(1, C, 1, ...)`` as peft stores it, and folds into the kernel (out, in / groups, k...)."""

    def features(self) -> tuple[int, int]:
        conv = self.get_base_layer()
        return conv.out_channels, conv.in_channels

    def _kernel_dims(self) -> int:
        return self.get_base_layer().weight.dim() - 2  # 2 for Conv2d, 3 for Conv3d

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features if feedforward else self.out_features) + (1,) * self._kernel_dims()

    def on_features(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(-1, *(1,) * self._kernel_dims())  # (C, 1, ...): the channel axis of (B, C, ...)

    def _weight_scale(self, name: str) -> torch.Tensor:
        """``l`` against the kernel (out, in / groups, k...): along its first axis for the output
        side; for the input side along its second, each group's output channels reading their
        group's slice of the input channels."""
        l = self.ia3_l[name].detach().flatten()
        conv, k = self.get_base_layer(), (1,) * self._kernel_dims()
        if not self.is_feedforward[name]:
            return l.view(-1, 1, *k)
        per_group = conv.in_channels // conv.groups
        return l.view(conv.groups, 1, per_group).expand(-1, conv.out_channels // conv.groups, -1).reshape(
            conv.out_channels, per_group, *k)


SUPPORTED = "nn.Linear, transformers' GPT-2 Conv1D, nn.Conv2d and nn.Conv3d"


def wrap_module(target: nn.Module, adapter_name: str, config: IA3Config, key: str) -> IA3Linear:
    """Build the (IA)^3 wrapper for ``target`` (the module named ``key``) with one adapter."""
    base = innermost(target)
    if isinstance(base, nn.Linear) or is_gpt2_conv1d(base):
        layer = IA3Linear(target, fan_in_fan_out=linear_weight_layout(base, config, key))
    elif isinstance(base, (nn.Conv2d, nn.Conv3d)):
        layer = IA3Conv(target)
    else:
        raise ValueError(f"cannot apply (IA)^3 to {key!r}: it is a {type(base).__name__}; (IA)^3 supports {SUPPORTED}")
    layer.add_adapter(adapter_name, config, key)
    return layer


# -- combining adapters ---------------------------------------------------------------------------
def combined_config(configs: list[IA3Config]) -> IA3Config:
    """The config of a weighted combination of (IA)^3 adapters (peft's): every module any source
    adapts, and as feed-forward every module any source scales the input of. Names are united;
    regexes (all sources must then use them) are joined into one alternation."""
    def united(field: str):
        values = [getattr(c, field) for c in configs]
        if all(v == values[0] for v in values):
            return copy.deepcopy(values[0])  # ("all-linear" too, which no alternation could hold)
        joined = combining.joined_targets(values)
        if joined is None:
            raise ValueError(f"the adapters give {field} as a regex in some configs and as names in others; "
                             "combine adapters whose configs use the same form")
        return joined
    return dataclasses.replace(
        copy.deepcopy(configs[0]), target_modules=united("target_modules"), feedforward_modules=united("feedforward_modules"),
        modules_to_save=combining.saved_modules(configs))


def add_weighted_adapter(peft_model: nn.Module, sources: list[str], weights: list[float], adapter_name: str) -> None:
    """Add (IA)^3 adapter ``adapter_name`` to ``peft_model`` as the weighted combination of the
    adapters ``sources`` (``PeftModel.add_weighted_adapter``, which has checked the weights); on
    error it is removed again."""
    # A module trained whole comes along as the copy of the one source that trains it, as with
    # LoRA (two sources training it is an error: which copy would be a guess).
    model = peft_model.get_base_model()
    heads = combining.trained_heads(model, sources)
    peft_model.add_adapter(adapter_name, combined_config([peft_model.peft_config[s] for s in sources]))
    try:
        set_combined_vectors(model, sources, weights, adapter_name)
        combining.copy_trained_heads(heads, adapter_name)
    except BaseException:
        peft_model.delete_adapter(adapter_name)
        raise


@torch.no_grad()
def set_combined_vectors(model: nn.Module, sources: list[str], weights: list[float], adapter_name: str) -> None:
    """In every (IA)^3 layer holding adapter ``adapter_name``: its vector = sum_i w_i l_i over the
    sources that adapt that layer (peft's rule: starting from zero, so a layer only some sources
    adapt gets only their share). The sources must scale the same side there."""
    for name, layer in model.named_modules():
        if not isinstance(layer, IA3Linear) or adapter_name not in layer.ia3_l:
            continue
        target = layer.ia3_l[adapter_name]
        terms = [(layer.ia3_l[s], w) for s, w in zip(sources, weights) if s in layer.ia3_l]
        side = layer.is_feedforward[adapter_name]
        mismatched = [s for s in sources if s in layer.ia3_l and layer.is_feedforward[s] != side]
        if mismatched:
            raise ValueError(f"adapters {mismatched} scale the other side of {name!r} (input versus output) than the "
                             "combination does; combine adapters that agree on feedforward_modules")
        target.zero_()
        for vector, weight in terms:
            target.add_(vector.to(target.dtype), alpha=weight)

"""LoRA on a bare ``nn.Parameter``: peft's ``LoraConfig(target_parameters=[...])``.

Mixture-of-experts layers keep their experts' weights as one 3-D parameter, not as nn.Linear
modules (transformers' Qwen3-MoE, GPT-OSS, Llama-4: ``experts.gate_up_proj``, ``experts.down_proj``),
and use it inside their own forward: a batched matmul, a loop over the experts, a grouped GEMM.
There is no linear layer whose output LoRA could add a term to, so the update goes into the
weight instead. While the module runs, every read of the parameter ``W`` returns

    W' = W + s ΔW,      ΔW_e = B_e A_e   for each expert e,      A_e: (r, in),  B_e: (out, r)

A 3-D parameter (E, d1, d2) holds E experts' (out, in) matrices, or their (in, out) matrices
when the module says so with ``is_transposed = True`` (GPT-OSS does); then ``ΔW_e = (B_e A_e)^T``.
A 2-D parameter (out, in) is a single expert. The swap is a ``torch.nn.utils.parametrize``
parametrization registered for the length of the module's forward only, so the module and its
code stay as they are, and outside that forward ``module.<name>`` is the frozen ``W`` again.
``W'`` is built once per forward, at the first read (a loop over experts reads it E times), with
one ``baddbmm`` per adapter: unlike LoRA on a linear layer, this costs a full-size copy of ``W``.

The factors are stored as peft stores them, so checkpoints map one to one. The E experts' factors
of rank r share one ``lora_A`` and one ``lora_B``:

    lora_A.weight: (E r, in)    rows e r ... e r + r - 1 are A_e
    lora_B.weight: (out, r E)   column j E + e is column j of B_e   (the experts interleave)

and a wrapper adapts one parameter: two parameters of one module get two wrappers, nested in the
order the module registers its parameters (the first innermost). The nesting names the keys,
``experts.base_layer.lora_A.weight`` (gate_up_proj) and ``experts.lora_A.weight`` (down_proj), so
every adapter that uses target_parameters must adapt the same parameters (peft's rule).

Which parameters: an entry of ``target_parameters`` matches ``<module>.<parameter>`` (the
module's name without adapter wrappers) exactly or as a dotted suffix, as do ``rank_pattern`` and
``alpha_pattern``; ``exclude_modules`` and ``layers_to_transform`` filter target_modules only (peft's
rules, so that a config selects the same parameters in both libraries).

What does not apply here, and is refused as in peft: ``lora_dropout`` (dropout acts on a layer's
input x; this update lives in the weight, where no input passes), DoRA (a row norm of a linear
layer's weight), ``lora_bias`` (no bias beside the parameter to fold it into), ``fan_in_fan_out``
(the layout comes from the shape and ``is_transposed``); and, minipeft only, the inits that
decompose a linear layer's weight (PiSSA, OLoRA).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..targeting import (
    attention_out_projections, innermost, inside_trained_whole, is_wrapper, logical_name, name_matches, nearest_names,
)
from . import lora_init
from .base import AdapterLayer, AddedUpdate, ModulesToSaveWrapper
from .lora import LoraConfig, LoraLayer, zero_padded

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoraParameter(AddedUpdate, LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (see the module docstring).

    ``num_experts`` is E (1 for a 2-D parameter); ``in_features`` / ``out_features`` are one
    expert's; ``transposed``: the experts are stored (in, out), the module's ``is_transposed``.
    """

    supports_mixed_batch = False  # it changes a weight for the whole call, and sees no batch

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        module = innermost(base_layer)
        shape = getattr(module, parameter_name).shape
        # 2-D: one expert stored (out, in); 3-D: (E, out, in), or (E, in, out) when transposed.
        transposed = len(shape) == 3 and bool(getattr(module, "is_transposed", False))
        num_experts, d1, d2 = shape if len(shape) == 3 else (1, *shape)
        in_features, out_features = (d1, d2) if transposed else (d2, d1)
        super().__init__(base_layer, in_features, out_features)
        self.parameter_name = parameter_name
        self.num_experts = num_experts
        self.transposed = transposed

    def parameter(self) -> nn.Parameter:
        """The frozen parameter ``W`` this wrapper adapts."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def create_adapter(self, adapter_name: str, r: int, bias: bool) -> None:
        # bias is False: check_config refuses lora_bias with target_parameters.
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)  # (E r, in)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)  # (out, r E)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        self.place_adapter(adapter_name, self.parameter())

    def padded_factors(self, A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A stacks the experts' factors, expert e in rows e r ... e r + r - 1 of (E r, in); B
        # interleaves them, expert e's term k in column k E + e of (out, r E), which B's zero
        # columns after r E keep.
        E = self.num_experts
        return zero_padded(A.view(E, -1, A.shape[-1]), 1, rank).flatten(0, 1), zero_padded(B, 1, rank * E)

    def expert_factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``adapter_name``'s A_e and B_e for every expert, stacked: (E, r, in), (E, out, r)."""
        E, r = self.num_experts, self.r[adapter_name]
        A = self.lora_A[adapter_name].weight.to(dtype).view(E, r, self.in_features)
        B = self.lora_B[adapter_name].weight.to(dtype).view(self.out_features, r, E).permute(2, 0, 1)
        return A, B

    def adapted_weight(self, W: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``W + sum_a s_a ΔW_a`` in W's shape and dtype, differentiable in the factors."""
        out = W if W.dim() == 3 else W.unsqueeze(0)  # (E, d1, d2)
        # Autocast would give W' the autocast dtype; whatever reads the parameter expects W's.
        with torch.autocast(W.device.type, enabled=False):
            for name in adapters:
                A, B = self.expert_factors(name, W.dtype)
                # W_e += s B_e A_e, or for (in, out) experts W_e += s A_e^T B_e^T = s (B_e A_e)^T
                lhs, rhs = (A.mT, B.mT) if self.transposed else (B, A)
                out = torch.baddbmm(out, lhs, rhs, alpha=self.scaling[name])  # W + s lhs @ rhs, expert by expert
        return out.view(W.shape)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s ΔW`` in the parameter's layout, in at least fp32 (merging rounds the sum once)."""
        A, B = self.expert_factors(adapter_name, torch.promote_types(self.lora_A[adapter_name].weight.dtype, torch.float32))
        delta = (B @ A) * self.scaling[adapter_name]  # (E, out, in)
        W = self.parameter()
        return (delta.mT if self.transposed else delta).reshape(W.shape)

    def forward(self, *args, **kwargs):
        self.unmerge_if_disabled()
        adapters = self.adapters_to_apply()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        module, name = self.get_base_layer(), self.parameter_name
        if parametrize.is_parametrized(module, name):
            raise RuntimeError(
                f"{type(module).__name__}.{name} was parametrized (torch.nn.utils.parametrize) after LoRA wrapped it; "
                "LoRA registers its own parametrization for each forward and would remove yours with it. Remove "
                "yours (parametrize.remove_parametrizations(module, name)) or apply it before adding the adapter"
            )
        # unsafe=True skips torch's check of W' (shape, dtype), which would build W' once more; it has
        # W's shape and dtype by construction.
        parametrize.register_parametrization(module, name, _AdaptedOnFirstRead(self, adapters), unsafe=True)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)  # W itself again

    # -- merging: W <- W + s ΔW, and back -----------------------------------------------------
    def _base_tensors(self) -> dict[str, torch.Tensor]:
        return {self.parameter_name: self.parameter().detach()}

    @property
    def merged_name(self) -> str:  # AddedUpdate's
        return self.parameter_name

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, shape={tuple(self.parameter().shape)}"


class _AdaptedOnFirstRead(nn.Module):
    """The parametrization ``W -> W'``, registered anew for each forward: computed at the first
    read of the parameter and returned again at every later read in that forward."""

    def __init__(self, layer: LoraParameter, adapters: list[str]) -> None:
        super().__init__()
        self.compute = functools.partial(layer.adapted_weight, adapters=adapters)  # not a submodule
        self.value: torch.Tensor | None = None

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            self.value = self.compute(W)
        return self.value


# -- the config's rules ---------------------------------------------------------------------------
def check_config(config: LoraConfig) -> None:
    """Normalise ``config.target_parameters`` and refuse the options that do not apply to it
    (run by ``LoraConfig.__post_init__``). With parameters to adapt and ``target_modules=None``,
    no module is adapted as a whole: ``target_modules`` becomes ``[]``, which is also what peft
    must read (left at None, peft would add its default modules for architectures it knows)."""
    value = config.target_parameters  # a list of strings (PeftConfig's type check)
    if not all(value):
        raise ValueError(f"target_parameters names parameters such as 'mlp.experts.gate_up_proj', got {value!r}")
    if not value:
        return
    if config.target_modules is None:
        config.target_modules = []
    refused = [
        (config.lora_dropout > 0, f"lora_dropout={config.lora_dropout!r}", "lora_dropout=0.0",
         "dropout acts on a layer's input, and this update lives in the weight, which no input passes through"),
        (config.use_dora, f"use_dora={config.use_dora!r}", "use_dora=False",
         "DoRA rescales the rows of a linear layer's weight by a learned magnitude"),
        (config.lora_bias, f"lora_bias={config.lora_bias!r}", "lora_bias=False",
         "no bias sits beside a bare parameter to fold s * b_B into"),
        (config.fan_in_fan_out, f"fan_in_fan_out={config.fan_in_fan_out!r}", "fan_in_fan_out=False",
         "a parameter's layout comes from its shape and its module's is_transposed attribute"),
        (lora_init.base_changing_init(config.init_lora_weights), f"init_lora_weights={config.init_lora_weights!r}",
         "init_lora_weights=True, 'gaussian' or False", "that init decomposes a linear layer's weight"),
    ]
    for bad, option, fix, why in refused:
        if bad:
            raise ValueError(
                f"target_parameters={value} does not work with {option} (peft refuses it too): {why}. Use {fix}, "
                f"or give the modules that need {option} a second adapter without target_parameters"
            )


# -- which parameters a config selects ----------------------------------------------------------
@dataclass
class _Target:
    key: str  # what target_parameters matches: "<module's logical name>.<parameter name>"
    module_name: str  # real name of the module that holds the parameter
    parameter_name: str
    spot: str  # real name of the outermost wrapper around that module (the module's own if none)
    wrappers: list[nn.Module]  # the wrappers already around the module, innermost first


def _wrappers_around(model: nn.Module, name: str) -> tuple[list[nn.Module], str]:
    """The wrappers around the module ``name`` (innermost first) and the real name of the outermost."""
    chain = []
    while name:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not (is_wrapper(parent) and child == parent.base_layer_name):
            break
        chain.append(parent)
        name = parent_name
    return chain, name


def _parameters(model: nn.Module) -> list[tuple[str, str, str, nn.Parameter]]:
    """``(key, module name, parameter name, parameter)`` of every parameter of the model, keyed by
    the module's logical name (wrappers' ``base_layer`` dropped, adapters' own tensors left out)."""
    found = []
    for name, module in model.named_modules():
        logical = None if is_wrapper(module) else logical_name(model, name)
        if logical is None:
            continue
        for pname, p in module.named_parameters(recurse=False):
            found.append((f"{logical}.{pname}" if logical else pname, name, pname, p))
    return found


def _adapted_keys(model: nn.Module) -> list[str]:
    """Keys of the parameters LoRA adapts in ``model`` now (those of earlier adapters)."""
    return [
        f"{logical_name(model, name)}.{module.parameter_name}"
        for name, module in model.named_modules()
        if isinstance(module, LoraParameter)
    ]


def find_parameters(model: nn.Module, config: LoraConfig, targets: Sequence[str] = ()) -> list[_Target]:
    """The parameters ``config.target_parameters`` selects, in peft's order (model order of the
    modules, then the order each module registers its parameters), each checked; ``targets``:
    the modules the same adapter wraps through target_modules. Raises, naming the parameter and
    what would work, on an entry that matches nothing and on a parameter LoRA cannot adapt."""
    wanted = config.target_parameters or []
    everything = _parameters(model)
    selected = [t for t in everything if name_matches(t[0], wanted)]
    for entry in wanted:
        if not any(name_matches(key, [entry]) for key, *_ in selected):
            pool = [key for key, *_, p in everything if p.dim() in (2, 3)] or [key for key, *_ in everything]
            nearest, example = nearest_names([entry], pool)
            raise ValueError(
                f"target_parameters entry {entry!r} matched no parameter of {type(model).__name__}. Nearest 2-D/3-D "
                f"parameter names, nearest first: {nearest}, e.g. {example!r}. An entry matches "
                "'<module>.<parameter>' exactly or as a dotted suffix (no regex, as in peft)"
            )
    saved = getattr(config, "modules_to_save", None) or []
    never_called = attention_out_projections(model)
    found = []
    for key, module_name, pname, p in selected:
        module = model.get_submodule(module_name)
        wrappers, spot = _wrappers_around(model, module_name)
        problem = None
        if not module_name:
            problem = (f"it belongs to the top-level {type(model).__name__}, which has no parent to hold a wrapper "
                       "(peft refuses it too); move it into a submodule")
        elif p.dim() not in (2, 3):
            problem = (f"it is {p.dim()}-D {tuple(p.shape)}; LoRA adapts 2-D (out, in) and 3-D (experts, out, in) "
                       "parameters (or (experts, in, out) in a module with is_transposed = True)")
        elif p.dtype not in FLOAT_DTYPES:
            problem = f"it is {p.dtype}; LoRA on parameters needs a float16, bfloat16, float32 or float64 parameter"
        elif parametrize.is_parametrized(module):
            problem = (f"its module is parametrized (torch.nn.utils.parametrize: {list(module.parametrizations)}), "
                       "and LoRA parametrizes the parameter itself during the forward; remove that parametrization "
                       "first (parametrize.remove_parametrizations(module, name, leave_parametrized=True))")
        elif module_name in never_called:
            attention = never_called[module_name]
            problem = (f"its module is the out_proj of the nn.MultiheadAttention {attention!r}, which reads the weight "
                       "itself and never calls out_proj, the call LoRA on a parameter acts in; so the adapter would "
                       f"never run. Target the attention instead (target_modules=[{attention!r}]: its in_proj and out_proj)")
        elif _inside_saved(model, spot, key, saved):
            problem = ("its module is trained whole (modules_to_save), so it has no frozen weight to adapt; "
                       "drop it from target_parameters or from modules_to_save")
        elif any(not isinstance(w, LoraParameter) for w in wrappers):
            other = next(type(w).__name__ for w in wrappers if not isinstance(w, LoraParameter))
            problem = (f"its module is wrapped by a {other} already, which sees the module's parameters only "
                       "through its own forward (peft refuses it too); adapt either the module (target_modules) "
                       "or its parameters, not both")
        elif spot in targets:
            problem = ("the same adapter also wraps its module, through target_modules or trainable_token_indices "
                       "(peft refuses it too); adapt either the module or its parameters: drop one of the entries")
        if problem is not None:
            raise ValueError(f"cannot put LoRA on parameter {key!r}: {problem}")
        found.append(_Target(key, module_name, pname, spot, wrappers))
    before = _adapted_keys(model)
    if before and sorted(before) != sorted(t.key for t in found):
        raise ValueError(
            f"the model's adapters put LoRA on the parameters {sorted(before)}, and this one would on "
            f"{sorted(t.key for t in found)}. Adapters that use target_parameters must all adapt the same "
            "parameters (peft's rule): each parameter's LoRA weights are named by how deep its wrapper sits among "
            "the nested ones, so the nesting must be the same for every adapter. Select exactly those parameters"
        )
    return found


def _inside_saved(model: nn.Module, spot: str, key: str, saved: list[str]) -> bool:
    """Whether the module at ``spot`` is, or lies in, a module trained whole: one this config's
    ``modules_to_save`` selects (peft's plain name suffix) or an earlier adapter's ``ModulesToSaveWrapper``."""
    if inside_trained_whole(key.rpartition(".")[0], saved):
        return True
    parts = spot.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts) + 1))
    return any(isinstance(model.get_submodule(prefix), ModulesToSaveWrapper) for prefix in prefixes)


def wrap_parameters(
    model: nn.Module, config: LoraConfig, adapter_name: str, taken: list[str], updated: list[AdapterLayer]
) -> list[tuple[str, nn.Module, AdapterLayer]]:
    """The wrappers ``config.target_parameters`` needs, as ``(name, module it replaces, wrapper)``
    in the order to install them; a parameter an earlier adapter wraps gets the new adapter in its
    wrapper, which goes into ``updated``. ``taken``: modules this adapter wraps otherwise."""
    plan: list[tuple[str, nn.Module, AdapterLayer]] = []
    outermost: dict[str, nn.Module] = {}  # spot -> what stands there once the plan is installed
    for target in find_parameters(model, config, taken):
        existing = next((w for w in target.wrappers if w.parameter_name == target.parameter_name), None)
        if existing is not None:
            updated.append(existing)  # before the update, so a half-done one is rolled back too
            existing.add_adapter(adapter_name, config, target.key)
            continue
        inner = outermost.get(target.spot) or model.get_submodule(target.spot)
        wrapper = LoraParameter(inner, target.parameter_name)
        wrapper.add_adapter(adapter_name, config, target.key)
        plan.append((target.spot, inner, wrapper))
        outermost[target.spot] = wrapper
    return plan

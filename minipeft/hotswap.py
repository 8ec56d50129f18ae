"""Hot-swapping a LoRA adapter (peft's ``hotswap_adapter``): another adapter's weights copied into
the tensors of one already loaded under the same name.

The model keeps its modules and parameter objects, and only their values change. So a model
compiled with torch.compile runs the new adapter without compiling again, since its graphs read
those tensors. This is how a server serves many adapters from one compiled model.

The new adapter must fit the tensors as they are:

* a smaller rank is padded with zero terms (``LoraLayer.padded_factors``: B A is unchanged); a
  larger one does not fit. ``prepare_model_for_compiled_hotswap(model, target_rank=R)`` pads the
  loaded adapter to the largest rank R to be served, before compiling;
* a layer the new adapter leaves out gets zero factors (and, under DoRA, the magnitude that
  makes it the identity), so it adds nothing;
* lora_alpha and the rank set each layer's scaling ``s = alpha / r``, a Python float that a
  compiled graph holds as a constant: a new value recompiles once. After
  ``prepare_model_for_compiled_hotswap`` the scalings stay as they are and the new adapter's
  own is folded into B instead, ``s' B A = s (s'/s B) A``, so nothing recompiles. (peft makes
  the scalings tensors instead; here they stay numbers, which the fused kernels and
  ``addmm(alpha=s)`` take.)

Every other config field must match (use_rslora, dropout, DoRA, the tokens that
trainable_token_indices names, ...), or the old setting would silently apply to the new
weights. Afterwards ``model.peft_config[adapter_name]`` describes the adapter as the model holds
it, ranks and alphas included, so saving it gives a checkpoint that computes the same function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Literal

import torch

from .checkpoint import adapter_key_map, checked_reload, set_peft_model_state_dict
from .config import PeftType, default_and_pattern
from .injection import adapter_layers
from .model import PeftModel
from .tuners import fused_experts, lora_init
from .tuners.base import wide
from .tuners.lora import LoraConfig, LoraLayer, alpha_at_rank

# Config fields a swapped-in adapter may change: what the tensors and scalings carry (its layers
# are checked key by key, its ranks shape by shape). After the swap the model's config keeps the
# loaded adapter's layers and ranks, which its tensors still have.
LAYER_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
# (target_parameters must match: LoRA on several parameters of one module nests wrappers, whose
# checkpoint keys depend on which parameters are adapted, so a subset's keys name other tensors.)
RANK_FIELDS = ("r", "rank_pattern")
# How the factors started says nothing of trained ones (unless the init rewrote the base: refused).
INIT_FIELDS = ("init_lora_weights", "eva_config")
SWAPPABLE_FIELDS = (*LAYER_FIELDS, *RANK_FIELDS, *INIT_FIELDS, "lora_alpha", "alpha_pattern")
# Set on a PeftModel by prepare_model_for_compiled_hotswap: swaps fold new scalings into B.
KEEPS_SCALINGS = "_hotswap_keeps_scalings"


def prepare_model_for_compiled_hotswap(model: torch.nn.Module, *, target_rank: int | None = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Make ``model`` (a PeftModel) ready to hot-swap LoRA adapters of other ranks and alphas
    after it is compiled, without compiling again (peft's function of this name). Call it after
    loading the first adapter and before torch.compile and before making an optimizer (padding
    makes new parameters).

    target_rank: pad every LoRA adapter to this rank, the largest one the model will serve
        (None: no padding). The padded model computes the same function, and its config says
        so: rank target_rank, the alphas that keep each scaling, plain LoRA's init (the padded
        factors are no init's). Not for PiSSA/OLoRA adapters, whose residual the base holds.
    check_compiled: what to do when ``model`` is compiled already ("error", "warn", "ignore").

    From then on, ``hotswap_adapter`` keeps every layer's scaling and folds the new adapter's
    into its B. peft's ``config=`` argument, which sets the rank of other configs to
    target_rank, is not taken: a config's rank is part of its scaling.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled is 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        message = ("prepare_model_for_compiled_hotswap is called before torch.compile, not after: the new parameters "
                   "its padding makes, and the scalings it may change, make a compiled model compile again")
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    peft_model = _peft_model(model, "prepare_model_for_compiled_hotswap")
    names = [name for name, config in peft_model.peft_config.items() if config.peft_type == PeftType.LORA]
    if not names:
        raise ValueError("the model holds no LoRA adapter to prepare; load the first adapter, then call "
                         "prepare_model_for_compiled_hotswap, then compile")
    if target_rank is not None:
        _pad_adapters(peft_model, names, target_rank)
    setattr(peft_model, KEEPS_SCALINGS, True)


def _pad_adapters(peft_model: PeftModel, names: list[str], target_rank: int) -> None:
    if not (isinstance(target_rank, int) and not isinstance(target_rank, bool) and target_rank >= 1):
        raise ValueError(f"target_rank is a rank, an int >= 1; got {target_rank!r}")
    layers = {name: _lora_layers(peft_model, name) for name in names}
    above = [f"{key!r} (adapter {name!r}, r={layer.r[name]})"
             for name in names for key, layer in layers[name] if layer.r[name] > target_rank]
    if above:
        raise ValueError(f"target_rank={target_rank} is below the rank of {', '.join(above[:5])}"
                         f"{' ...' if len(above) > 5 else ''}; padding adds zero terms and cannot lower a rank: "
                         "target_rank is the largest rank the model will serve")
    base_changing = [name for name in names if lora_init.base_changing_init(peft_model.peft_config[name].init_lora_weights)]
    if base_changing:
        raise ValueError(f"adapter(s) {base_changing} rewrote the base weights they adapt (PiSSA/OLoRA/LoftQ), and "
                         "loading a padded one would rewrite them at the padded rank. A PiSSA/OLoRA adapter converts to "
                         "plain LoRA first (save_pretrained's path_initial_model_for_weight_conversion), then pads")
    for name in names:  # a dry run on shapes alone, so that nothing changes unless all pad (grouped convolutions)
        for _, layer in layers[name]:
            layer.padded_factors(*(t.detach().to("meta") for t in layer.factor_parameters(name)), target_rank)
    for name in names:
        config = peft_model.peft_config[name]
        for _, layer in layers[name]:
            layer.pad_rank(name, target_rank, config.use_rslora)
        # The padded factors are no init's output, and an init's limits on the rank (orthogonal's
        # even rank) need not hold at target_rank: the config says plain LoRA.
        peft_model.peft_config[name] = dataclasses.replace(
            config, r=target_rank, rank_pattern={}, init_lora_weights=True, eva_config=None, loftq_config=None,
            **_alpha_fields({key: layer.lora_alpha[name] for key, layer in layers[name]}, config))


def hotswap_adapter(model: torch.nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str,
                    torch_device: str | torch.device | None = None) -> None:
    """Replace LoRA adapter ``adapter_name`` of ``model`` (a PeftModel, or torch.compile's wrapper
    of one) by the adapter saved in the folder ``model_name_or_path``, in place.

    Checked before anything changes: the adapter is LoRA and not merged; the saved config equals
    the loaded one but in ``SWAPPABLE_FIELDS`` (and bookkeeping); each saved layer is one the
    loaded adapter has, of a rank no larger, and the tensors fit (a strict load). Then its tensors
    are copied in (padded, zeros for layers it leaves out), and the scalings follow (module
    docstring). ``torch_device``: where the tensors are read to (the copy lands on each
    parameter's own device either way)."""
    peft_model = _peft_model(model, "hotswap_adapter")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r} to swap; the model holds {sorted(peft_model.peft_config)} "
                         "(load_adapter adds a new one)")
    loaded = peft_model.peft_config[adapter_name]
    if loaded.peft_type != PeftType.LORA:
        raise ValueError(f"hotswap_adapter swaps LoRA adapters; adapter {adapter_name!r} is {loaded.peft_type.value}")
    config, tensors = checked_reload(peft_model, model_name_or_path, adapter_name, SWAPPABLE_FIELDS)
    decomposed = [init for init in (loaded.init_lora_weights, config.init_lora_weights) if lora_init.base_changing_init(init)]
    if decomposed:
        raise ValueError(f"cannot swap {os.fspath(model_name_or_path)!r} into adapter {adapter_name!r}: init_lora_weights="
                         f"{decomposed[0]!r} rewrote the base weights for its own factors (a residual, or LoftQ's "
                         "quantized weight), which another adapter's do not match; load it onto a fresh base model")
    key_map = adapter_key_map(peft_model, adapter_name)
    # (a transformers-4 checkpoint of per-expert layers, as the model's fused experts hold it)
    tensors = fused_experts.fuse_per_expert_checkpoint(peft_model, tensors, key_map)
    if torch_device is not None:
        tensors = {key: t.to(torch_device) for key, t in tensors.items()}
    layers = _lora_layers(peft_model, adapter_name)
    keys_of = _tensor_keys(peft_model, adapter_name, key_map)
    keep_scalings = getattr(peft_model, KEEPS_SCALINGS, False)

    # Everything the swap sets, made before the first write, so that nothing after it can fail.
    tensors, scalings, too_large = dict(tensors), [], []
    for key, layer in layers:
        keys = keys_of(layer)
        if keys["A"] not in tensors and keys["B"] not in tensors:
            tensors.update(_identity_tensors(layer, adapter_name, keys))
            continue
        if keys["A"] not in tensors or keys["B"] not in tensors:
            continue  # (the strict load names the missing key)
        r, alpha = config.rank_and_alpha(key)
        rank = layer.r[adapter_name]  # of the tensors as they are
        if r > rank:
            too_large.append(f"{key!r} (r={r}, the model's {rank})")
            continue
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        factor = 1.0
        if keep_scalings:
            if layer.scaling[adapter_name] == 0:
                raise ValueError(f"adapter {adapter_name!r} has scaling 0 (lora_alpha=0) at {key!r}, which no B "
                                 "can be rescaled to another; load the model again without prepare_model_for_compiled_hotswap")
            factor = scaling / layer.scaling[adapter_name]  # s' B A = s (s'/s B) A
            scaling, alpha = layer.scaling[adapter_name], layer.lora_alpha[adapter_name]
        else:
            alpha = alpha_at_rank(alpha, r, rank, config.use_rslora)  # the alpha giving that scaling at the held rank
        A, B = tensors[keys["A"]], tensors[keys["B"]]
        if r < rank:
            A, B = layer.padded_factors(A, B, rank)
        tensors[keys["A"]], tensors[keys["B"]] = A, (B if factor == 1.0 else wide(B) * factor)
        if factor != 1.0 and "bias" in keys:
            tensors[keys["bias"]] = wide(tensors[keys["bias"]]) * factor  # the bias is in s (B A x + b_B)
        scalings.append((layer, scaling, alpha))
    if too_large:
        raise ValueError(
            f"cannot swap {os.fspath(model_name_or_path)!r} into adapter {adapter_name!r}: its rank is above the "
            f"model's at {', '.join(too_large[:5])}{' ...' if len(too_large) > 5 else ''}. Swapping copies into the "
            "tensors as they are; pad them to the largest rank first, prepare_model_for_compiled_hotswap(model, "
            "target_rank=...) before compiling, or load the adapter under a new name (load_adapter)"
        )
    set_peft_model_state_dict(peft_model, tensors, adapter_name)  # strict, and all checked before any copy
    for layer, scaling, alpha in scalings:
        layer.scaling[adapter_name], layer.lora_alpha[adapter_name] = scaling, alpha
    # The config of the adapter as held: the loaded one's layers and ranks, each layer's alpha.
    held = {name: getattr(loaded, name)
            for name in ("inference_mode", *type(loaded).runtime_only_fields, *LAYER_FIELDS, *RANK_FIELDS, *INIT_FIELDS)}
    alphas = {key: layer.lora_alpha[adapter_name] for key, layer in layers}
    peft_model.peft_config[adapter_name] = dataclasses.replace(config, **held, **_alpha_fields(alphas, config, loaded))


def _peft_model(model: torch.nn.Module, caller: str) -> PeftModel:
    peft_model = getattr(model, "_orig_mod", model)  # (torch.compile's OptimizedModule)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"{caller} takes a PeftModel, got {type(peft_model).__name__}")
    return peft_model


def _lora_layers(peft_model: PeftModel, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """``(name rank_pattern and alpha_pattern match, layer)`` for every LoRA layer holding the
    adapter (an attention's out_proj shares the attention's name)."""
    return [(layer.pattern_key, layer) for _, layer in adapter_layers(peft_model.get_base_model())
            if isinstance(layer, LoraLayer) and adapter_name in layer.r]


def _tensor_keys(peft_model: PeftModel, adapter_name: str, key_map: dict[str, str]):
    """A function giving, for a LoRA layer, the checkpoint key of each of its tensors: A, B, and
    where it has them, B's bias (lora_bias) and DoRA's magnitude."""
    model_key = {id(t): k for k, t in peft_model.state_dict(keep_vars=True).items()}
    checkpoint_key = {m: c for c, m in key_map.items()}

    def keys_of(layer: LoraLayer) -> dict[str, str]:
        tensors = dict(zip("AB", layer.factor_parameters(adapter_name)))
        if adapter_name in layer.lora_B and layer.lora_B[adapter_name].bias is not None:
            tensors["bias"] = layer.lora_B[adapter_name].bias
        if adapter_name in layer.lora_magnitude_vector:
            tensors["magnitude"] = layer.lora_magnitude_vector[adapter_name].weight
        return {role: checkpoint_key[model_key[id(t)]] for role, t in tensors.items()}

    return keys_of


def _identity_tensors(layer: LoraLayer, adapter_name: str, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Tensors for ``keys`` that make the layer's adapter add nothing: zero factors and bias, and
    under DoRA the magnitude ``||W0||`` per row, so that m / ||W0 + 0|| is one."""
    A, B = layer.factor_parameters(adapter_name)
    zeros = {"A": torch.zeros_like(A.detach()), "B": torch.zeros_like(B.detach())}
    if "bias" in keys:
        zeros["bias"] = torch.zeros_like(layer.lora_B[adapter_name].bias.detach())
    if "magnitude" in keys:
        norm = layer.as_rows(layer.dora_base_weight().detach().float()).norm(p=2, dim=1)
        zeros["magnitude"] = norm.view(layer.magnitude_shape)
    return {keys[role]: tensor for role, tensor in zeros.items()}


def _alpha_fields(alphas: dict[str, float], *configs: LoraConfig) -> dict:
    """lora_alpha and alpha_pattern giving each layer (by name) its alpha in ``alphas``: those of
    the first of ``configs`` that gives them all, else written out per layer."""
    for config in configs:
        if all(config.rank_and_alpha(key)[1] == alpha for key, alpha in alphas.items()):
            return {"lora_alpha": config.lora_alpha, "alpha_pattern": dict(config.alpha_pattern)}
    lora_alpha, alpha_pattern = default_and_pattern(alphas)
    return {"lora_alpha": lora_alpha, "alpha_pattern": alpha_pattern}

"""Hot-swapping a LoRA adapter (peft's ``hotswap_adapter``): another adapter's weights copied into
the tensors of one already loaded under the same name.

The model keeps its modules and parameter objects, and only their values change. So a model
compiled with torch.compile runs the new adapter without compiling again, since its graphs read
those tensors (a new lora_alpha changes a scaling the graph holds as a constant: that recompiles
once). This is how a server serves many adapters from one compiled model.

What may differ between the two adapters is what the tensors carry, and lora_alpha. Everything
that shapes the computation outside the tensors must match, or the old settings would silently
apply to the new weights: the settings in MUST_MATCH, and the layers and ranks, which the strict
load checks tensor by tensor. (peft also lets the new adapter target fewer layers, or a smaller
rank padded with zeros; here those are errors, and `load_adapter` under a new name is the way.)
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from .checkpoint import load_checkpoint, set_peft_model_state_dict
from .config import PeftType
from .injection import adapter_layers
from .model import PeftModel
from .tuners.lora import LoraLayer

# Settings with no tensor of their own that change what an adapter computes (peft checks the
# first four; fan_in_fan_out transposes how the weights are read).
MUST_MATCH = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "fan_in_fan_out")


def hotswap_adapter(model: torch.nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str,
                    torch_device: str | torch.device | None = None) -> None:
    """Replace LoRA adapter ``adapter_name`` of ``model`` (a PeftModel, or torch.compile's wrapper
    of one) by the adapter saved in the folder ``model_name_or_path``, in place.

    Checked before anything changes: the adapter is not merged; the saved one is LoRA too, with the
    MUST_MATCH settings of the loaded one; it holds a tensor of the same shape for each of the
    loaded adapter's, and nothing else. Then its tensors are copied in, each layer's scaling follows
    the new lora_alpha, and ``model.peft_config[adapter_name]`` becomes the saved config (keeping
    the loaded one's inference_mode and runtime settings). ``torch_device``: where the tensors are
    read to (the copy lands on each parameter's own device either way)."""
    peft_model = getattr(model, "_orig_mod", model)  # (torch.compile's OptimizedModule)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"hotswap_adapter swaps an adapter of a PeftModel, got {type(peft_model).__name__}")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r} to swap; the model holds {sorted(peft_model.peft_config)} "
                         "(load_adapter adds a new one)")
    loaded = peft_model.peft_config[adapter_name]
    config, tensors = load_checkpoint(model_name_or_path)
    if loaded.peft_type != PeftType.LORA or config.peft_type != PeftType.LORA:
        raise ValueError(f"hotswap_adapter swaps LoRA adapters; adapter {adapter_name!r} is {loaded.peft_type.value} "
                         f"and {os.fspath(model_name_or_path)!r} holds {config.peft_type.value}")
    differ = [f"{name}: {getattr(loaded, name)!r} loaded, {getattr(config, name)!r} saved"
              for name in MUST_MATCH if getattr(loaded, name) != getattr(config, name)]
    if config.lora_alpha != loaded.lora_alpha and loaded.alpha_pattern:
        differ.append(f"lora_alpha: {loaded.lora_alpha!r} loaded, {config.lora_alpha!r} saved, beside an alpha_pattern "
                      "(which layers take lora_alpha is the pattern's to say)")
    if differ:
        raise ValueError(f"cannot hot-swap {os.fspath(model_name_or_path)!r} into adapter {adapter_name!r}: these "
                         "settings would stay the loaded adapter's, and do not match:\n  " + "\n  ".join(differ))
    layers = [layer for _, layer in adapter_layers(peft_model.get_base_model())
              if isinstance(layer, LoraLayer) and adapter_name in layer.scaling]
    if any(adapter_name in layer.merged_here() for layer in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first "
                         "(model.unmerge_adapter()), as swapping it would leave the old weights merged")
    if torch_device is not None:
        tensors = {key: t.to(torch_device) for key, t in tensors.items()}
    set_peft_model_state_dict(peft_model, tensors, adapter_name)  # strict, and all checked before any copy
    for layer in layers:  # scaling = alpha / r (alpha / sqrt(r) with rsLoRA); the ranks are the loaded ones
        r = layer.r[adapter_name]
        alpha = layer.lora_alpha[adapter_name] if loaded.alpha_pattern else config.lora_alpha
        layer.lora_alpha[adapter_name] = alpha
        layer.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    runtime = {name: getattr(loaded, name) for name in ("inference_mode", *type(loaded).runtime_only_fields)}
    peft_model.peft_config[adapter_name] = dataclasses.replace(config, **runtime)

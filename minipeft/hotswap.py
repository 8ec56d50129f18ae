"""Hot-swapping a LoRA adapter (peft's ``hotswap_adapter``): another adapter's weights copied into
the tensors of one already loaded under the same name.

The model keeps its modules and parameter objects, and only their values change. So a model
compiled with torch.compile runs the new adapter without compiling again, since its graphs read
those tensors (a new lora_alpha changes a scaling the graph holds as a constant: that recompiles
once). This is how a server serves many adapters from one compiled model.

What may differ between the two adapters is what the tensors carry, and lora_alpha. Every other
setting must match, or the old one would silently apply to the new weights (the tokens that
trainable_token_indices names, say); the layers and ranks are checked tensor by tensor by the
strict load. (peft also lets the new adapter target fewer layers, or a smaller rank padded with
zeros; here those are errors, and `load_adapter` under a new name is the way.)
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from .checkpoint import checked_reload, set_peft_model_state_dict
from .config import PeftType
from .injection import adapter_layers
from .model import PeftModel
from .tuners.lora import LoraLayer


def hotswap_adapter(model: torch.nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str,
                    torch_device: str | torch.device | None = None) -> None:
    """Replace LoRA adapter ``adapter_name`` of ``model`` (a PeftModel, or torch.compile's wrapper
    of one) by the adapter saved in the folder ``model_name_or_path``, in place.

    Checked before anything changes: the adapter is LoRA and not merged; the saved config equals
    the loaded one but for lora_alpha (and bookkeeping); the saved tensors are the loaded adapter's
    keys and shapes exactly. Then its tensors are copied in, each layer's scaling follows the new
    lora_alpha, and ``model.peft_config[adapter_name]`` becomes the saved config (keeping the
    loaded one's inference_mode and runtime settings). ``torch_device``: where the tensors are
    read to (the copy lands on each parameter's own device either way)."""
    peft_model = getattr(model, "_orig_mod", model)  # (torch.compile's OptimizedModule)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"hotswap_adapter swaps an adapter of a PeftModel, got {type(peft_model).__name__}")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r} to swap; the model holds {sorted(peft_model.peft_config)} "
                         "(load_adapter adds a new one)")
    loaded = peft_model.peft_config[adapter_name]
    if loaded.peft_type != PeftType.LORA:
        raise ValueError(f"hotswap_adapter swaps LoRA adapters; adapter {adapter_name!r} is {loaded.peft_type.value}")
    may_differ = ("lora_alpha",) if not loaded.alpha_pattern else ()  # (with a pattern, which layers take it is the pattern's)
    config, tensors = checked_reload(peft_model, model_name_or_path, adapter_name, may_differ)
    # Everything the swap sets, made before the first write, so that nothing after it can fail.
    runtime = {name: getattr(loaded, name) for name in ("inference_mode", *type(loaded).runtime_only_fields)}
    new_config = dataclasses.replace(config, **runtime)
    layers = [layer for _, layer in adapter_layers(peft_model.get_base_model())
              if isinstance(layer, LoraLayer) and adapter_name in layer.scaling]
    alphas = [layer.lora_alpha[adapter_name] if loaded.alpha_pattern else config.lora_alpha for layer in layers]
    # scaling = alpha / r (alpha / sqrt(r) with rsLoRA); the ranks are the loaded ones, as the shapes are.
    scalings = [alpha / (math.sqrt(layer.r[adapter_name]) if config.use_rslora else layer.r[adapter_name])
                for layer, alpha in zip(layers, alphas)]
    if torch_device is not None:
        tensors = {key: t.to(torch_device) for key, t in tensors.items()}
    set_peft_model_state_dict(peft_model, tensors, adapter_name)  # strict, and all checked before any copy
    for layer, alpha, scaling in zip(layers, alphas, scalings):
        layer.lora_alpha[adapter_name], layer.scaling[adapter_name] = alpha, scaling
    peft_model.peft_config[adapter_name] = new_config

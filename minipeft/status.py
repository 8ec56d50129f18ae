"""What state a model's adapters are in, layer by layer and summed up: peft's ``get_layer_status``
and ``get_model_status``, with the same fields.

A model is consistent when every adapter layer agrees: the same adapters active, the same merged,
enabled or not, and each adapter's parameters all training or all frozen. Where the layers
disagree, the model-wide field reads ``"irregular"``: something (a hand-made change to one
layer, a failed call) left the model computing what no single setting describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .injection import adapter_layers
from .tuners.quantized import stored_numel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str  # the layer's qualified name in the base model
    module_type: str  # the wrapper's class, e.g. "LoraLinear"
    enabled: bool  # False inside disable_adapter()
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]  # per adapter: its parameters here all train, none, or a mix
    available_adapters: list[str]
    devices: dict[str, list[str]]  # per adapter: the device types its parameters here are on
    quantization_backend: None = None  # peft's field (peft 0.21 reports None for bitsandbytes' layers too)


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]  # adapter name -> method, e.g. {"default": "LORA"}
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: None = None


def _agreed(values: list, default):
    """The one value all ``values`` share, ``default`` when there are none, else "irregular"."""
    distinct = {repr(v): v for v in values}
    if not distinct:
        return default
    return next(iter(distinct.values())) if len(distinct) == 1 else "irregular"


def _merged_everywhere(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """The adapters merged somewhere, if each is merged in every layer that holds it (an adapter
    is judged only where it is: "b" on fewer layers than "a" is still merged everywhere)."""
    merged = sorted({a for s in layers for a in s.merged_adapters})
    if any(set(merged) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        return "irregular"
    return merged


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter layer of ``model`` (a ``PeftModel`` or a model that
    ``inject_adapter_in_model`` adapted), in model order; named as in peft, from the PeftModel's
    ``base_model`` (``model.<the base model's name>``) or from the adapted model itself."""
    from .model import PeftModel  # (late: model.py builds on this file)

    if isinstance(model, PeftModel) and model.peft_config and all(c.is_prompt_learning for c in model.peft_config.values()):
        raise TypeError("prompt tuning, P-tuning and prefix tuning keep their virtual tokens beside the model, in no adapter layer: "
                        "there is no layer status to report (peft refuses them too)")
    statuses = []
    for name, layer in adapter_layers(model.base_model if isinstance(model, PeftModel) else model):
        requires_grad, devices = {}, {}
        for adapter in layer.adapter_names:
            params = list(layer.adapter_parameters(adapter))
            requires_grad[adapter] = _agreed([p.requires_grad for p in params], False)
            devices[adapter] = sorted({p.device.type for p in params})
        statuses.append(TunerLayerStatus(
            name=name, module_type=type(layer).__name__, enabled=not layer.disable_adapters,
            active_adapters=list(layer.active_adapters), merged_adapters=list(layer.merged_here()),
            requires_grad=requires_grad, available_adapters=sorted(layer.adapter_names), devices=devices))
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' statuses summed up over ``model`` (see the module docstring for "irregular")."""
    from .model import PeftModel

    layers = get_layer_status(model)
    peft_model = isinstance(model, PeftModel)
    configs = model.peft_config if peft_model else {}
    base = model.get_base_model() if peft_model else model
    adapters = sorted({a for status in layers for a in status.available_adapters})
    requires_grad = {a: _agreed([s.requires_grad[a] for s in layers if a in s.requires_grad], False) for a in adapters}
    return TunerModelStatus(
        base_model_type=type(base).__name__,
        adapter_model_type=type(model.base_model).__name__ if peft_model else "None",  # peft's: its tuner class
        peft_types={name: config.peft_type.value for name, config in configs.items()},
        trainable_params=sum(stored_numel(p) for p in model.parameters() if p.requires_grad),
        total_params=sum(stored_numel(p) for p in model.parameters()),
        num_adapter_layers=len(layers),
        enabled=_agreed([s.enabled for s in layers], True),
        active_adapters=_agreed([s.active_adapters for s in layers], []),
        merged_adapters=_merged_everywhere(layers),
        requires_grad=requires_grad,
        available_adapters=adapters,
        devices={a: sorted({d for s in layers for d in s.devices.get(a, [])}) for a in adapters},
    )

"""Mixed precision for adapters: a half-precision frozen model under full-precision adapters, and
peft's preparation of a (quantized) base model for training, which upcasts its 16-bit weights."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """peft's helper: every frozen floating-point parameter to ``dtype`` (float16 or bfloat16,
    the mixed-precision training's), every trainable one to float32.

    The frozen weights, most of the model, then take half the memory, while the optimizer
    updates full-precision adapters: an Adam step on a bfloat16 weight would round away updates
    smaller than 2**-8 of it. Quantized weights (integers, or bitsandbytes' 4-bit codes packed
    into a float storage dtype for FSDP) and complex ones are left as they are, where peft would
    cast them too."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)


# transformers' names of the quantization methods whose stored weights peft leaves in their dtype
# (packed integers beside 16-bit scales that the kernels read as they are).
KEEPS_STORED_DTYPES = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """peft's preparation of a base model before adapters are trained on it (QLoRA's recipe), step
    for step, on any model:

    1. every parameter is frozen;
    2. every float16 or bfloat16 parameter is cast to float32 (layer norms and the head then compute
       in full precision), except bitsandbytes' 4-bit weights and the models of KEEPS_STORED_DTYPES;
       the CUDA caching allocator then returns the 16-bit copies' memory (``auto_clear_cache``);
    3. for a model loaded quantized (transformers' ``is_loaded_in_4bit``/``is_loaded_in_8bit`` or a
       ``quantization_method``) and ``use_gradient_checkpointing``: gradient checkpointing is
       switched on (``activation_checkpointing_enable``, or before transformers 5
       ``gradient_checkpointing_enable``), and unless ``use_reentrant=False`` is
       asked for, the input embeddings' output requires grad: reentrant checkpointing passes
       gradients only to blocks whose inputs require them, and a frozen embedding's output does not.

    Returns the model, changed in place (for QLoRA, ``tuners/quantized.py``, and the fp32 upcast of
    a half-precision model). One difference:
    a model whose ``gradient_checkpointing_enable`` takes no kwargs (transformers before 4.35),
    given ``gradient_checkpointing_kwargs``, is an error here, where peft warns and drops them
    (``use_reentrant=False`` among them)."""
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # (transformers' QuantizationMethod is a str enum)
    keeps_dtypes = method in KEEPS_STORED_DTYPES or getattr(model, "hqq_quantized", False)
    quantized = (getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                 or keeps_dtypes)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    if not keeps_dtypes:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache:
            for device in (torch.cuda, getattr(torch, "xpu", None)):
                if device is not None and device.is_available():
                    device.empty_cache()
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        if hasattr(model, "activation_checkpointing_enable"):  # (transformers 5's name; the old one warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return model
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(model.gradient_checkpointing_enable).parameters
        if kwargs and not takes_kwargs:
            raise TypeError(f"{type(model).__name__}.gradient_checkpointing_enable takes no gradient_checkpointing_kwargs "
                            f"(transformers before 4.35); call without them, got {kwargs}")
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {}))
    return model

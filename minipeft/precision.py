"""Mixed precision for adapters: a half-precision frozen model under full-precision adapters."""

from __future__ import annotations

import torch
from torch import nn


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """peft's helper: every frozen floating-point parameter to ``dtype`` (float16 or bfloat16,
    the mixed-precision training's), every trainable one to float32.

    The frozen weights, most of the model, then take half the memory, while the optimizer
    updates full-precision adapters: an Adam step on a bfloat16 weight would round away updates
    smaller than 2**-8 of it. Integer parameters (quantized weights) and complex ones are left as
    they are, where peft would cast them too."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if param.requires_grad else dtype)

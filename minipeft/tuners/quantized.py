"""Frozen linear layers stored quantized by bitsandbytes: QLoRA (Dettmers et al. 2023).

QLoRA trains a LoRA on a base model whose weights are stored in 4 bits (NF4, one scale per
block of 64 weights) or, with LLM.int8(), in 8 bits (one scale per row). The quantized layer
computes ``x W^T + b`` itself, dequantizing as it goes, so an adapter that adds its term to
the base layer's output (LoRA), scales its input or output ((IA)^3) or transforms its output
(bottleneck adapters) works on it unchanged, and its gradients flow to the adapter alone. What
needs W as a matrix reads it dequantized:

    merging:    W' = Q(deq(W_q) + s B A)        Q: quantize, deq: dequantize

and so merging is lossy: the merged weight is rounded to the 4- or 8-bit grid again, so the
merged model's outputs differ a little from the unmerged adapter's, and unmerging does not give
back the original weights exactly (peft warns the same). DoRA reads ``deq(W)`` for its norms.
LoftQ (``lora_loftq.py``) chooses the quantized weight and the adapter together.

The layers are recognised by their class, as ``is_gpt2_conv1d`` recognises transformers' Conv1D:
minipeft never imports bitsandbytes unless a model holds its layers, and then it is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..targeting import out_in_features

# bitsandbytes' quantized linear layers, and how each stores its weight.
QUANTIZED_LINEARS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}


def is_bitsandbytes(module: nn.Module) -> bool:
    """Whether ``module`` is one of bitsandbytes' layers (quantized linear layers, embeddings, ...)."""
    return type(module).__module__.startswith("bitsandbytes")


def quantization(module: nn.Module) -> str | None:
    """"4-bit" or "8-bit" for a bitsandbytes linear layer whose weight is stored quantized, else
    None (an 8-bit layer with has_fp16_weights keeps a float weight, quantized at each call)."""
    if not is_bitsandbytes(module):
        return None
    kind = next((kind for cls in type(module).__mro__ if (kind := QUANTIZED_LINEARS.get(cls.__name__))), None)
    weight = getattr(module, "weight", None)
    if kind == "4-bit" and getattr(weight, "bnb_quantized", False):
        return kind
    if kind == "8-bit" and weight is not None and weight.dtype == torch.int8:
        return kind
    return None


def stored_numel(param: torch.Tensor) -> int:
    """How many weights ``param`` holds: a 4-bit weight packs two in each byte of its storage
    dtype (peft counts them so too)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def linear_features(module: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """(out, in) of a linear layer: from its weight's shape, or a quantized layer's own sizes
    (its weight is packed: a 4-bit (out * in / 2, 1) of bytes)."""
    if quantization(module):
        return module.out_features, module.in_features
    return out_in_features(module.weight, fan_in_fan_out)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized linear layer computes with, in its original dtype (4-bit)
    or fp32 (8-bit: int8 rows times their scale / 127)."""
    import bitsandbytes as bnb  # (installed: the model holds its layers)

    weight = module.weight
    if quantization(module) == "4-bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU kernels repack a 4-bit weight at its first forward in eval mode,
            # into a layout dequantize_4bit does not read. Their product reads any layout:
            # I W^T = W^T for the (in, in) identity (without the bias, which would round W).
            eye = torch.eye(module.in_features, device=weight.device, dtype=module.compute_dtype or torch.float32)
            with torch.no_grad():
                rows = bnb.matmul_4bit(eye, weight, quant_state=weight.quant_state)
            return rows.T.to(getattr(weight.quant_state, "original_dtype", weight.quant_state.dtype))
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(module.state, "SCB", None) is None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


@torch.no_grad()
def set_quantized_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (out, in) into a new parameter of ``module``, with its quantization
    settings (NF4 or FP4, block size, double quantization, storage dtype), on its device."""
    import bitsandbytes as bnb

    old = module.weight
    if quantization(module) == "4-bit":
        settings = {k: v for k, v in old.__dict__.items() if k in ("blocksize", "compress_statistics", "quant_type",
                                                                    "quant_storage", "module")}
        new = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, **settings)
    else:
        new = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        module.state.reset_grads()  # (the layer's cached int8 weight and scales belong to the old one)
    module.weight = new.to(old.device)  # moving it quantizes it


@torch.no_grad()
def round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``deq(Q(weight))``: ``weight`` (out, in) as a bitsandbytes layer would store it in ``bits``
    bits and compute with it, in weight's dtype: NF4 in blocks of 64 (one absmax each, not
    quantized again), or int8 rows with one scale each (absmax / 127, of the weight in fp16)."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("quantizing as bitsandbytes does needs bitsandbytes: pip install bitsandbytes") from error
    if bits == 4:
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
        return bnb.functional.dequantize_4bit(packed, state).to(weight.dtype)
    rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))  # (Int8Params quantizes fp16)
    return bnb.functional.int8_vectorwise_dequant(rows, scales).to(weight.dtype)

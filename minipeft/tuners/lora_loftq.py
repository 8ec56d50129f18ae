"""LoftQ (Li et al. 2023): LoRA started on what quantizing the base weight loses.

QLoRA quantizes W to Q (4-bit NF4, or int8) and starts LoRA at ``B = 0``, so training begins
from the quantized model, whose error ``W - Q`` may be large. LoftQ instead chooses Q and the
adapter together, so that ``Q + s B A`` is close to W, by alternating two steps T times
(``loftq_iter``), from ``R_0 = 0``:

    Q_t   = deq(quant(W - R_{t-1}))           quantize what the low-rank part does not hold
    R_t   = SVD_r(W - Q_t)                     the best rank-r approximation of what Q_t misses

and sets ``s B A = R_T`` (split as PiSSA splits its factors: ``B = U_r sqrt(S_r / s)``,
``A = sqrt(S_r / s) V_r^T``) and the base weight to ``Q_T``. The base is stored on the
quantization grid already, so a model saved after this and loaded with bitsandbytes in that
many bits computes with exactly Q_T (``quantized.round_trip``: quantizing Q_T gives it back).
For that, Q is quantized from the weight's own dtype (a bf16 model's blocks have bf16 maxima);
the SVD runs in float32.

A saved LoftQ adapter loads onto either base. Onto the full-precision one, loading runs LoftQ
again, which with ``loftq_iter > 1`` gives Q only up to the SVD's rounding (another thread
count, another device): the dependable way is to save the base model after LoftQ, load it
quantized, and load the adapter onto it, where its layers are taken for Q as they are.

A model loaded quantized already (QLoRA) takes LoftQ's one-step form afterwards, from the
original weights in its safetensors files (``replace_lora_weights_loftq``, peft's): with Q the
stored weight, ``s B A = SVD_r(W - Q)``, the best that a rank-r update can take back.

For an nn.Linear, as peft has it. Unlike peft, the scaling is honoured (peft assigns R_T's
factors as B and A, so that ``Q + s B A = Q + s R_T``, which is LoftQ's only for s = 1), and
the quantization runs on the CPU too (peft asks for a GPU).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import safetensors
import torch
from torch import nn

from ..targeting import logical_name
from .quantized import dequantized_weight, quantization, round_trip


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, scaling: float, bits: int, iterations: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0 (r, in), B0 (out, r), Q)`` for ``weight`` (out, in) in float32, float16 or bfloat16:
    the factors in float32, Q (the base weight to keep) in the weight's dtype, on its grid; and
    ``Q + s B0 A0`` approximates the weight (module docstring)."""
    stored, weight = weight.dtype, weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        quantized = round_trip((weight - low_rank).to(stored), bits).float()
        U, S, Vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        low_rank = (U * S) @ Vh
    A, B = split_factors(U, S, Vh, scaling)
    return A, B, quantized.to(stored)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s B A = U diag(S) Vh``, the singular values shared evenly (as PiSSA shares them)."""
    root = (S / scaling).sqrt()  # (r,)
    return root[:, None] * Vh, U * root


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | os.PathLike | None = None,
                               adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """LoftQ for a model loaded quantized (peft's function): each LoRA layer on a bitsandbytes
    4-bit or 8-bit layer gets ``s B A = SVD_r(W - Q)``, W read from the model's safetensors
    files (module docstring).

    model_path: the ``model.safetensors`` file or the folder holding it (or a sharded model's
        ``model.safetensors.index.json``); None: the folder the base model was loaded from
        (transformers' ``config._name_or_path``), which must be on disk.
    callback: ``callback(peft_model, module_name) -> bool`` after each layer's factors are set;
        False puts that layer's previous factors back (e.g. when its outputs got no closer to
        the full-precision model's: LoftQ is greedy, and can be run again).
    """
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = [(logical_name(base, name) or name, layer) for name, layer in base.named_modules()
              if adapter_name in getattr(layer, "lora_A", {}) and quantization(layer.get_base_layer())]
    if not layers:
        raise ValueError(f"no LoRA layer of adapter {adapter_name!r} sits on a bitsandbytes 4-bit or 8-bit layer; "
                         "replace_lora_weights_loftq is for a model loaded quantized (QLoRA)")
    read = _safetensors_reader(base, model_path)
    for module_name, layer in layers:
        weight = read(module_name + ".weight").float().to(layer.get_base_layer().weight.device)
        U, S, Vh = torch.linalg.svd(weight - dequantized_weight(layer.get_base_layer()).float(), full_matrices=False)
        r = layer.r[adapter_name]
        before = [t.detach().clone() for t in layer.lora_factors(adapter_name)]
        layer.set_lora_factors(adapter_name, *split_factors(U[:, :r], S[:r], Vh[:r], layer.scaling[adapter_name]))
        if callback is not None and not callback(peft_model, module_name):
            layer.set_lora_factors(adapter_name, *before)


def _safetensors_reader(base: nn.Module, model_path: str | os.PathLike | None) -> Callable[[str], torch.Tensor]:
    """A function reading a tensor by its name in the base model from its safetensors files."""
    if model_path is None:
        model_path = getattr(getattr(base, "config", None), "_name_or_path", None)
        if not model_path or not os.path.isdir(model_path):
            raise ValueError("replace_lora_weights_loftq needs model_path, the model's safetensors file or folder: "
                             f"the base model's own path ({model_path!r}) is no folder on this machine")
    path = os.fspath(model_path)
    if os.path.isdir(path):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        path = single if os.path.isfile(single) else index
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) at {os.fspath(model_path)!r}")
    if path.endswith(".json"):  # a sharded model: tensor name -> file
        with open(path) as f:
            shards = {k: os.path.join(os.path.dirname(path), v) for k, v in json.load(f)["weight_map"].items()}
    else:
        with safetensors.safe_open(path, framework="pt") as f:
            shards = {k: path for k in f.keys()}
    prefix = getattr(base, "base_model_prefix", "")

    def read(name: str) -> torch.Tensor:
        # A checkpoint of the bare model lacks the task model's prefix ("model." of LlamaForCausalLM).
        for key in (name, name.removeprefix(prefix + ".") if prefix else name):
            if key in shards:
                with safetensors.safe_open(shards[key], framework="pt") as f:
                    return f.get_tensor(key)
        raise KeyError(f"{name!r} is not in the safetensors files at {os.fspath(model_path)!r}, which hold e.g. "
                       f"{sorted(shards)[:3]}")

    return read

"""Where new adapter parameters live: on the base weights' device, in fp32 on a half-precision
base (fp16/bf16) and in the base's own dtype on fp32/fp64, for every method that wraps layers.
LoRA and (IA)^3 against peft (``autocast_adapter_dtype=True``, its default); bottleneck
adapters, which peft lacks, against the same rule written out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import BottleneckConfig, IA3Config, LoraConfig, get_peft_model

peft = pytest.importorskip("peft")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


def adapter_dtypes(model, markers=("lora_", "ia3_l", "adapter_")) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if any(m in n for m in markers)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (LoraConfig(r=2, target_modules=["0", "2"]), peft.LoraConfig(r=2, target_modules=["0", "2"])),
        (
            IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
            peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
        ),
    ],
    ids=["lora", "ia3"],
)
def test_adapter_dtype_matches_peft(ours, theirs, dtype):
    model = get_peft_model(net(dtype), ours)
    reference = peft.get_peft_model(net(dtype), copy.deepcopy(theirs))
    have = adapter_dtypes(model)
    assert have and have == adapter_dtypes(reference)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "base_layer" in n)  # the base is untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bottleneck_adapter_dtype(dtype):
    model = get_peft_model(net(dtype), BottleneckConfig(target_modules=["0"], bottleneck_size=2))
    want = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    have = adapter_dtypes(model, ("adapter_down", "adapter_up"))
    assert len(have) == 4 and set(have.values()) == {want}


def test_a_module_without_tensors_gets_cpu_fp32_adapters():
    model = get_peft_model(
        net(torch.float64), BottleneckConfig(target_modules=["1"], bottleneck_size=2, hidden_size=8)
    )
    params = [p for n, p in model.named_parameters() if "adapter_" in n]
    assert params and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)

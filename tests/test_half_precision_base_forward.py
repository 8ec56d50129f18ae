"""A half-precision (bf16) base with fp32 adapters, as adapter placement makes them: the forward of
(IA)^3 and bottleneck adapters runs, returns the base's dtype, and computes the method's formula.
(LoRA's own case is in test_lora.py.) Reference: the formula evaluated in float32 from the same
weights, to bf16 accuracy."""

from __future__ import annotations

import copy

import torch
from torch import nn

from minipeft import BottleneckConfig, IA3Config, get_peft_model
from tests.models import randomize_adapters


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to(torch.bfloat16)


def linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ layer.weight.float().T + layer.bias.float()


def test_ia3_on_a_bf16_base():
    base = net()
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomize_adapters(model, seed=1, names=("ia3_l",), std=0.3, mean=1.0)
    l_out = model.base_model.model[0].ia3_l["default"].flatten()
    l_in = model.base_model.model[2].ia3_l["default"].flatten()
    assert l_out.dtype == l_in.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        h = torch.relu(l_out * linear32(base[0], x))  # output side: l * (W x + b)
        expected = linear32(base[2], l_in * h)  # input side: W (l * x) + b
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_bottleneck_on_a_bf16_base():
    base = net()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["0"], bottleneck_size=3, scaling=2.0))
    randomize_adapters(model, seed=1, names=("adapter_up",), std=0.3)
    layer = model.base_model.model[0]
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    assert down.weight.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        h = linear32(base[0], x)
        expected = h + 2.0 * (torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)

"""LoraLinear's fused Triton path computes what its reference path computes.

On a GPU the layer picks the fused path by itself; here the kernels run on CPU tensors under
Triton's interpreter (see conftest.py), so the test calls the fused forward directly.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import minipeft.kernels as kernels
import minipeft.tuners.lora as lora
from minipeft import LoraConfig, get_peft_model

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")


@pytest.mark.filterwarnings("ignore:lora_bias=True on '0', a Linear without bias")
@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_and_grads_equal_the_reference(bias, lora_bias):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40, bias=bias))
    config = LoraConfig(r=5, lora_alpha=10, target_modules=["0"], init_lora_weights=False, lora_bias=lora_bias)
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if lora_bias:  # init_lora_weights=False leaves it random, so a missing term shows
        params.append(layer.lora_B["default"].bias)
        assert params[-1].abs().min() > 0
    x = torch.randn(3, 7, 24)

    def run(fused: bool):
        layer.zero_grad()
        x_ = x.clone().requires_grad_(True)
        y = layer._fused_forward(x_, "default") if fused else layer(x_)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        with torch.no_grad():  # the reference adds its terms in place here, and so does the fused lora_bias
            y_no_grad = layer._fused_forward(x, "default") if fused else layer(x)
        return y.detach(), y_no_grad, x_.grad, *(p.grad.clone() for p in params)

    for got, want in zip(run(fused=True), run(fused=False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_path_is_chosen_only_where_it_applies():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    x = torch.randn(2, 8)
    assert not layer._fused_path_applies(x, ["default"])  # CPU tensor: reference path
    off = get_peft_model(
        nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], use_fused_kernels=False)
    ).base_model.model[0]
    assert off.use_fused_kernels == {"default": False} and layer.use_fused_kernels == {"default": True}


class _FakeQuantLinear(nn.Linear):
    def forward(self, x):  # a subclass computing something other than F.linear (as QAT's fake quantisation)
        return super().forward(x.round())


@pytest.mark.parametrize("change", ["none", "subclass", "forward hook", "pre-hook", "backward hook", "global hook",
                                    "own forward", "deterministic", "deterministic, no dropout", "nested"])
def test_the_fused_path_never_skips_what_the_base_layers_call_would_do(change, monkeypatch, request):
    # The kernels compute F.linear in place of calling the base layer: anything else the call
    # would do sends the layer down its reference path. Under deterministic algorithms, so does
    # anything but the cuBLAS route without dropout (kernels.is_deterministic).
    # (CUDA faked around the rule alone.)
    base = nn.Sequential(_FakeQuantLinear(8, 8) if change == "subclass" else nn.Linear(8, 8))
    dropout = 0.1 if change == "deterministic" else 0.0
    layer = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_dropout=dropout)).base_model.model[0]
    layer.train()
    if change == "forward hook":
        layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    elif change == "pre-hook":
        layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    elif change == "backward hook":
        layer.base_layer.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    elif change == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
        request.addfinalizer(handle.remove)
    elif change == "own forward":
        layer.base_layer.forward = lambda x: nn.functional.linear(x, layer.base_layer.weight) + 1
    elif change.startswith("deterministic"):
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    x = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]) if change == "nested" else torch.randn(2, 8)
    monkeypatch.setattr(lora, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))  # as if x were on the GPU
    assert layer._fused_path_applies(x, ["default"]) == (change in ("none", "deterministic, no dropout"))
    if change == "deterministic":
        assert layer.eval()._fused_path_applies(x, ["default"])  # (no dropout in eval mode)
    if change == "deterministic, no dropout":  # ... but decoding's few-rows kernel is autotuned
        assert not layer.to(torch.bfloat16)._fused_path_applies(x.to(torch.bfloat16), ["default"])


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_under_autocast_a_half_precision_model_takes_the_fused_path(stored, monkeypatch):
    # Under autocast, F.linear computes in autocast's dtype; so do the kernels, where the frozen
    # weights are stored in it (x, here the fp32 output of a layer norm, is cast as F.linear casts
    # it). An fp32 model would need its weights cast on every call: the reference path, left to
    # autocast. Either way the layer computes what its reference path computes under autocast.
    monkeypatch.setattr(lora, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))  # the kernels run on the interpreter
    torch.manual_seed(0)
    config = dict(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    fused = get_peft_model(nn.Sequential(nn.Linear(40, 48)).to(stored), LoraConfig(**config))
    reference = get_peft_model(nn.Sequential(nn.Linear(40, 48)).to(stored), LoraConfig(**config, use_fused_kernels=False))
    reference.load_state_dict(fused.state_dict())
    assert fused.base_model.model[0].lora_A["default"].weight.dtype == torch.float32  # (adapters in fp32)
    x = torch.randn(3, 40, 40)
    calls = []
    real = kernels.lora_linear
    monkeypatch.setattr(kernels, "lora_linear", lambda *args, **kw: calls.append(args[0].dtype) or real(*args, **kw))

    def step(model):
        model.zero_grad()
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x_)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        layer = model.base_model.model[0]
        return [y.detach(), x_.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    got, want = step(fused), step(reference)
    assert calls == ([torch.bfloat16] if stored == torch.bfloat16 else [])
    assert got[0].dtype == want[0].dtype == torch.bfloat16  # (autocast's linear: bf16 out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_a_bias_stored_in_another_dtype_takes_the_reference_path(monkeypatch):
    # The kernels take one dtype for x, W and b; a bf16 layer with an fp32 bias computes on the
    # reference path (F.linear promotes), not an error from the kernels.
    monkeypatch.setattr(lora, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    base = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    base[0].bias.data = base[0].bias.data.float()
    layer = get_peft_model(base, LoraConfig(r=2, target_modules=["0"])).base_model.model[0]
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert not layer._fused_path_applies(x, ["default"])
    base[0].bias.data = base[0].bias.data.to(torch.bfloat16)
    assert layer._fused_path_applies(x, ["default"])


def test_under_autocast_an_input_autocast_leaves_alone_takes_the_reference_path(monkeypatch):
    # Autocast casts fp32, fp16 and bf16 inputs, not fp64: F.linear then refuses the bf16 weight,
    # and so must the fused path rather than cast x itself.
    monkeypatch.setattr(lora, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    layer = get_peft_model(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16),
                           LoraConfig(r=2, target_modules=["0"])).base_model.model[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_path_applies(torch.randn(2, 8), ["default"])
        assert not layer._fused_path_applies(torch.randn(2, 8, dtype=torch.float64), ["default"])

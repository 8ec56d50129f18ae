"""Bottleneck adapters where the obvious cases hide the rule: a reduction factor that does not
divide the width, a module returning a namedtuple, and a parallel and a sequential adapter
active on one module at once. References are written out by hand from the module docstring.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

from minipeft import BottleneckConfig, get_peft_model
from tests.models import randomize_adapters


def term(layer, name: str, h: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """s * (relu(h Wd^T + bd) Wu^T + bu), the adapter term written out."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return s * (torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


@pytest.mark.parametrize("factor, b", [(3, 2), (2.5, 3), (16, 1), (8, 1)])
def test_bottleneck_width_is_the_floor_of_width_over_reduction_factor(factor, b):
    # b = max(1, d // factor) with d = 8: 8 // 3 = 2, 8 // 2.5 = 3, never below one
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), BottleneckConfig(target_modules=["0"], reduction_factor=factor))
    layer = model.base_model.model[0]
    assert layer.adapter_down["default"].out_features == b
    assert model.get_nb_trainable_parameters()[0] == 2 * 8 * b + b + 8


Output = collections.namedtuple("Output", ["hidden", "extra"])


class ReturnsNamedTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)

    def forward(self, x):
        return Output(self.dense(x), x.sum())


def test_a_namedtuple_output_comes_back_as_the_same_namedtuple():
    torch.manual_seed(0)
    base = nn.Sequential(ReturnsNamedTuple())
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["0"], bottleneck_size=2, hidden_size=8))
    randomize_adapters(model, names=("adapter_up",), std=0.3)
    layer, x = model.base_model.model[0], torch.randn(3, 8)
    out = layer(x)
    assert type(out) is Output  # callers read out.hidden / out.extra
    h = base[0].dense(x)
    torch.testing.assert_close(out.hidden, h + term(layer, "default", h))
    assert torch.equal(out.extra, x.sum())


def test_parallel_terms_are_added_before_sequential_adapters_transform_the_output():
    # BottleneckLayer: "parallel terms are computed from the input and added to the module's
    # output, then sequential adapters each transform the running output"
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["0"], bottleneck_size=3,
                                                                 placement="sequential", scaling=0.5))
    model.add_adapter("par", BottleneckConfig(target_modules=["0"], bottleneck_size=2, placement="parallel", scaling=2.0))
    randomize_adapters(model, names=("adapter_up",), std=0.5)
    layer, x = model.base_model.model[0], torch.randn(4, 8)
    layer.set_adapter(["default", "par"])  # both at once, sequential listed first
    h = base[0](x) + term(layer, "par", x, 2.0)
    expected = h + term(layer, "default", h, 0.5)
    torch.testing.assert_close(layer(x), expected)

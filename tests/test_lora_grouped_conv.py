"""LoRA on a grouped convolution (a depthwise one included), as peft builds it: A reads every
input channel, B is grouped as the convolution is (r divisible by the groups). The same outputs,
gradients and checkpoints as peft 0.21; merging is refused, as the update does not fit the
grouped kernel, and unloading gives the base back. The forward by hand: base(x) + s B(A(x))."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from tests.against_peft import assert_checkpoints_load_both_ways, seeded_pair

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)

    def forward(self, x):
        return self.grouped(torch.relu(self.depthwise(x)))


def test_outputs_gradients_and_checkpoints_are_peft_s(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    config = dict(r=8, lora_alpha=16, target_modules=["depthwise", "grouped"], init_lora_weights=False)
    theirs, ours = seeded_pair(base, "LoraConfig", config)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    for model in (theirs, ours):
        model(x).pow(2).mean().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_grads[name], msg=name)
    layer = ours.get_base_model().grouped
    assert layer.lora_B["default"].weight.shape == (12, 2, 1, 1)  # r / groups channels per group
    hidden = torch.relu(ours.get_base_model().depthwise(x))
    by_hand = layer.base_layer(hidden) + 2.0 * layer.lora_B["default"](layer.lora_A["default"](hidden))
    torch.testing.assert_close(layer(hidden), by_hand)
    assert_checkpoints_load_both_ways(base, theirs, ours, lambda model: model(x), tmp_path)


def test_merging_is_refused_and_unloading_gives_the_base_back():
    torch.manual_seed(0)
    base = ConvNet()
    model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=4, target_modules=["grouped"],
                                                                             init_lora_weights=False))
    x = torch.randn(1, 8, 4, 4)
    adapted = model(x)
    with pytest.raises(ValueError, match=r"cannot merge adapter 'default' into .*grouped.*: the convolution is grouped "
                                         r"\(groups=4\)"):
        model.merge_adapter()
    torch.testing.assert_close(model(x), adapted)  # nothing merged
    torch.testing.assert_close(model.unload()(x), base(x))


def test_a_rank_the_groups_do_not_divide_and_dora_are_refused():
    with pytest.raises(ValueError, match=r"groups=4, needs a rank divisible by the groups .* gets r=6"):
        minipeft.get_peft_model(ConvNet(), minipeft.LoraConfig(r=6, target_modules=["grouped"]))
    with pytest.raises(ValueError, match=r"DoRA on 'grouped', a convolution with groups=4"):
        minipeft.get_peft_model(ConvNet(), minipeft.LoraConfig(r=4, target_modules=["grouped"], use_dora=True))

"""A block reused across layers (ALBERT's cross-layer sharing: one module object in every slot
of a ModuleList) is adapted once, through every slot, as peft does: the same outputs, the same
checkpoint, loaded both ways. (A module held by two different parents stays refused: see
test_lora.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from tests.against_peft import assert_checkpoints_load_both_ways, seeded_pair

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class SharedLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = Block()
        self.layers = nn.ModuleList([shared] * 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_a_shared_block_is_adapted_once_for_every_layer_as_peft(tmp_path):
    torch.manual_seed(0)
    base = SharedLayers()
    theirs, ours = seeded_pair(base, "LoraConfig", dict(r=2, target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    assert all(layer.lin is ours.get_base_model().layers[0].lin for layer in ours.get_base_model().layers)
    assert sorted(minipeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    assert_checkpoints_load_both_ways(base, theirs, ours, lambda model: model(x), tmp_path)
    lin = ours.get_base_model().layers[0].lin
    by_hand = copy.deepcopy(base)
    with torch.no_grad():
        by_hand.layers[0].lin.weight += lin.delta_weight("default")
    torch.testing.assert_close(ours(x), by_hand(x))  # the update reaches all four calls

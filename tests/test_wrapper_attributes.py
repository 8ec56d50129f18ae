"""A wrapper stands where the adapted module stood, so model code that reads the module's
attributes (``self.tok.embedding_dim``, ``self.conv.out_channels``) keeps working: they come
from the original module. An inner wrapper's own adapter attributes do not show through an
outer one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import minipeft
from minipeft.tuners import AdapterLayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv1d(16, 12, kernel_size=3, padding=1)
        self.proj = nn.Linear(12, 4)

    def forward(self, ids):
        h = self.tok(ids) * math.sqrt(self.tok.embedding_dim)
        h = h.masked_fill((ids == self.tok.padding_idx).unsqueeze(-1), 0)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        assert h.shape[-1] == self.conv.out_channels == self.proj.in_features
        return self.proj(h.sum(1))


@pytest.mark.parametrize("config", [
    minipeft.LoraConfig(r=2, target_modules=["tok", "conv", "proj"]),
    minipeft.LoHaConfig(r=2, target_modules=["conv", "proj"]),
    minipeft.OFTConfig(r=0, oft_block_size=4, target_modules=["proj"]),
])
def test_model_code_reads_the_adapted_modules_attributes(config):
    torch.manual_seed(0)
    base = Net()
    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    expected = base(ids)
    model = minipeft.get_peft_model(base, config)  # raised AttributeError: no attribute 'embedding_dim'
    torch.testing.assert_close(model(ids), expected)  # (the adapters start as the identity)
    assert isinstance(model.get_base_model().proj, AdapterLayer)  # the reads went through a wrapper


def test_an_outer_wrapper_shows_the_module_not_the_inner_adapter():
    model = minipeft.get_peft_model(Net(), minipeft.LoraConfig(r=2, target_modules=["proj"]))
    model.add_adapter("loha", minipeft.LoHaConfig(r=2, target_modules=["proj"]))
    outer = model.get_base_model().proj
    assert outer.in_features == 12 and outer.out_features == 4
    assert hasattr(outer.base_layer, "lora_A") and not hasattr(outer, "lora_A")
    with pytest.raises(AttributeError, match=r"has no attribute 'nothing_here', and neither has the Linear it adapts"):
        outer.nothing_here

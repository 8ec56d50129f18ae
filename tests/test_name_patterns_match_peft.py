"""Name patterns that pick per-module settings, on names built to tell a dotted segment from a
substring: ``proj`` vs ``out_proj``, ``layers`` vs ``sublayers``. The reference is peft 0.21 on
the same model and config (its rank_pattern rule and its layer-index rule); the state dicts
must have the same keys and shapes, which is where a rank or a skipped layer shows.
"""

from __future__ import annotations

import copy

import pytest
from torch import nn

import minipeft
from minipeft.targeting import layer_index

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.out_proj(self.proj(x))


class Net(nn.Module):
    """``layers.<i>`` are the model's layers; ``sublayers.<i>`` only end with that word."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.sublayers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in [*self.layers, *self.sublayers]:
            x = block(x)
        return x


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["proj", "out_proj"], rank_pattern={"proj": 2}, alpha_pattern={"proj": 3}),
        dict(target_modules=["proj", "out_proj"], rank_pattern={"out_proj": 2}),
        dict(target_modules=["proj"], layers_to_transform=[0], layers_pattern="layers"),
        dict(target_modules=["proj", "out_proj"], layers_to_transform=[1], layers_pattern=["sublayers"]),
    ],
)
def test_same_modules_and_ranks_as_peft(config):
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=4, lora_alpha=8, **config))
    assert shapes(ours) == shapes(theirs)
    scalings = {n: m.scaling for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert {n: m.scaling for n, m in ours.named_modules() if hasattr(m, "lora_A")} == scalings


def test_a_layers_pattern_is_a_whole_name_segment():
    # by hand: the index follows the segment "layers", not a segment that merely ends with it
    assert layer_index("layers.0.proj", "layers") == 0
    assert layer_index("model.layers.3.proj", "layers") == 3
    assert layer_index("sublayers.1.proj", "layers") is None
    assert layer_index("model.sublayers.1.proj", ["layers"]) is None
    assert layer_index("model.sublayers.1.proj", ["layers", "sublayers"]) == 1

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
        # a module named in full is adapted outside the chosen layers too
        dict(target_modules=["layers.0.proj", "out_proj"], layers_to_transform=[1], layers_pattern="layers"),
        # a regex, whose group does not take the layer number's place
        dict(target_modules=["proj"], layers_to_transform=[0], layers_pattern="(sub)?layers"),
        dict(target_modules=["proj"], layers_to_transform=[1], layers_pattern="(layers|sublayers)"),
    ],
)
def test_same_modules_and_ranks_as_peft(config):
    base = Net()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=4, lora_alpha=8, **config))
    assert shapes(ours) == shapes(theirs)
    scalings = {n: m.scaling for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert {n: m.scaling for n, m in ours.named_modules() if hasattr(m, "lora_A")} == scalings


def test_a_layers_pattern_split_by_a_bare_or_is_refused():
    # peft puts the pattern inside a longer regex without a group, so "layers|sublayers" splits
    # it: its first half finds no layer number, and only sublayers are adapted. Said, not copied.
    with pytest.raises(ValueError, match=r"layers_pattern 'layers\|sublayers' has a '\|' outside any group: .* "
                                         r"as a list, e.g. \['layers', 'sublayers'\]"):
        minipeft.LoraConfig(target_modules=["proj"], layers_to_transform=[1], layers_pattern="layers|sublayers")
    for grouped in ["(layers|sublayers)", "la[|]yers", r"la\|yers"]:  # a group, a class, an escaped bar
        minipeft.LoraConfig(target_modules=["proj"], layers_to_transform=[1], layers_pattern=grouped)

    # peft's rule without layers_pattern: the number after two named segments, so the top-level
    # layers.0.proj has none: both libraries refuse (it matches nothing), and both take the pattern.
    config = dict(r=4, target_modules=["proj"], layers_to_transform=[0])
    with pytest.raises(ValueError, match="Target modules .* not found"):
        peft.get_peft_model(Net(), peft.LoraConfig(**config))
    with pytest.raises(ValueError, match="give layers_pattern=\\['layers', 'sublayers'\\]"):
        minipeft.get_peft_model(Net(), minipeft.LoraConfig(**config))
    assert layer_index("layers.0.proj", None) is None and layer_index("model.layers.3.proj", None) == 3


def test_a_layers_pattern_is_a_whole_name_segment():
    # by hand: the index follows the segment "layers", not a segment that merely ends with it
    assert layer_index("layers.0.proj", "layers") == 0
    assert layer_index("model.layers.3.proj", "layers") == 3
    assert layer_index("sublayers.1.proj", "layers") is None
    assert layer_index("model.sublayers.1.proj", ["layers"]) is None
    assert layer_index("model.sublayers.1.proj", ["layers", "sublayers"]) == 1


@pytest.mark.parametrize("method", ["LoraConfig", "VeraConfig"])
@pytest.mark.parametrize(
    "selection, error",
    [
        (dict(target_modules=["proj"], layers_pattern="layers"), "layers_pattern only says where layer numbers are"),
        (dict(target_modules=r"layers\.\d\.proj", layers_to_transform=[0]), "layers_to_transform needs target_modules as a list"),
    ],
)
def test_layer_selection_that_peft_refuses_or_ignores_is_refused(method, selection, error):
    """A layers_pattern without layers_to_transform, and a layer list with a regex target_modules:
    peft's LoRA refuses both, peft's VeRA refuses the first and ignores the list with a regex
    (adapting layers it leaves out). minipeft refuses all four, so no config of its means less or
    other than it says there."""
    with pytest.raises(ValueError, match=error):
        getattr(minipeft, method)(**selection)
    if method == "LoraConfig" or "layers_pattern" in selection:
        with pytest.raises(ValueError):
            getattr(peft, method)(**selection)
    else:
        theirs = peft.get_peft_model(Net(), getattr(peft, method)(r=2, **selection))
        adapted = sorted(n for n, m in theirs.named_modules() if hasattr(m, "vera_lambda_b"))
        assert adapted == ["base_model.model.layers.0.proj", "base_model.model.layers.1.proj"]  # not layer 0 alone

"""A checkpoint tensor with the right number of elements but another shape: an (IA)^3 vector
saved for the other side of a square layer, or a LoRA matrix written transposed. Loading must
refuse it by shape before copying anything (the documented all-or-nothing load), not stop
halfway on torch's own copy error with the earlier tensors already overwritten.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minipeft
from minipeft import IA3Config, LoraConfig, get_peft_model


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_an_ia3_vector_of_the_other_side_is_refused_and_nothing_is_loaded():
    saved = get_peft_model(net(), IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))  # "2": (1, 8)
    state = minipeft.get_peft_model_state_dict(saved)
    state = {k: v + 0.5 for k, v in state.items()}
    target = get_peft_model(net(), IA3Config(target_modules=["0", "2"], feedforward_modules=[]))  # "2": (8, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"'base_model.model.2.ia3_l': checkpoint has \(1, 8\), the model expects \(8, 1\)"):
        minipeft.set_peft_model_state_dict(target, state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_transposed_lora_matrix_is_refused_and_nothing_is_loaded():
    model = get_peft_model(net(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    state = minipeft.get_peft_model_state_dict(model)
    state = {k: v + 1.0 for k, v in state.items()}
    key = "base_model.model.2.lora_A.weight"
    state[key] = state[key].T.contiguous()  # (8, 2) instead of (2, 8): 16 elements either way
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"'{key}': checkpoint has \(8, 2\), the model expects \(2, 8\)"):
        minipeft.set_peft_model_state_dict(model, state)
    for k, value in model.state_dict().items():
        assert torch.equal(value, before[k]), k

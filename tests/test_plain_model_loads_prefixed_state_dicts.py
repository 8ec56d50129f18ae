"""A model adapted in place (inject_adapter_in_model, no PeftModel around it) loads an adapter
state dict saved from a PeftModel, whose keys start with ``base_model.model.``: the prefix is
dropped, as peft's set_peft_model_state_dict does. Reference: peft's own PeftModel with the same
adapter weights, and peft loading the same dict into its own in-place model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft

peft = pytest.importorskip("peft")


def test_a_peft_model_state_dict_loads_into_a_model_adapted_in_place():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    source = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    state = peft.get_peft_model_state_dict(source)
    assert all(k.startswith("base_model.model.") for k in state)  # the case under test
    x = torch.randn(5, 4)

    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0", "2"]), copy.deepcopy(base))
    peft.set_peft_model_state_dict(theirs, state)
    ours = minipeft.inject_adapter_in_model(minipeft.LoraConfig(r=2, target_modules=["0", "2"]), copy.deepcopy(base))
    minipeft.set_peft_model_state_dict(ours, state)
    with torch.no_grad():
        expected = source(x)
        torch.testing.assert_close(theirs(x), expected)  # peft's own behaviour, for the record
        torch.testing.assert_close(ours(x), expected)
    unprefixed = minipeft.get_peft_model_state_dict(ours)
    assert unprefixed.keys() == {k.removeprefix("base_model.model.") for k in state}
    for key, value in state.items():
        assert torch.equal(unprefixed[key.removeprefix("base_model.model.")], value), key

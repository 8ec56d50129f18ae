"""Deleting an adapter that is not the active one leaves the active one active (and training);
only deleting the active adapter hands over, to the first that remains. With two adapters the
first remaining one is always the active one, so three are needed to tell the rules apart. The
reference for what the model computes is the same model before the deletion."""

from __future__ import annotations

import copy

import torch

from minipeft import LoraConfig, get_peft_model
from tests.models import TinyNet, input_ids, randomize_adapters


def three_adapters():
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, target_modules=["fc1"]), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["fc1"]))
    randomize_adapters(model)
    return model


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_deleting_another_adapter_keeps_the_active_one():
    model = three_adapters()
    model.set_adapter("b")
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids)
    expected_trainable = trainable(model)
    model.delete_adapter("c")
    assert model.active_adapter == "b" and model.active_adapters == ["b"]
    assert trainable(model) == expected_trainable and all(".b." in n for n in expected_trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), expected, rtol=0, atol=0)


def test_deleting_the_active_adapter_hands_over_to_the_first_remaining():
    model = three_adapters()
    model.set_adapter("b")
    reference = copy.deepcopy(model)
    reference.set_adapter("a")
    ids = input_ids()
    model.delete_adapter("b")
    assert model.active_adapter == "a"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), reference(input_ids=ids), rtol=0, atol=0)


def test_an_adapter_added_after_the_last_was_deleted_is_the_active_one():
    # (peft 0.21 refuses add_adapter here.) The new adapter is the model's only one: it is the
    # one active, trained and merged, as a first adapter is.
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, target_modules=["fc1"]))
    model.delete_adapter("default")
    model.add_adapter("x", LoraConfig(r=2, target_modules=["fc1"]))
    assert model.active_adapter == "x" and model.active_adapters == ["x"]
    assert trainable(model) and all(".x." in n for n in trainable(model))
    randomize_adapters(model)
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids)
        torch.testing.assert_close(model.merge_and_unload()(input_ids=ids), expected, atol=1e-5, rtol=0)

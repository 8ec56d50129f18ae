"""DoRA beside another LoRA adapter on one layer. DoRA's row norms are those of W0, the base
weight without any merged adapter, so merging another adapter changes no DoRA output, and a DoRA
adapter added on top of a merge starts as the identity (peft takes the norm of the weight as it
stands, and there the model moves). A DoRA adapter rescales what the adapters before it added,
so merges keep the active order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import LoraConfig, get_peft_model
from tests.merge_checks import assert_merge_in_order_and_unmerge


def lora_then_dora(dora_first: bool = False):
    """nn.Linear(8, 6) with a plain LoRA adapter and a DoRA one, both active, in that order (or the
    reverse), random factors and magnitudes that are not the initial norms."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    plain = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    dora = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, use_dora=True)
    first, second = (dora, plain) if dora_first else (plain, dora)
    model = get_peft_model(copy.deepcopy(base), first)
    model.add_adapter("b", second)
    with torch.no_grad():
        for magnitude in model.get_base_model()[0].lora_magnitude_vector.values():
            magnitude.weight.mul_(1.5)
    model.set_adapter(["default", "b"])
    return model, base


@pytest.mark.parametrize("dora_first", [False, True])
def test_merges_in_the_active_order_keep_the_outputs_and_others_are_refused(dora_first):
    model, base = lora_then_dora(dora_first)
    assert_merge_in_order_and_unmerge(model, base, lambda m: m(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))))


@pytest.mark.parametrize("dora_first", [False, True])
def test_the_first_adapter_merged_alone_keeps_the_outputs(dora_first):
    model, _ = lora_then_dora(dora_first)
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x)
        model.merge_adapter(["default"])
        # The DoRA adapter still acting (second) takes its norm of W0, not of W0 + the merged update.
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_an_unload_merging_out_of_order_is_refused_and_changes_nothing():
    model, _ = lora_then_dora()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x)
        with pytest.raises(ValueError, match="merge them in order"):
            model.merge_and_unload(adapter_names=["b", "default"])
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_a_dora_adapter_added_over_a_merged_one_starts_as_the_identity():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.merge_adapter()
        merged = model(x)
        model.add_adapter("dora", LoraConfig(r=2, target_modules=["0"], use_dora=True))  # B = 0: DoRA's m = ||W0||
        with pytest.warns(UserWarning, match="unmerging them before activating"):
            model.set_adapter(["default", "dora"])
        torch.testing.assert_close(model(x), merged, atol=1e-6, rtol=1e-6)
        layer = model.get_base_model()[0]
        torch.testing.assert_close(layer.lora_magnitude_vector["dora"].weight, layer.dora_base_weight().norm(dim=1))


def test_w0_is_computed_once_per_merged_state(monkeypatch):
    # Taking the merged adapters out of W costs a pass over W: once per merge, not per forward.
    model, _ = lora_then_dora()
    layer = model.get_base_model()[0]
    calls = []
    real = type(layer).unmerged_base_tensors
    monkeypatch.setattr(type(layer), "unmerged_base_tensors", lambda self: calls.append(1) or real(self))
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x)
        model.merge_adapter(["default"])
        calls.clear()
        outputs = [model(x) for _ in range(3)]
        assert len(calls) == 1
        model.unmerge_adapter()
        model.merge_adapter(["default"])  # a new merged state (the weight was written): computed anew
        calls.clear()
        outputs.append(model(x))
        assert len(calls) == 1
    for out in outputs:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_a_merged_model_moved_with_to_still_unmerges():
    # The row factor kept for unmerging is no parameter or buffer, so .to() does not move it.
    model, base = lora_then_dora()
    model.merge_adapter()
    model.to("meta")
    model.unmerge_adapter()  # raised: the factor on the CPU, the weight on meta
    assert model.get_base_model()[0].base_layer.weight.device.type == "meta"
    model, base = lora_then_dora()
    model.merge_adapter()
    model.double()
    model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model()[0].base_layer.weight, base[0].weight.double(),
                               atol=1e-6, rtol=1e-6)

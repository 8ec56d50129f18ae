"""Merging several adapters one after the other, and undoing it.

References: the weights before any merge (unmerging must give them back), the plain merge
(``safe_merge`` must refuse exactly when the merge it guards would write NaN or inf), and the
forward of the adapters themselves (a merged model computes what the unmerged one did).
Biases are drawn at random here: the tiny transformers models start theirs at zero, where
``l * b == b`` and a bias that is never restored looks restored.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import IA3Config, LoraConfig, get_peft_model, injection
from minipeft.tuners import ModulesToSaveWrapper
from minipeft.tuners.base import AdapterLayer
from tests.models import TinyNet, first_output, input_ids, randomize_adapters, tiny_transformers_model


def test_safe_merge_judges_each_adapter_on_top_of_those_merged_before_it():
    # Each update alone keeps the weight finite; the two together overflow float32 (max ~3.4e38).
    model = get_peft_model(nn.Sequential(nn.Linear(3, 2)), LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    model.add_adapter("b", LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in ("default", "b"):
            layer.lora_A[name].weight.fill_(1.0)
            layer.lora_B[name].weight.fill_(2e38)
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()

    for name in ("default", "b"):  # alone, each merges and stays finite
        alone = copy.deepcopy(model)
        alone.merge_adapter([name], safe_merge=True)
        assert torch.isfinite(alone.base_model.model[0].get_base_layer().weight).all()
    plain = copy.deepcopy(model)  # the reference: what the merge safe_merge guards would write
    plain.merge_adapter(["default", "b"])
    assert not torch.isfinite(plain.base_model.model[0].get_base_layer().weight).all()

    with pytest.raises(ValueError, match="merging adapter 'b' into '0'"):
        model.merge_adapter(["default", "b"], safe_merge=True)
    with pytest.raises(ValueError, match="merging adapter 'b' into this LoraLinear"):
        layer.merge(["default", "b"], safe_merge=True)
    assert torch.equal(weight, before) and not layer.merged


def test_unmerging_two_dora_adapters_gives_back_the_base_weights():
    # DoRA's merge rescales rows by a factor of the weight it was merged into, so the merges
    # must be undone newest first, each with its own factor.
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], use_dora=True))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=["fc1", "fc2"], use_dora=True))
    randomize_adapters(model, std=0.3)
    ids = input_ids()
    model.merge_adapter(["default", "b"])
    model.unmerge_adapter()
    expected = dict(base.named_parameters())
    for name, p in model.get_base_model().named_parameters():
        if "base_layer" in name:
            torch.testing.assert_close(p, expected[name.replace(".base_layer", "")], atol=1e-5, rtol=0, msg=name)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids), base(input_ids=ids), atol=1e-5, rtol=0)


def test_ia3_merge_and_unmerge_of_two_vectors_treat_a_nonzero_bias_as_the_forward_does():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))  # nn.Linear's init: nonzero biases
    config = IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])
    model = get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("b", config)
    randomize_adapters(model, seed=3, names=("ia3_l",), std=0.3, mean=1.0)
    injection.set_adapter(model.get_base_model(), ["default", "b"])  # both vectors scale
    x = torch.randn(3, 6)
    expected = model(x)
    out_side, in_side = model.base_model.model[0], model.base_model.model[2]
    l_out = out_side.ia3_l["default"].detach().flatten() * out_side.ia3_l["b"].detach().flatten()

    model.merge_adapter(["default", "b"])
    # by hand: the output side scales its bias too, the input side leaves it alone
    torch.testing.assert_close(out_side.get_base_layer().bias, l_out * base[0].bias, rtol=1e-6, atol=0)
    torch.testing.assert_close(in_side.get_base_layer().bias, base[2].bias, rtol=0, atol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)

    model.unmerge_adapter()
    for i in (0, 2):
        layer = model.base_model.model[i].get_base_layer()
        torch.testing.assert_close(layer.weight, base[i].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.bias, base[i].bias, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def stacked(base):
    """LoRA "default" on query/value, then (IA)^3 "ia3" on key/value: value holds both wrappers."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    model.add_adapter("ia3", IA3Config(target_modules=["key", "value"], feedforward_modules=[]))
    randomize_adapters(model, seed=1)
    randomize_adapters(model, seed=2, names=("ia3_l",), std=0.3, mean=1.0)
    return model.eval()


def test_unload_of_stacked_wrappers_gives_back_the_plain_base_model():
    base = tiny_transformers_model("bert_model")
    model = stacked(base)
    value = model.base_model.model.encoder.layer[0].attention.self.value
    assert "ia3" in value.ia3_l and "default" in value.base_layer.lora_A  # the case under test
    plain = model.unload()
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


def test_merge_and_unload_of_stacked_adapters_computes_what_both_wrappers_did():
    base = tiny_transformers_model("bert_model")
    model = stacked(base)
    injection.set_adapter(model.get_base_model(), ["default", "ia3"])  # both apply: LoRA inside, (IA)^3 around it
    ids = input_ids()
    with torch.no_grad():
        expected = first_output(model(input_ids=ids))
        lora_only = first_output(copy.deepcopy(model).merge_and_unload(adapter_names=["default"])(input_ids=ids))
    assert not torch.allclose(expected, lora_only, atol=1e-4)  # (IA)^3 changes the output: it must be merged too
    merged = model.merge_and_unload(adapter_names=["default", "ia3"])
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(first_output(merged(input_ids=ids)), expected, atol=1e-5, rtol=1e-5)

"""get_base_model_state_dict / set_base_model_state_dict: the base model's tensors under the names
it had before adapters wrapped it. The references: the unwrapped model's own state dict, and
peft's functions of the same names on the same adapters."""

from __future__ import annotations

import pytest
import torch

import minipeft
from tests.against_peft import seeded_pair
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

CONFIGS = [
    ("LoraConfig", dict(r=4, target_modules=["fc1", "embed", "conv1d"], modules_to_save=["head"])),
    ("LoraConfig", dict(r=4, target_modules=["fc2"], trainable_token_indices={"embed": [1, 2]}, bias="all")),
    ("IA3Config", dict(target_modules=["fc1", "fc2"], feedforward_modules=["fc1"])),
    ("PromptTuningConfig", dict(num_virtual_tokens=3, task_type="SEQ_CLS")),  # (the model is not wrapped)
]


@pytest.mark.parametrize("config_class, config", CONFIGS, ids=["lora+modules_to_save", "tokens+bias", "ia3", "prompt"])
def test_the_base_state_dict_is_the_unwrapped_model_s_and_peft_s(config_class, config):
    torch.manual_seed(0)
    base = tiny_transformers_model("bert") if config_class == "PromptTuningConfig" else TinyNet()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    theirs, ours = seeded_pair(base, config_class, config)
    randomize_adapters(ours, names=("lora_", "ia3_", "modules_to_save", "trainable_tokens"), mean=0.5)
    got = minipeft.get_base_model_state_dict(ours)
    assert list(got) == list(original)  # the same keys, in the model's order
    assert all(torch.equal(got[k], original[k]) for k in original)
    if config_class == "PromptTuningConfig":
        # peft 0.21 returns a prompt-learning model's state dict unchanged, taking it to wrap
        # nothing; but a SEQ_CLS task trains the classifier whole, wrapped, under other keys.
        return
    expected = peft.get_base_model_state_dict(theirs)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_setting_the_base_state_dict_loads_new_weights_under_the_adapters():
    torch.manual_seed(0)
    ours = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1", "conv2d"],
                                                                  modules_to_save=["head"]))
    randomize_adapters(ours)
    adapters = {k: v.clone() for k, v in minipeft.get_peft_model_state_dict(ours).items()}
    torch.manual_seed(1)
    other = TinyNet()
    result = minipeft.set_base_model_state_dict(ours, other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    got = minipeft.get_base_model_state_dict(ours)
    assert all(torch.equal(got[k], v) for k, v in other.state_dict().items())
    # The adapters are untouched; the trained copy of head is an adapter tensor, its original is base.
    assert all(torch.equal(v, adapters[k]) for k, v in minipeft.get_peft_model_state_dict(ours).items())
    assert torch.equal(ours.base_model.model.head.original_module.weight, other.head.weight)
    # With the adapters off, the model is the new base model.
    with ours.disable_adapter():
        torch.testing.assert_close(ours(input_ids()), other(input_ids()))


def test_bad_base_state_dicts_are_refused_before_anything_is_written():
    torch.manual_seed(0)
    ours = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"]))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    new = {k: torch.randn_like(v) for k, v in TinyNet().state_dict().items()}

    with pytest.raises(RuntimeError, match=r"missing key\(s\): 'head.bias'"):
        minipeft.set_base_model_state_dict(ours, {k: v for k, v in new.items() if k != "head.bias"})
    wrapped = {k.replace("fc1.weight", "fc1.base_layer.weight"): v for k, v in new.items()}
    with pytest.raises(RuntimeError, match=r"unexpected key\(s\): 'blocks.0.fc1.base_layer.weight'.*before adapters wrapped it"):
        minipeft.set_base_model_state_dict(ours, wrapped)
    with pytest.raises(RuntimeError, match=r"'head.weight' has shape \(4, 16\), the model's is \(3, 16\)"):
        minipeft.set_base_model_state_dict(ours, {**new, "head.weight": torch.zeros(4, 16)}, strict=False)
    with pytest.raises(RuntimeError, match=r"'head.bias' is a ndarray, not a tensor"):
        minipeft.set_base_model_state_dict(ours, {**new, "head.bias": new["head.bias"].numpy()})
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())

    # Not strict: what is there loads, and the rest is reported in the original names.
    result = minipeft.set_base_model_state_dict(ours, {"blocks.0.fc1.weight": new["blocks.0.fc1.weight"], "x": 1},
                                                strict=False)
    assert result.unexpected_keys == ["x"] and "head.bias" in result.missing_keys
    assert torch.equal(ours.base_model.model.blocks[0]["fc1"].base_layer.weight, new["blocks.0.fc1.weight"])

    ours.merge_adapter()
    with pytest.raises(ValueError, match=r"adapters are merged into \['blocks.0.fc1', 'blocks.1.fc1'\].*unmerge_adapter"):
        minipeft.set_base_model_state_dict(ours, new)


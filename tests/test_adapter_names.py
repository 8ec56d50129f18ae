"""Adapter names: one check (minipeft.injection.check_adapter_name, and check_new_adapter_name for a
new adapter) with a clear error, so that a name can key nn.ModuleDicts and never makes a
checkpoint write outside its folder; every path that takes a name in uses it, before any work."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.injection import check_adapter_name, check_new_adapter_name
from minipeft.tuners.virtual_tokens import PromptEncoderDict


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("name", ["default", "sst2_lora", "lora-2", "Ünïcode"])
def test_good_names_pass(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "it is empty"),
        ("  ", "it is empty"),
        ("x.y", "contains '.'"),
        ("..", "contains '.'"),
        ("../up", "contains '.'"),
        ("/abs", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a\nb", "control character"),
    ],
)
def test_bad_names_say_what_is_wrong(name, why):
    with pytest.raises(ValueError, match=rf"invalid adapter name .*{why}.*Use letters, digits"):
        check_adapter_name(name)


def test_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="an adapter name must be a string, got int 3"):
        check_adapter_name(3)


def test_save_never_writes_outside_the_folder(tmp_path):
    """Refused where the name enters (add_adapter) or, at the latest, before save writes anything."""
    outside = tmp_path / "outside"
    model = get_peft_model(net(), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.add_adapter(str(outside), LoraConfig(r=2, target_modules=["2"]))
        model.save_pretrained(tmp_path / "save")
    assert not outside.exists() and not (tmp_path / "save").exists()


def test_loading_under_a_bad_name_is_refused_and_changes_nothing(tmp_path):
    model = get_peft_model(net(), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"invalid adapter name 'x\.y'"):
        model.load_adapter(tmp_path, "x.y")
    assert list(model.peft_config) == ["default"]
    base = net()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="invalid adapter name '/abs'"):
        PeftModel.from_pretrained(base, tmp_path, adapter_name="/abs")
    assert isinstance(base[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_every_attribute_of_the_live_containers_is_refused():
    """The reference is live containers: every attribute a real one has (methods, and what
    __init__ sets: "training", "_modules", ParameterDict's "_keys", PromptEncoderDict's
    "active_adapter", "_handles", ...). torch refuses such a key in a ModuleDict; a ParameterDict
    takes some ("_buffers") and breaks itself."""
    prompt_encoders = PromptEncoderDict(nn.Linear(2, 2))  # a live one, hooked into a model
    prompt_encoders.remove_hooks()
    for container in (nn.ModuleDict(), prompt_encoders, nn.ParameterDict()):
        for name in dir(container):
            if not isinstance(container, nn.ParameterDict):
                with pytest.raises(KeyError, match="already exists"):  # what torch does with the name ...
                    container[name] = nn.Identity()
            with pytest.raises(ValueError, match=rf"invalid adapter name '{name}': .*already an attribute"):
                check_adapter_name(name)  # ... is refused up front, with a clear error


def test_a_new_name_must_not_exist_yet():
    assert check_new_adapter_name("b", ["default"]) == "b"
    with pytest.raises(ValueError, match=r"adapter 'default' already exists; existing adapters: \['default'\]"):
        check_new_adapter_name("default", ["default"])


@pytest.mark.parametrize("name", ["train", "keys", "x.y"])
def test_loading_checks_the_name_before_reading_any_file(tmp_path, name):
    """The folder does not exist: a name check that runs first is the only error possible."""
    model = get_peft_model(net(), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=rf"invalid adapter name '{re.escape(name)}'"):
        model.load_adapter(tmp_path / "missing", name)
    with pytest.raises(ValueError, match=rf"invalid adapter name '{re.escape(name)}'"):
        PeftModel.from_pretrained(net(), tmp_path / "missing", adapter_name=name)
    assert list(model.peft_config) == ["default"]

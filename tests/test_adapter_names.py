"""Adapter names: one check (minipeft.config.check_adapter_name) with a clear error, so that a name
can key nn.ModuleDicts and never makes a checkpoint write outside its folder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import LoraConfig, PeftModel, get_peft_model
from minipeft.config import check_adapter_name


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

"""A config's fields hold what their annotations say, checked when it is built, as loading
checks ``adapter_config.json``: a config that builds, trains and saves must load back. And the
values that would run but mislead are the ones to catch: a bool is no number (``lora_dropout=False``
trains, as Python counts it 0, but false would not load), the string ``"False"`` reads as true,
a string where a list is expected reads as its letters, and NaN makes every output NaN."""

from __future__ import annotations

import json
import re

import pytest

import minipeft
from minipeft import PeftConfig


@pytest.mark.parametrize("config_class, field, value, kind", [
    (minipeft.LoraConfig, "lora_dropout", False, "a number"),
    (minipeft.LoraConfig, "lora_alpha", True, "a number"),
    (minipeft.LoraConfig, "r", 8.0, "an integer"),
    (minipeft.LoraConfig, "rank_pattern", {"fc1": True}, "a dict of integers"),
    (minipeft.LoraConfig, "alpha_pattern", {"fc1": "16"}, "a dict of numbers"),
    (minipeft.AdaLoraConfig, "tinit", True, "an integer"),
    (minipeft.VeraConfig, "vera_dropout", True, "a number"),
    (minipeft.PromptTuningConfig, "token_dim", True, "an integer or None"),
    (minipeft.LoraConfig, "inference_mode", "False", "True or False"),
    (minipeft.LoraConfig, "init_lora_weights", 0, "True or False or a string"),
    (minipeft.LoraConfig, "revision", 5, "a string or None"),
    (minipeft.LoraConfig, "layers_to_transform", [1.0], "a list of integers or an integer or None"),
    (minipeft.LoKrConfig, "decompose_both", "no", "True or False"),
    (minipeft.IA3Config, "feedforward_modules", [1], "a list of strings or a string or None"),
])
def test_a_value_of_another_type_is_refused_naming_the_field(config_class, field, value, kind):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field} must be {kind}, got "):
        config_class(**{field: value, **({"num_virtual_tokens": 2} if field == "token_dim" else {})})


@pytest.mark.parametrize("config_class, field", [
    (minipeft.LoraConfig, "modules_to_save"),
    (minipeft.LoraConfig, "target_parameters"),
    (minipeft.VeraConfig, "modules_to_save"),
])
def test_a_string_where_a_list_of_names_is_expected_is_refused(config_class, field):
    # peft would read "qv" as the modules 'q' and 'v'.
    with pytest.raises(ValueError, match=rf"{field} must be a list of strings or None, got 'qv' \(str\); write \['qv'\]"):
        config_class(**{field: "qv"})


@pytest.mark.parametrize("config_class, field, value", [
    (minipeft.LoraConfig, "lora_alpha", float("nan")),
    (minipeft.LoraConfig, "lora_alpha", float("inf")),
    (minipeft.LoraConfig, "alpha_pattern", {"fc1": float("nan")}),
    (minipeft.LoHaConfig, "alpha", float("-inf")),
    (minipeft.FourierFTConfig, "scaling", float("nan")),
    (minipeft.VeraConfig, "d_initial", float("inf")),
])
def test_a_number_that_is_not_finite_is_refused(config_class, field, value):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field} must be finite, got"):
        config_class(**{field: value})


@pytest.mark.parametrize("config_class, options, field, pattern", [
    (minipeft.LoraConfig, dict(target_modules="q_proj("), "target_modules", "q_proj("),
    (minipeft.LoraConfig, dict(exclude_modules="v("), "exclude_modules", "v("),
    (minipeft.LoraConfig, dict(rank_pattern={"q[": 4}), "rank_pattern", "q["),
    (minipeft.LoraConfig, dict(target_modules=["q"], layers_to_transform=[0], layers_pattern=["ok", "h)"]),
     "layers_pattern", "h)"),
    (minipeft.C3AConfig, dict(block_size_pattern={"*fc": 2}), "block_size_pattern", "*fc"),
])
def test_a_regex_that_does_not_compile_is_named_with_its_field(config_class, options, field, pattern):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field}: {re.escape(repr(pattern))} is not a "
                                         r"regular expression \(.* at position \d+\)"):
        config_class(**options)


@pytest.mark.parametrize("field", ["num_transformer_submodules", "num_layers"])
def test_virtual_token_sizes_are_positive(field):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer or None \(inferred\), got -1"):
        minipeft.PromptTuningConfig(num_virtual_tokens=2, **{field: -1})


def test_tuples_and_sets_become_lists():
    config = minipeft.LoraConfig(target_modules=("fc2", "fc1"), modules_to_save=("head", "embed"),
                                 layers_to_transform=(1, 0))
    assert config.target_modules == ["fc1", "fc2"]  # a set in peft: sorted, so runs agree
    assert config.modules_to_save == ["head", "embed"] and config.layers_to_transform == [1, 0]  # order kept
    assert minipeft.LoraConfig(modules_to_save={"b", "a"}).modules_to_save == ["a", "b"]
    assert minipeft.LoraConfig(target_modules=["q"], layers_to_transform=range(2)).layers_to_transform == [0, 1]
    import pathlib

    assert minipeft.LoraConfig(base_model_name_or_path=pathlib.Path("models/tiny")).base_model_name_or_path == "models/tiny"


@pytest.mark.parametrize("config", [
    minipeft.LoraConfig(lora_alpha=16, lora_dropout=0, rank_pattern={"fc1": 4}, alpha_pattern={"fc1": 2}),
    minipeft.AdaLoraConfig(total_step=100, tinit=0, lora_alpha=32.0),
    minipeft.PromptTuningConfig(num_virtual_tokens=2, token_dim=8),
    minipeft.LoraConfig(modules_to_save=("head",), revision="main", base_model_name_or_path="tiny"),
])
def test_every_config_that_builds_loads_back_from_its_json(config):
    # ints where floats are declared are numbers too (JSON writes 16, not 16.0)
    loaded = PeftConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert loaded == config


def test_a_config_subclass_whose_annotations_cannot_be_resolved_still_builds():
    import dataclasses

    @dataclasses.dataclass
    class Custom(minipeft.LoraConfig):
        note: "NotDefinedAnywhere" = None  # noqa: F821

    assert Custom(r=4).r == 4

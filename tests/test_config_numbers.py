"""A config's number fields hold numbers, and a bool is no number: Python counts True as 1, so
``lora_dropout=False`` would train, but its saved adapter_config.json (false) would not load
back, since loading type-checks every field. So the config refuses it when built."""

from __future__ import annotations

import json

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
])
def test_a_value_of_another_type_is_refused_naming_the_field(config_class, field, value, kind):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field} must be {kind}, got "):
        config_class(**{field: value, **({"num_virtual_tokens": 2} if field == "token_dim" else {})})


@pytest.mark.parametrize("config", [
    minipeft.LoraConfig(lora_alpha=16, lora_dropout=0, rank_pattern={"fc1": 4}, alpha_pattern={"fc1": 2}),
    minipeft.AdaLoraConfig(total_step=100, tinit=0, lora_alpha=32.0),
    minipeft.PromptTuningConfig(num_virtual_tokens=2, token_dim=8),
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

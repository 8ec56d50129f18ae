"""target_modules=None on a transformers model: the modules peft adapts by default for that
architecture, checked against peft itself (the modules chosen, the config it records, the
checkpoint keys)."""

from __future__ import annotations

import copy
import warnings

import pytest

import minipeft
from tests.models import TinyNet, tiny_transformers_model

peft = pytest.importorskip("peft")

CONFIGS = {
    "LoraConfig": {}, "LoHaConfig": {}, "AdaLoraConfig": dict(total_step=10), "IA3Config": {},
    "FourierFTConfig": dict(n_frequency=8), "OFTConfig": dict(oft_block_size=4), "VeraConfig": {},
    "C3AConfig": dict(block_size=4),
}


def pair(arch, config_class, **options):
    base = tiny_transformers_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [library.get_peft_model(copy.deepcopy(base), getattr(library, config_class)(**options))
                for library in (peft, minipeft)]


def adapted_layers(model):
    return sorted(name for name, _ in model.get_base_model().named_modules() if name.endswith(".base_layer"))


@pytest.mark.parametrize("config_class", CONFIGS)
@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_the_architectures_default_targets_are_peft_s(arch, config_class):
    theirs, ours = pair(arch, config_class, **CONFIGS[config_class])
    assert adapted_layers(ours) == adapted_layers(theirs) != []
    mine, peft_s = ours.peft_config["default"], theirs.peft_config["default"]
    assert sorted(mine.target_modules) == sorted(peft_s.target_modules)  # recorded, as peft records them
    if config_class == "IA3Config":
        assert sorted(mine.feedforward_modules) == sorted(peft_s.feedforward_modules) != []


def test_gpt2_gets_its_fused_projection_and_fourierft_and_c3a_the_mlp_output():
    for config_class, expected in [("LoraConfig", ["c_attn"]), ("FourierFTConfig", ["mlp.c_proj"])]:
        theirs, ours = pair("gpt2", config_class, **CONFIGS[config_class])
        assert ours.peft_config["default"].target_modules == expected
        assert adapted_layers(ours) == adapted_layers(theirs)
    # peft's C3A table says the same, though its C3A then refuses GPT-2's Conv1D layers.
    ours = minipeft.get_peft_model(tiny_transformers_model("gpt2"), minipeft.C3AConfig(block_size=4))
    assert ours.peft_config["default"].target_modules == ["mlp.c_proj"]


def test_a_saved_default_reloads_in_peft(tmp_path):
    theirs, ours = pair("llama", "IA3Config")
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_transformers_model("llama"), tmp_path)
    assert adapted_layers(reloaded) == adapted_layers(ours)
    assert sorted(reloaded.peft_config["default"].feedforward_modules) == ["down_proj"]


def test_a_model_without_a_known_architecture_still_asks_for_names():
    with pytest.raises(ValueError, match=r"target_modules is None and the model names no model_type .*e\.g\."):
        minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig())
    model = tiny_transformers_model("distilbert")  # not in peft's table either
    with pytest.raises(ValueError, match=r"no default for model_type 'distilbert'"):
        minipeft.get_peft_model(model, minipeft.LoraConfig())


def test_the_tables_are_peft_s():
    from peft.utils import constants

    from minipeft.tuners import architecture_targets as ours

    def table(name):
        return getattr(constants, f"TRANSFORMERS_MODELS_TO_{name}_MODULES_MAPPING")

    for mine, theirs in [("QUERY_VALUE", "LORA_TARGET"), ("VERA", "VERA_TARGET"), ("FOURIERFT", "FOURIERFT_TARGET"),
                         ("C3A", "C3A_TARGET"), ("ADALORA", "ADALORA_TARGET"), ("LN_TUNING", "LNTUNING_TARGET")]:
        assert getattr(ours, mine) == table(theirs), mine
    assert {k: targets for k, (targets, _) in ours.IA3.items()} == table("IA3_TARGET")
    assert {k: feedforward for k, (_, feedforward) in ours.IA3.items()} == \
        {k: v for k, v in table("IA3_FEEDFORWARD").items() if k in ours.IA3}

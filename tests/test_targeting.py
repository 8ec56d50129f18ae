"""Module selection by name: the matching rules of minipeft/targeting.py."""

from __future__ import annotations

import pytest

from minipeft import LoraConfig
from minipeft.targeting import find_targets, is_gpt2_conv1d, layer_index, name_matches
from tests.models import TinyNet, tiny_transformers_model


def test_list_matches_exactly_or_as_dotted_suffix():
    assert name_matches("distilbert.transformer.layer.0.attention.q_lin", ["q_lin"])
    assert name_matches("q_lin", ["q_lin"])
    assert not name_matches("distilbert.transformer.layer.0.attention.xq_lin", ["q_lin"])
    assert name_matches("a.b.c", ["b.c"])


def test_string_is_a_full_regex_match():
    assert name_matches("blocks.1.fc2", r"blocks\.\d\.fc\d")
    assert not name_matches("blocks.1.fc2.extra", r"blocks\.\d\.fc\d")


def test_layer_index_with_and_without_pattern():
    assert layer_index("model.layers.7.self_attn.q_proj", "layers") == 7
    assert layer_index("transformer.h.3.attn.c_attn", ["layers", "h"]) == 3
    assert layer_index("model.layers.7.experts.2.w1", None) == 7
    assert layer_index("lm_head", None) is None


def test_find_targets_in_model_order_with_filters():
    net = TinyNet()
    assert find_targets(net, LoraConfig(target_modules=["fc1", "fc2"])) == [
        "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2",
    ]
    assert find_targets(net, LoraConfig(target_modules=["fc1", "fc2"], exclude_modules=["fc2"])) == [
        "blocks.0.fc1", "blocks.1.fc1",
    ]
    assert find_targets(net, LoraConfig(target_modules=["fc1"], layers_to_transform=1, layers_pattern="blocks")) == [
        "blocks.1.fc1"
    ]


def test_all_linear_skips_the_output_head():
    llama = tiny_transformers_model("llama")
    targets = find_targets(llama, LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in targets and len(targets) == 2 * 7
    bert = tiny_transformers_model("bert")
    targets = find_targets(bert, LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    assert "classifier" not in targets and "bert.pooler.dense" in targets


def test_gpt2_conv1d_is_recognised_without_importing_transformers():
    gpt2 = tiny_transformers_model("gpt2")
    assert is_gpt2_conv1d(gpt2.transformer.h[0].attn.c_attn)
    assert not is_gpt2_conv1d(TinyNet().head)
    assert "transformer.h.0.attn.c_attn" in find_targets(gpt2, LoraConfig(target_modules="all-linear"))


def test_no_match_message_when_filters_remove_everything():
    with pytest.raises(ValueError, match=r"after applying layers_to_transform=\[5\]"):
        find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[5]))


def test_target_modules_none_is_explained():
    with pytest.raises(ValueError, match="target_modules is None"):
        find_targets(TinyNet(), LoraConfig())

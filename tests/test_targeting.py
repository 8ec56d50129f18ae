"""Module selection by name: the matching rules of minipeft/targeting.py."""

from __future__ import annotations

import pytest
import torch

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


def test_modules_trained_whole_are_matched_by_suffix_everywhere():
    # SEQ_CLS saves "classifier" whole; peft's suffix rule selects DistilBERT's "pre_classifier"
    # too. So all-linear must leave it (and everything inside a saved module) to modules_to_save
    # instead of adapting it and then refusing the overlap.
    import minipeft

    model = minipeft.get_peft_model(tiny_transformers_model("distilbert"),
                                    LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=2))
    inner = model.base_model.model
    assert type(inner.pre_classifier).__name__ == "ModulesToSaveWrapper"
    assert type(inner.classifier).__name__ == "ModulesToSaveWrapper"
    assert type(inner.distilbert.transformer.layer[0].attention.q_lin).__name__ == "LoraLinear"
    assert not any(".pre_classifier." in n and "lora_" in n for n, _ in model.named_parameters())


def test_gpt2_conv1d_is_recognised_without_importing_transformers():
    gpt2 = tiny_transformers_model("gpt2")
    assert is_gpt2_conv1d(gpt2.transformer.h[0].attn.c_attn)
    assert not is_gpt2_conv1d(TinyNet().head)
    assert "transformer.h.0.attn.c_attn" in find_targets(gpt2, LoraConfig(target_modules="all-linear"))


def test_no_match_message_when_filters_remove_everything():
    with pytest.raises(ValueError, match=r"after applying layers_to_transform=\[5\]"):
        find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[5], layers_pattern="blocks"))


def test_layer_numbers_right_after_the_first_segment_need_layers_pattern_as_in_peft():
    # peft reads a layer number only after two named segments (model.layers.7.): TinyNet's
    # blocks.0.fc1 has none, so peft adapts nothing there, and a config that minipeft honoured
    # would save an adapter peft cannot load. The error names the pattern that would work.
    with pytest.raises(ValueError, match=r"no layer number was found in .*give layers_pattern='blocks'"):
        find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[0]))
    assert find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[0],
                                              layers_pattern="blocks")) == ["blocks.0.fc1"]
    # a pattern that names no layer list: the error says so (not that layer 0 was missing)
    with pytest.raises(ValueError, match=r"layers_pattern='layers' found no layer number in .*give layers_pattern='blocks'"):
        find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], layers_to_transform=[0], layers_pattern="layers"))


def test_target_modules_none_is_explained():
    with pytest.raises(ValueError, match="target_modules is None"):
        find_targets(TinyNet(), LoraConfig())


# -- logical names: what matching sees once adapters are in the model ----------------------------
def test_logical_name_drops_wrapper_segments_and_hides_adapter_internals():
    from minipeft import BottleneckConfig, get_peft_model
    from minipeft.targeting import logical_name

    model = get_peft_model(tiny_transformers_model("bert"), BottleneckConfig(target_modules=["layer.0.output"],
                                                                             bottleneck_size=2))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["layer.0.output.dense"]))
    inner = model.get_base_model()
    real = "bert.encoder.layer.0.output.base_layer.dense.base_layer.bias"
    assert isinstance(inner.get_parameter(real), torch.nn.Parameter)  # the path the test is about exists
    assert logical_name(inner, real) == "bert.encoder.layer.0.output.dense.bias"
    assert logical_name(inner, "bert.encoder.layer.0.output.base_layer.dense.lora_A.lora") is None
    assert logical_name(inner, "bert.encoder.layer.0.output.adapter_dropout.default") is None
    # keep_wrapped keeps the segments of chosen wrappers (a checkpoint keeps its own adapter's).
    keep_lora = lambda wrapper: "lora" in wrapper.adapter_names  # noqa: E731
    assert logical_name(inner, real, keep_lora) == "bert.encoder.layer.0.output.dense.base_layer.bias"


def test_no_match_suggests_nearest_linear_layers_first():
    bert = tiny_transformers_model("bert")
    with pytest.raises(ValueError) as err:
        find_targets(bert, LoraConfig(target_modules=["qurey"]))
    message = str(err.value)
    assert "Nearest linear-layer names, nearest first: ['query'," in message
    assert "e.g. 'bert.encoder.layer.0.attention.self.query'" in message
    assert "embeddings" not in message and "LayerNorm" not in message  # not linear layers
    with pytest.raises(ValueError, match=r"first: \['attention.output.dense', 'layer.0.output.dense'"):
        find_targets(bert, LoraConfig(target_modules=["attention.outptu.dense"]))
    with pytest.raises(ValueError, match=r"first: \['query',"):
        find_targets(bert, LoraConfig(target_modules=r".*\.qurey"))


def test_no_match_blames_only_filters_that_removed_a_match():
    from minipeft import get_peft_model

    # SEQ_CLS adds modules_to_save=['classifier', 'score'] on its own; it removed nothing here.
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_transformers_model("bert"), LoraConfig(task_type="SEQ_CLS", target_modules=["qurey"]))
    assert "modules_to_save" not in str(err.value) and "after applying" not in str(err.value)
    with pytest.raises(ValueError, match=r"\(after applying exclude_modules=\['fc1'\], which removed \['blocks.0.fc1', 'blocks.1.fc1'\]\)"):
        find_targets(TinyNet(), LoraConfig(target_modules=["fc1"], exclude_modules=["fc1"], layers_to_transform=[0],
                                           layers_pattern="blocks"))

"""LoRA's behaviour against hand-derived math, independent of peft."""

from __future__ import annotations

import copy
import re
import math

import pytest
import torch
from torch import nn

from minipeft import LoraConfig, PeftModel, TaskType, get_peft_model, inject_adapter_in_model
from minipeft.tuners import AdapterLayer
from minipeft.tuners.lora import LoraLinear
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model


def test_linear_forward_is_the_lora_formula():
    """y = W x + b + (alpha / r) B A dropout(x), computed by hand."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 6))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=12, lora_dropout=0.25, target_modules=["0"]))
    randomize_adapters(model)
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = base[0].weight, base[0].bias
    x = torch.randn(4, 5, 10)

    model.eval()
    torch.testing.assert_close(model(x), x @ W.T + b + (12 / 3) * (x @ A.T) @ B.T)

    model.train()
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)  # the same random stream gives the same mask
    dropped = torch.nn.functional.dropout(x, 0.25, training=True)
    assert (dropped == 0).any()
    # Dropout touches only the low-rank branch: the base term sees the clean x.
    expected = x @ W.T + b + 4 * (dropped @ A.T) @ B.T
    torch.testing.assert_close(y, expected)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    model = get_peft_model(TinyNet(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["fc1"]))
    layer = model.base_model.model.blocks[0]["fc1"]
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(16))


def test_init_is_identity_and_only_adapters_train():
    base = tiny_transformers_model("bert")
    ids = input_ids()
    expected = base(input_ids=ids).logits
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value"]))
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_gaussian_and_false_init():
    model = get_peft_model(TinyNet(), LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["fc1"]))
    layer = model.base_model.model.blocks[0]["fc1"]
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.35)
    model = get_peft_model(TinyNet(), LoraConfig(r=8, init_lora_weights=False, target_modules=["fc1"]))
    assert model.base_model.model.blocks[0]["fc1"].lora_B["default"].weight.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("targets", [["fc1", "fc2"], ["embed", "conv1d", "conv2d", "head"]])
def test_merge_equals_unmerged_and_unmerge_restores_base(targets, use_dora):
    if use_dora and targets[0] == "embed":
        targets = ["fc1", "head"]
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    ids = input_ids()
    unmerged = model(input_ids=ids)
    original = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}

    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids), unmerged, atol=1e-5, rtol=0)
    with model.disable_adapter():  # a merged layer unmerges itself when adapters are disabled
        torch.testing.assert_close(model(input_ids=ids), base(input_ids=ids), atol=1e-5, rtol=0)
    model.merge_adapter()
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in original:
            torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert type(merged) is TinyNet
    torch.testing.assert_close(merged(input_ids=ids), unmerged, atol=1e-5, rtol=0)


def test_unload_returns_the_untouched_base():
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["fc1", "embed"]))
    randomize_adapters(model)
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(plain(input_ids=input_ids()), base(input_ids=input_ids()))


def test_several_named_adapters():
    base = TinyNet().eval()
    ids = input_ids()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1"]))
    model.add_adapter("second", LoraConfig(r=3, target_modules=["fc1", "fc2"]))
    randomize_adapters(model)
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    first = model(input_ids=ids)
    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    model.set_adapter("second")
    second = model(input_ids=ids)
    assert not torch.allclose(first, second)
    assert all(".second." in n for n, p in model.named_parameters() if p.requires_grad)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids), base(input_ids=ids))

    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    torch.testing.assert_close(model(input_ids=ids), first)
    assert not any("second" in n for n in model.state_dict())
    # fc2 had only the deleted adapter: it is a plain Linear again.
    assert type(model.base_model.model.blocks[0]["fc2"]) is nn.Linear


def test_merging_one_of_two_adapters():
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"]))
    randomize_adapters(model)
    model.set_adapter("b")
    expected = model(input_ids=input_ids())
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=input_ids()), expected, atol=1e-5, rtol=0)


def test_inject_adapter_in_model_works_in_place_on_plain_modules():
    net = TinyNet()
    out = inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc2"]), net, "mine")
    assert out is net
    assert isinstance(net.blocks[1]["fc2"], LoraLinear)
    assert "blocks.1.fc2.lora_A.mine.weight" in net.state_dict()
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.fc2.lora_{ab}.mine.weight" for i in range(2) for ab in "AB"
    }


def test_seq_cls_trains_the_classifier_head():
    model = get_peft_model(
        tiny_transformers_model("bert"), LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"])
    )
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    assert "base_model.model.classifier.original_module.weight" not in trainable


def test_half_precision_base_keeps_fp32_adapters_and_does_not_upcast_the_input():
    base = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b = layer.base_layer.weight.float(), layer.base_layer.bias.float()
    expected = x.float() @ W.T + b + layer.scaling["default"] * (x.float() @ A.T) @ B.T
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    y.float().sum().backward()
    assert A.grad is not None and A.grad.dtype == torch.float32


def test_autocast_bf16_on_cpu():
    model = get_peft_model(TinyNet(), LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=input_ids())
    out.float().sum().backward()
    reference = model(input_ids=input_ids())
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


# -- bad input ----------------------------------------------------------------------------------
def test_an_alpha_of_zero_is_warned_of():
    with pytest.warns(UserWarning, match=r"lora_alpha=0 scales every update by 0: the adapter changes nothing"):
        LoraConfig(target_modules=["fc1"], lora_alpha=0)


def test_no_match_lists_the_closest_names():
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_transformers_model("distilbert"), LoraConfig(target_modules=["q_proj", "v_proj"]))
    message = str(err.value)
    assert "matched no module" in message and "q_lin" in message and "v_lin" in message
    # Names written as one string are a regex that matches no whole name: the error says to list them.
    for string, listed in (("q_lin", "['q_lin']"), ("q_lin,v_lin", "['q_lin', 'v_lin']")):
        with pytest.raises(ValueError, match=re.escape(f"for names, give a list, target_modules={listed}")):
            get_peft_model(tiny_transformers_model("distilbert"), LoraConfig(target_modules=string))


def test_unsupported_layer_type_names_it_and_leaves_the_model_unchanged():
    net = TinyNet()
    before = copy.deepcopy(net.state_dict())
    types_before = [type(m) for m in net.modules()]
    # Matches fc1 (fine, wrapped first) and norm (a LayerNorm): the error must undo fc1's wrapper.
    with pytest.raises(ValueError, match=r"LayerNorm.*supports nn.Linear"):  # as peft
        inject_adapter_in_model(LoraConfig(target_modules=r"blocks\.0\.(fc1|norm)"), net)
    assert [type(m) for m in net.modules()] == types_before
    assert net.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in net.parameters())


def test_failed_second_adapter_is_rolled_back():
    model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1"]))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="cannot apply LoRA to 'blocks.0.norm'"):
        model.add_adapter("bad", LoraConfig(r=2, target_modules=["fc1", "norm"]))
    assert set(model.state_dict()) == keys and list(model.peft_config) == ["default"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "positive integer"),
        (dict(r=-2), "positive integer"),
        (dict(lora_dropout=1.0), r"\[0, 1\)"),
        (dict(lora_dropout=-0.1), r"\[0, 1\)"),
        (dict(bias="some"), "bias must be"),
        (dict(init_lora_weights="corda"), "init_lora_weights"),
        (dict(rank_pattern={"fc1": 0}), "positive integer"),
        (dict(task_type="CLS"), "task_type"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(target_modules=["fc1"], **kwargs)


def test_adapter_name_errors():
    model = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["fc2"]))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.delete_adapter("nope")


def test_merging_twice_merges_once_with_a_warning_as_in_peft():
    model = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    model.merge_adapter()
    once = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"\['default'\] are merged already and stay as they are"):
        model.merge_adapter()
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())


def test_a_layer_merged_twice_merges_once_with_a_warning_as_in_peft():
    model = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    layer = model.base_model.model.blocks[0].fc1
    layer.merge()
    once = layer.base_layer.weight.clone()
    with pytest.warns(UserWarning, match=r"\['default'\] are merged into this layer already"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, once) and layer.merged_adapters == ["default"]


def test_peft_model_falls_through_to_the_base_model():
    model = get_peft_model(tiny_transformers_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"]))
    assert isinstance(model, PeftModel)
    assert model.config.n_embd == 32
    assert model.get_base_model() is model.base_model.model
    assert model.active_peft_config is model.peft_config["default"]
    # what neither has: the error names both, not the wrapped model alone
    with pytest.raises(AttributeError, match=r"PeftModelForGPT2LMHeadModel has no attribute 'nope', and neither has "
                                             r"the model it wraps \(GPT2LMHeadModel\)"):
        model.nope
    assert not hasattr(model, "nope")


def test_a_second_all_linear_adapter_goes_beside_the_first_not_inside_it():
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules="all-linear"))
    model.add_adapter("second", LoraConfig(r=3, target_modules="all-linear"))
    names = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert not any(".base_layer" in n for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.second.weight" in model.state_dict()


def test_a_module_trained_whole_is_never_a_target():
    # peft's plain-suffix rule makes "classifier" select DistilBERT's pre_classifier too: named
    # as a target, it is removed by modules_to_save, and the error says so.
    with pytest.raises(ValueError, match=r"after applying modules_to_save=\['classifier', 'score'\], which removed "
                                         r"\['pre_classifier', 'classifier'\]"):
        get_peft_model(
            tiny_transformers_model("distilbert"),
            LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["pre_classifier", "classifier"]),
        )


def test_switching_adapters_stops_training_the_previous_adapters_biases():
    model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1"], bias="all"))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["fc2"]))
    assert model.base_model.model.head.bias.requires_grad
    model.set_adapter("plain")
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    model.set_adapter("default")
    assert model.base_model.model.head.bias.requires_grad


def test_lora_only_biases_belong_to_the_layers_of_their_own_adapter(tmp_path):
    from minipeft import PeftModel

    base = TinyNet()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["fc1"], bias="lora_only"))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trainable == {f"base_model.model.blocks.{i}.fc1.base_layer.bias" for i in range(2)}
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(fresh, tmp_path)  # strict: fc2's biases were not saved with "default"


def test_unload_after_merge_adapter_gives_back_the_original_weights():
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1", "conv2d"]))
    randomize_adapters(model)
    model.merge_adapter()
    plain = model.unload()
    torch.testing.assert_close(plain(input_ids=input_ids()), base(input_ids=input_ids()), atol=1e-6, rtol=0)


def test_lora_on_a_reflect_padded_conv_merges_exactly():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(1, 2, 5, 5)
    expected = model(x)
    torch.testing.assert_close(model.merge_and_unload()(x), expected, atol=1e-5, rtol=0)


def test_nested_disable_adapter_blocks():
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    with_adapter = model(input_ids=input_ids())
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        base_out = model(input_ids=input_ids())
    assert not torch.allclose(base_out, with_adapter)
    torch.testing.assert_close(model(input_ids=input_ids()), with_adapter)


@pytest.mark.parametrize("field", ["use_rslora", "use_dora", "fan_in_fan_out"])
def test_a_switch_given_as_a_string_is_refused(field):
    # "False" would read as true, and the saved config would not load back.
    with pytest.raises(ValueError, match=rf"LoraConfig.{field} must be True or False, got 'False'"):
        LoraConfig(target_modules=["q"], **{field: "False"})


def test_a_target_registered_under_several_names_is_refused():
    # One module as self.proj and in a ModuleList: a wrapper would stand under one name alone,
    # and the calls through the others would run the module without its adapter.
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([self.proj, self.proj])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    with pytest.raises(ValueError, match=r"target 'proj' is one module registered under several names \(also "
                                         r"\['blocks.0', 'blocks.1'\]\)"):
        get_peft_model(Shared(), LoraConfig(target_modules=["proj"]))


def test_a_modules_to_save_entry_that_matches_nothing_is_refused():
    # A misspelt head would stay frozen and be left out of the checkpoint (peft ignores it).
    with pytest.raises(ValueError, match=r"modules_to_save entry 'haed' matched no module of TinyNet\. Nearest names, "
                                         r"nearest first: \['head'"):
        get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], modules_to_save=["haed"]))
    # the heads a task adds are alternatives: a model has one of them
    model = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"], modules_to_save=["head", "classifier", "score"]))
    assert "base_model.model.head.modules_to_save.default.weight" in model.state_dict()

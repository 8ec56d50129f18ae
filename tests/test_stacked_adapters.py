"""Adapters of different methods on the same module, or inside another adapter's wrapper.

The second wrapper holds the first one as its ``base_layer``, so the real module paths change
(``value.base_layer.lora_A``). Neither target matching nor checkpoints may see that:

* a config selects the same modules whether or not other adapters were added before it;
* each adapter is saved as in a model holding it alone, which is also the only layout peft
  has (a peft PeftModel refuses two methods, and its mixed model cannot save). The reference
  is peft itself: its own checkpoint of the same adapter alone has the same keys, and it loads
  ours with the logits minipeft had.
"""

from __future__ import annotations

import copy
import os

import peft
import pytest
import torch
from safetensors import safe_open

import minipeft
from minipeft import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from minipeft.tuners import ModulesToSaveWrapper
from tests.models import first_output, input_ids, randomize_adapters, tiny_transformers_model

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
IA3 = dict(target_modules=["key", "value"], feedforward_modules=[])


def keys(folder) -> set[str]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(input_ids=input_ids()))


def lora_then_ia3(base, **lora):
    """LoRA "default" on query/value, then (IA)^3 "ia3" on key/value: value holds both wrappers."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**{**LORA, **lora}))
    model.add_adapter("ia3", IA3Config(**IA3))
    randomize_adapters(model, seed=1, names=("ia3_l",), std=0.3, mean=1.0)
    return model.eval()


def test_second_method_on_a_wrapped_module_really_stacks():
    model = lora_then_ia3(tiny_transformers_model("bert"))
    value = model.base_model.model.bert.encoder.layer[0].attention.self.value
    assert "ia3" in value.ia3_l and "default" in value.base_layer.lora_A  # the case under test


def test_stacked_adapters_save_as_alone_and_load_both_ways(tmp_path):
    base = tiny_transformers_model("bert")
    ours = lora_then_ia3(base)
    expected = {}
    for name in ("default", "ia3"):
        ours.set_adapter(name)
        expected[name] = logits(ours)
    assert not torch.allclose(expected["default"], expected["ia3"])
    ours.save_pretrained(tmp_path / "ours")

    # The same keys as peft's own checkpoint of each adapter alone.
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA)).save_pretrained(tmp_path / "peft_lora")
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**IA3)).save_pretrained(tmp_path / "peft_ia3")
    assert keys(tmp_path / "ours") == keys(tmp_path / "peft_lora")
    assert keys(tmp_path / "ours" / "ia3") == keys(tmp_path / "peft_ia3")

    # peft loads each one alone and computes what minipeft computed with it active.
    for folder, name in ((tmp_path / "ours", "default"), (tmp_path / "ours" / "ia3", "ia3")):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        torch.testing.assert_close(logits(theirs), expected[name], atol=1e-6, rtol=0)

    # minipeft reloads them, stacked again in either order.
    for first, second in (("default", "ia3"), ("ia3", "default")):
        folder = {"default": tmp_path / "ours", "ia3": tmp_path / "ours" / "ia3"}
        back = PeftModel.from_pretrained(copy.deepcopy(base), folder[first], adapter_name=first)
        back.load_adapter(folder[second], second)
        for name in ("default", "ia3"):
            back.set_adapter(name)
            torch.testing.assert_close(logits(back), expected[name], atol=1e-6, rtol=0)


def test_peft_adapter_loads_into_a_module_another_method_already_wraps(tmp_path):
    base = tiny_transformers_model("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA)).eval()
    randomize_adapters(theirs, seed=2)
    theirs.save_pretrained(tmp_path)

    ours = get_peft_model(copy.deepcopy(base), IA3Config(**IA3))  # (IA)^3 first: LoRA lands outside it
    ours.load_adapter(tmp_path, "lora")
    assert "lora" in ours.base_model.model.bert.encoder.layer[0].attention.self.value.lora_A
    ours.set_adapter("lora")
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(ours), logits(base))


def test_trained_biases_of_a_stacked_lora_keep_peft_names(tmp_path):
    """bias="all": a bias inside the adapter's own wrapper is saved as ``value.base_layer.bias``
    (peft's name), one inside another adapter's wrapper as ``key.bias``."""
    base = tiny_transformers_model("bert")
    ours = lora_then_ia3(base, bias="all")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.1)
    ours.set_adapter("default")
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["default"])
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA, bias="all")).save_pretrained(tmp_path / "peft")
    saved = keys(tmp_path / "ours")
    assert saved == keys(tmp_path / "peft")
    assert "base_model.model.bert.encoder.layer.0.attention.self.value.base_layer.bias" in saved
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.bias" in saved

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-6, rtol=0)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(back), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [["attention.output.dense"], r".*\.attention\.output\.dense"])
def test_modules_inside_a_bottleneck_wrapper_keep_their_names(tmp_path, targets):
    base = tiny_transformers_model("bert")
    bottleneck = BottleneckConfig(target_modules=["attention.output"], bottleneck_size=2)
    model = get_peft_model(copy.deepcopy(base), bottleneck)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    wrapped = model.base_model.model.bert.encoder.layer[0].attention.output
    assert "lora" in wrapped.base_layer.dense.lora_A  # really inside the bottleneck's wrapper
    model.set_adapter("lora")
    expected = logits(model.eval())
    model.save_pretrained(tmp_path, selected_adapters=["lora"])

    saved = keys(tmp_path / "lora")
    assert "base_model.model.bert.encoder.layer.0.attention.output.dense.lora_A.weight" in saved
    assert len(saved) == 2 * 2  # A and B in each of the two layers, nothing else
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-6, rtol=0)
    alone = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(alone), expected, atol=1e-6, rtol=0)


def test_a_config_selects_the_same_modules_after_other_adapters():
    """The houlsby preset after the parallel one (which wraps ``layer.N.output``) still adapts both
    ``attention.output.dense`` and ``layer.N.output.dense``, as it does alone."""
    base = tiny_transformers_model("bert_model")
    houlsby = BottleneckConfig.preset("houlsby", model_type="bert")

    def adapted(model, name):
        return sorted(
            minipeft.targeting.logical_name(model, n)
            for n, m in model.named_modules()
            if name in getattr(m, "adapter_down", {})
        )

    alone = get_peft_model(copy.deepcopy(base), houlsby)
    stacked = get_peft_model(copy.deepcopy(base), BottleneckConfig.preset("parallel", model_type="bert"))
    stacked.add_adapter("houlsby", houlsby)
    assert len(adapted(alone, "default")) == 4  # two per layer
    assert adapted(stacked, "houlsby") == adapted(alone, "default")


def test_per_module_settings_read_the_name_without_other_wrappers():
    """(IA)^3's feedforward_modules (like LoRA's rank_pattern) name modules as targets do: a
    ``layer.0.output.dense`` inside a bottleneck's wrapper is still feed-forward (it scales its
    input), exactly as in a model holding (IA)^3 alone."""
    base = tiny_transformers_model("bert")
    ia3 = IA3Config(target_modules=["value", "output.dense"], feedforward_modules=["output.dense"])
    stacked = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["layer.0.output"], bottleneck_size=2))
    stacked.add_adapter("ia3", ia3)
    alone = get_peft_model(copy.deepcopy(base), ia3)

    def sides(model, name):
        inner = model.get_base_model()
        return {minipeft.targeting.logical_name(inner, n): m.is_feedforward[name]
                for n, m in inner.named_modules() if name in getattr(m, "is_feedforward", {})}

    assert sides(stacked, "ia3") == sides(alone, "default")
    assert sides(stacked, "ia3")["bert.encoder.layer.0.output.dense"] is True


def test_adapter_internals_are_never_targets():
    """LoRA's dropout lives in ``lora_dropout["default"]``: not a module of the user's model."""
    model = get_peft_model(tiny_transformers_model("bert"), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="matched no module") as err:
        model.add_adapter("b", BottleneckConfig(target_modules=["default"], bottleneck_size=2, hidden_size=32))
    suggested = str(err.value).split("Nearest", 1)[1]
    assert "lora_" not in suggested and "default" not in suggested
    assert "b" not in model.peft_config


def test_modules_to_save_inside_another_adapters_wrapper(tmp_path):
    """modules_to_save names modules as target_modules do: ``layer.0.output.dense``, really at
    ``layer.0.output.base_layer.dense`` once a parallel bottleneck wraps ``layer.0.output``, is
    trained whole as in a model without the bottleneck. The reference is peft with the LoRA
    adapter alone: the same keys on disk, and it computes what minipeft computed."""
    base = tiny_transformers_model("bert")
    lora = dict(r=2, target_modules=["query"], modules_to_save=["layer.0.output.dense"], init_lora_weights=False)
    parallel = BottleneckConfig(target_modules=["layer.0.output"], placement="parallel",
                                parallel_input="input_tensor", bottleneck_size=2)
    model = get_peft_model(copy.deepcopy(base), parallel)
    model.add_adapter("lora", LoraConfig(**lora))
    model.set_adapter("lora")
    saved_module = model.base_model.model.bert.encoder.layer[0].output.base_layer.dense
    assert "lora" in saved_module.modules_to_save  # wrapped, inside the bottleneck's wrapper
    assert saved_module.modules_to_save["lora"].weight.requires_grad
    randomize_adapters(model, seed=3)
    expected = logits(model.eval())
    model.save_pretrained(tmp_path, selected_adapters=["lora"])

    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).save_pretrained(tmp_path / "peft")
    assert keys(tmp_path / "lora") == keys(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "second",
    [
        LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key"]),
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2),
        PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2),
    ],
    ids=["lora", "prompt_tuning", "prefix_tuning"],
)
def test_modules_to_save_never_selects_adapter_internals(second):
    """A SEQ_CLS adapter trains the head: modules_to_save=["classifier", "score"], matched by plain
    suffix as in peft. After a first adapter named "sst2_classifier", real names such as
    ``query.lora_A.sst2_classifier``, ``classifier.modules_to_save.sst2_classifier`` and
    ``classifier.original_module`` end in "classifier" too. The second adapter, whichever method
    adds it (layer wrappers, or virtual tokens), trains exactly what it trains in a model holding
    it alone: one copy of the head, in the one wrapper."""
    base = tiny_transformers_model("bert")
    first = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    model = get_peft_model(copy.deepcopy(base), first, adapter_name="sst2_classifier")
    model.add_adapter("second", second)
    model.set_adapter("second")
    alone = get_peft_model(copy.deepcopy(base), second, adapter_name="second")

    def trained(m):
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    assert trained(model) == trained(alone)
    assert "base_model.model.classifier.modules_to_save.second.weight" in trained(model)
    wrappers = [n for n, m in model.get_base_model().named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrappers == ["classifier"]


@pytest.mark.parametrize("outer", ["oft", "ia3 on the input side"])
@pytest.mark.parametrize("inner_first", [True, False])
def test_nested_wrappers_merge_innermost_first_in_both_merges(outer, inner_first):
    """An outer wrapper whose merge is not an addition (OFT's rotation, (IA)^3 on the input side)
    transforms whatever the inner wrapper folded into the weight, so merging must go innermost
    first, in merge_adapter as in merge_and_unload; merged outer-first, the model changed by ~2."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8))
    second = {"oft": minipeft.OFTConfig(oft_block_size=4, target_modules=["0"], init_weights=False),
              "ia3 on the input side": IA3Config(target_modules=["0"], feedforward_modules=["0"])}[outer]
    lora = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    first, other = (lora, second) if inner_first else (second, lora)
    model = get_peft_model(copy.deepcopy(base), first)
    model.add_adapter("other", other)
    randomize_adapters(model, names=("ia3_l",), std=0.5, mean=1.0)
    minipeft.injection.set_adapter(model.get_base_model(), ["default", "other"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        unloaded = copy.deepcopy(model).merge_and_unload()(x)
        model.merge_adapter(["default", "other"])
        merged = model(x)
    torch.testing.assert_close(unloaded, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("outer_first", [True, False])
def test_a_partial_merge_across_nested_wrappers_is_refused_when_merges_do_not_commute(outer_first):
    """Merging only one of two nested adapters is fine when both merges just add an update (LoRA
    over LoRA); with an OFT in the chain the merged weight would be transformed wrongly, so it waits."""
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    oft = minipeft.OFTConfig(oft_block_size=4, target_modules=["0"], init_weights=False)
    x = torch.randn(3, 8)
    for second, refused in [(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), False), (oft, True)]:
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), lora)
        model.add_adapter("other", second)
        minipeft.injection.set_adapter(model.get_base_model(), ["default", "other"])
        alone = ["other"] if outer_first else ["default"]  # "other" wraps "default"
        with torch.no_grad():
            want = model(x)
            if refused and outer_first:
                with pytest.raises(ValueError, match="applies adapter.*unmerged, and these merges do not commute"):
                    model.merge_adapter(alone)
                continue
            model.merge_adapter(alone)  # an inner merge first is always safe
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", ["oft", "loha", "miss"])
def test_dora_is_refused_around_another_methods_layer(inner):
    """DoRA's row norms come from the original weight, without the inner layer's unmerged update,
    while a merge (inner first) would put that update under the norm: the merged model would differ."""
    config = {"oft": minipeft.OFTConfig(oft_block_size=4, target_modules=["0"]),
              "loha": minipeft.LoHaConfig(r=2, target_modules=["0"]),
              "miss": minipeft.MissConfig(r=4, target_modules=["0"])}[inner]
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)
    with pytest.raises(ValueError, match="another method's layer .* inside it.*Add the DoRA adapter first"):
        model.add_adapter("dora", LoraConfig(r=2, target_modules=["0"], use_dora=True))
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"],
                                                                                  use_dora=True))
    model.add_adapter("outer", config)  # the other way round merges to its forward (test above)

"""MiSS against hand-derived math (the shared shard update written out column by column, the
"bat" tiles one by one) and against peft (one seed: the same parameters, logits, gradients,
dropout masks, checkpoints both ways), for its three variants."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minipeft
from minipeft import LoraConfig, MissConfig, get_peft_model, injection
from tests import against_peft, merge_checks
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # (out, in): (32, 32), (16, 32), (32, 48)


def dense_update(d: torch.Tensor, in_features: int) -> torch.Tensor:
    """``Delta W`` (out, in) of a shared ``D`` (r, out), column by column: column j is ``D[j mod r]``."""
    return torch.stack([d[j % d.shape[0]] for j in range(in_features)], dim=1)


def bat_weight(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``W'`` with tile ``(i, j)`` replaced by ``W_ij (I + B_i) + B_i``, tile by tile."""
    r = blocks.shape[-1]
    out = weight.clone()
    for i in range(weight.shape[0] // r):
        for j in range(weight.shape[1] // r):
            tile = weight[i * r:(i + 1) * r, j * r:(j + 1) * r]
            out[i * r:(i + 1) * r, j * r:(j + 1) * r] = tile @ (torch.eye(r) + blocks[i]) + blocks[i]
    return out


# -- hand-derived math ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["balance", "mini", "bat"])
def test_each_variant_is_its_update_written_out(variant):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10 if variant != "bat" else 12, 6))
    config = {"balance": dict(r=4, init_weights=False),  # 10 = 4 + 4 + 2: the last shard padded
              "mini": dict(r=4, init_weights="mini", mini_r=2), "bat": dict(r=3, init_weights="bat")}[variant]
    model = get_peft_model(copy.deepcopy(base), MissConfig(target_modules=["0"], **config))
    block = model.get_base_model()[0].miss_block["default"]
    with torch.no_grad():
        block.normal_()
    block = block.detach()
    w, b = base[0].weight, base[0].bias
    if variant == "bat":
        assert block.shape == (2, 3, 3)  # (out / r, r, r)
        want_weight = bat_weight(w, block)
    else:
        d = block.repeat(1, 3) if variant == "mini" else block  # mini: (4, 2) repeated along the 6 outputs
        want_weight = w + dense_update(d, w.shape[1])
    x = torch.randn(5, w.shape[1])
    torch.testing.assert_close(model(x), x @ want_weight.T + b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(model.get_base_model()[0].base_layer.weight, want_weight, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model()[0].base_layer.weight, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", [True, "mini", "bat"])
def test_a_new_adapter_is_the_base_model(init):
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=8, init_weights=init, mini_r=4, target_modules=TARGETS))
    ids = input_ids()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6, rtol=0)


# -- against peft ---------------------------------------------------------------------------------
OPTIONS = {
    "balance, random start": dict(r=8, init_weights=False),
    "balance, padded shards, dropout": dict(r=5, init_weights=False, miss_dropout=0.3),
    "mini": dict(r=8, init_weights="mini", mini_r=4),
    "bat": dict(r=8, init_weights="bat"),
}


def peft_pair(base, config: dict):
    """(peft, minipeft) from one seed; blocks that start at zero are then drawn in peft and copied
    over, so that every variant is compared away from its start."""
    p, m = against_peft.seeded_pair(base, "MissConfig", dict(target_modules=TARGETS) | config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, t in p.named_parameters():
            if t.requires_grad:
                if config["init_weights"] is False:  # drawn by both from the seed
                    torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)
                else:
                    m.get_parameter(name).copy_(t.normal_(std=0.1))
    return p, m


@pytest.mark.parametrize("option", list(OPTIONS))
def test_logits_gradients_and_dropout_match_peft(option):
    p, m = peft_pair(tiny_transformers_model("llama"), OPTIONS[option])
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())


@pytest.mark.parametrize("option", ["balance, padded shards, dropout", "mini", "bat"])
def test_checkpoints_load_in_peft_and_back(tmp_path, option):
    base = tiny_transformers_model("llama")
    p, m = peft_pair(base, OPTIONS[option])
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model.eval()(input_ids=ids).logits,
                                                   tmp_path, atol=1e-5)


def test_trained_biases_match_peft():
    p, m = against_peft.seeded_pair(tiny_transformers_model("bert"), "MissConfig",
                                    dict(r=8, target_modules=["query", "value"], bias="MiSS_only", init_weights=False))
    names = [{n for n, t in model.named_parameters() if t.requires_grad} for model in (p, m)]
    assert names[0] == names[1] and any(n.endswith("query.base_layer.bias") for n in names[0])


# -- minipeft's own: GPT-2, several adapters, errors ------------------------------------------------
@pytest.mark.parametrize("init", [False, "bat"])
def test_gpt2_conv1d_uses_its_transposed_weight(init):
    base = tiny_transformers_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=8, init_weights=init, target_modules=["c_fc", "c_proj"]))
    layer = model.get_base_model().transformer.h[0].mlp.c_fc
    with torch.no_grad():
        layer.miss_block["default"].normal_(std=0.1)
    block = layer.miss_block["default"].detach()
    w = layer.base_layer.weight.T  # (out, in) = (128, 32)
    want = bat_weight(w, block) if init == "bat" else w + dense_update(block, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ want.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
    ids = input_ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(input_ids=ids).logits, unmerged,
                                   atol=1e-5, rtol=1e-5)


def test_bat_adapters_compose_in_order_and_unmerge_restores_the_weights():
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=8, init_weights="bat", target_modules=TARGETS))
    model.add_adapter("b", MissConfig(r=4, init_weights="bat", target_modules=TARGETS))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "miss_block" in name:
                t.normal_(std=0.1)
    ids = input_ids()
    merge_checks.assert_merge_in_order_and_unmerge(model, base, lambda m: m(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["miss bat", "oft"])
def test_unloading_merges_any_of_the_ordered_adapters_alone(method):
    """merge_adapter keeps the model, so it must merge the first of two order-bound adapters first;
    merge_and_unload drops the adapters it does not merge, so either one alone is a model."""
    torch.manual_seed(0)
    make = {"miss bat": lambda r: MissConfig(r=r, init_weights="bat", target_modules=["0"]),
            "oft": lambda r: minipeft.OFTConfig(oft_block_size=r, target_modules=["0"], init_weights=False)}[method]
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), make(4))
    model.add_adapter("b", make(2))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "miss_block" in name:
                t.normal_(std=0.2)
    injection.set_adapter(model.get_base_model(), ["default", "b"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="merge them in order"):
            copy.deepcopy(model).merge_adapter(["b"])
        alone = copy.deepcopy(model)
        alone.set_adapter("b")
        torch.testing.assert_close(copy.deepcopy(model).merge_and_unload(adapter_names=["b"])(x), alone(x),
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"merge them in order \(\['default', 'b'\] first\)"):
            copy.deepcopy(model).merge_and_unload(adapter_names=["b", "default"])


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="True \\(balance\\), False \\(random, for tests\\), 'bat' or 'mini'"):
        MissConfig(init_weights="balance")
    with pytest.raises(ValueError, match="'none', 'all' or 'MiSS_only'"):
        MissConfig(bias="miss_only")
    layer = nn.Sequential(nn.Linear(12, 8))
    with pytest.raises(ValueError, match="r=16 is larger than its input size 12; use r <= 12"):
        get_peft_model(copy.deepcopy(layer), MissConfig(r=16, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"r must divide both sizes; got r=3, use one of \[1, 2, 4\]"):
        get_peft_model(copy.deepcopy(layer), MissConfig(r=3, init_weights="bat", target_modules=["0"]))
    with pytest.raises(ValueError, match="mini_r=3 .* must divide it"):
        get_peft_model(copy.deepcopy(layer), MissConfig(r=4, init_weights="mini", mini_r=3, target_modules=["0"]))
    model = get_peft_model(copy.deepcopy(layer), MissConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="one layer holds adapters of one kind"):
        model.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["0"]))
    lora = get_peft_model(copy.deepcopy(layer), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="another method's wrapper is around the layer"):
        lora.add_adapter("bat", MissConfig(r=4, init_weights="bat", target_modules=["0"]))
    wrapped = get_peft_model(copy.deepcopy(layer), MissConfig(r=4, init_weights="bat", target_modules=["0"]))
    wrapped.add_adapter("lora", LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="add every MiSS adapter of this layer before another method wraps it"):
        wrapped.add_adapter("bat2", MissConfig(r=2, init_weights="bat", target_modules=["0"]))
    with pytest.raises(ValueError, match="MiSS supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Conv1d(4, 4, 1)), MissConfig(r=2, target_modules=["0"]))


def test_a_peft_file_of_each_variant_loads_for_inference_without_warnings(tmp_path):
    base = tiny_transformers_model("llama")
    p, _ = peft_pair(base, OPTIONS["mini"])
    p.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].init_weights == "mini"
    assert not any(t.requires_grad for t in loaded.parameters())

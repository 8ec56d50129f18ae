"""RoAd against hand-derived math (each pair turned by its 2 x 2 block, written out as a dense
matrix) and against peft (one seed: the same parameters, logits, gradients, checkpoints both
ways), for its three variants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from minipeft import RoadConfig, get_peft_model
from tests import against_peft, merge_checks
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # outputs 32, 16, 32


def dense_rotation(c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R`` (out, out) from the per-feature ``c`` and ``s``: in each group, feature ``k`` of the
    first half and ``l = k + g/2`` of the second: ``y_k = c_k h_k - s_k h_l``, ``y_l = s_l h_k + c_l h_l``."""
    out, half = len(c), group_size // 2
    r = torch.zeros(out, out)
    for start in range(0, out, group_size):
        for i in range(half):
            k, l = start + i, start + i + half
            r[k, k], r[k, l] = c[k], -s[k]
            r[l, k], r[l, l] = s[l], c[l]
    return r


def test_road_1_turns_each_pair_by_its_angle_and_scale():
    base = nn.Sequential(nn.Linear(3, 4))
    model = get_peft_model(copy.deepcopy(base), RoadConfig(group_size=4, target_modules=["0"]))
    layer = model.get_base_model()[0]
    theta, alpha = torch.tensor([0.3, -1.1]), torch.tensor([2.0, 0.5])
    with torch.no_grad():
        layer.road_theta["default"].copy_(theta)
        layer.road_alpha["default"].copy_(alpha)
    x = torch.randn(5, 3)
    h = base(x)  # pairs (h0, h2) and (h1, h3)
    want = torch.empty_like(h)
    for k, l in ((0, 2), (1, 3)):
        cos, sin = math.cos(theta[k]), math.sin(theta[k])
        want[:, k] = alpha[k] * (cos * h[:, k] - sin * h[:, l])
        want[:, l] = alpha[k] * (sin * h[:, k] + cos * h[:, l])
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant, group_size", [("road_1", 4), ("road_2", 2), ("road_4", 6)])
def test_the_forward_is_the_dense_rotation_of_the_output_and_merges_into_weight_and_bias(variant, group_size):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 12))
    model = get_peft_model(copy.deepcopy(base), RoadConfig(variant=variant, group_size=group_size, init_weights=False,
                                                           target_modules=["0"]))
    layer = model.get_base_model()[0]
    theta, alpha = layer.road_theta["default"].detach(), layer.road_alpha["default"].detach()
    assert len(theta) == {"road_1": 6, "road_2": 12, "road_4": 24}[variant]
    if variant == "road_1":  # one value per pair, on both features
        theta = theta.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
        alpha = alpha.reshape(-1, 1, group_size // 2).expand(-1, 2, -1).flatten()
        c, s = alpha * theta.cos(), alpha * theta.sin()
    elif variant == "road_2":
        c, s = alpha * theta.cos(), alpha * theta.sin()
    else:  # each group's 2g values: the first g for c, the next g for s
        t, a = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
        c, s = (a[:, 0] * t[:, 0].cos()).flatten(), (a[:, 1] * t[:, 1].sin()).flatten()
    r = dense_rotation(c, s, group_size)
    x = torch.randn(3, 5)
    w, b = base[0].weight, base[0].bias
    torch.testing.assert_close(model(x), (x @ w.T + b) @ r.T, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, r @ w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.bias, r @ b, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()  # R^{-1}, block by block
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.bias, b, atol=1e-5, rtol=1e-5)


# -- against peft ---------------------------------------------------------------------------------
OPTIONS = {"road_1": dict(variant="road_1", group_size=8), "road_2": dict(variant="road_2", group_size=4),
           "road_4": dict(variant="road_4", group_size=16)}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_parameters_logits_and_gradients_match_peft(option):
    p, m = against_peft.seeded_pair(tiny_transformers_model("llama"), "RoadConfig",
                                    dict(target_modules=TARGETS, init_weights=False) | OPTIONS[option])
    for name, t in p.named_parameters():
        if t.requires_grad:
            torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())


@pytest.mark.parametrize("option", ["road_1", "road_4"])
def test_checkpoints_load_in_peft_and_back(tmp_path, option):
    base = tiny_transformers_model("bert")  # its layers have biases, which R turns too
    p, m = against_peft.seeded_pair(base, "RoadConfig", dict(target_modules=["query", "value", "dense"],
                                                             init_weights=False) | OPTIONS[option])
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path,
                                                   atol=1e-5)


def test_a_new_adapter_is_the_base_model():
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), RoadConfig(group_size=8, target_modules=TARGETS))
    ids = input_ids()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)


# -- minipeft's own: GPT-2, several adapters, errors ------------------------------------------------
def test_gpt2_conv1d_merges_to_its_forward_and_two_adapters_merge_in_order():
    base = tiny_transformers_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                                           target_modules=["c_attn", "c_fc"]))
    model.add_adapter("b", RoadConfig(variant="road_2", group_size=16, init_weights=False, target_modules=["c_fc"]))
    ids = input_ids()
    merge_checks.assert_merge_in_order_and_unmerge(model, base, lambda m: m(input_ids=ids).logits)


@pytest.mark.parametrize("case", ["a scale of 0", "angles a right angle apart"])
def test_a_singular_block_refuses_to_unmerge_rather_than_writing_noise(case):
    variant = "road_1" if case == "a scale of 0" else "road_2"
    base = nn.Sequential(nn.Linear(4, 4))
    model = get_peft_model(copy.deepcopy(base), RoadConfig(variant=variant, group_size=4, target_modules=["0"]))
    with torch.no_grad():
        layer = model.get_base_model()[0]
        if case == "a scale of 0":
            layer.road_alpha["default"][0] = 0.0
        else:  # road_2's block of pair (0, 2) has det cos(theta_0 - theta_2): 0 at a right angle
            layer.road_theta["default"].copy_(torch.tensor([0.0, 0.3, math.pi / 2, 0.3]))
        model.merge_adapter()
        merged = layer.base_layer.weight.clone()
        with pytest.raises(ValueError, match="singular or nearly so .* reload the base weights"):
            model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, merged, atol=0, rtol=0)  # left merged, not half undone


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="variant is one of \\['road_1', 'road_2', 'road_4'\\]"):
        RoadConfig(variant="road_3")
    with pytest.raises(ValueError, match="positive even integer"):
        RoadConfig(group_size=5)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide its output size 12; use one of \[2, 4, 6, 12\]"):
        get_peft_model(nn.Sequential(nn.Linear(4, 12)), RoadConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="needs an even output size: leave this layer out of target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 5)), RoadConfig(group_size=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="RoAd supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Embedding(4, 4)), RoadConfig(group_size=2, target_modules=["0"]))

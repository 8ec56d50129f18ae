"""HRA against hand-derived math (a reflection, the product of reflections, the paired identity
start) and against peft (one seed: the same vectors, logits, gradients, checkpoints both ways),
plus what minipeft adds: GPT-2's Conv1D and other convolutions, merged equal to their forward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minipeft
from minipeft import HRAConfig, get_peft_model
from minipeft.tuners.hra import unit_vectors
from tests import against_peft, merge_checks
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def householder_product(u: torch.Tensor, gram_schmidt: bool = False) -> torch.Tensor:
    """M = H_1 ... H_r, H_i = I - 2 u_i u_i^T / |u_i|^2, built as a (d, d) matrix (peft's way)."""
    units = unit_vectors(u, gram_schmidt)
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    if gram_schmidt:
        return eye - 2 * units @ units.T
    m = eye
    for i in range(u.shape[1]):
        m = m @ (eye - 2 * torch.outer(units[:, i], units[:, i]))
    return m


def test_a_reflection_mirrors_through_the_plane_orthogonal_to_its_vector():
    torch.manual_seed(0)
    layer = get_peft_model(nn.Sequential(nn.Linear(2, 2)), HRAConfig(r=1, target_modules=["0"],
                                                                     init_weights=False)).get_base_model()[0]
    with torch.no_grad():
        layer.hra_u["default"].copy_(torch.tensor([[3.0], [0.0]]))  # the mirror is the y axis
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(layer.apply_map(x, "default", transpose=True), torch.tensor([[-1.0, 2.0]]))


@pytest.mark.parametrize("gram_schmidt", [False, True])
def test_the_forward_is_the_reflected_weight_and_it_is_orthogonal(gram_schmidt):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 5))
    model = get_peft_model(copy.deepcopy(base), HRAConfig(r=4, apply_GS=gram_schmidt, target_modules=["0"],
                                                          init_weights=False))
    u = model.get_base_model()[0].hra_u["default"].detach()
    m = householder_product(u, gram_schmidt)
    torch.testing.assert_close(m @ m.T, torch.eye(12), atol=1e-5, rtol=0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), x @ (base[0].weight @ m).T + base[0].bias, atol=1e-5, rtol=0)


def test_paired_vectors_start_at_the_identity_and_an_odd_rank_says_it_cannot():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 5))
    x = torch.randn(3, 12)
    model = get_peft_model(copy.deepcopy(base), HRAConfig(r=4, target_modules=["0"]))
    u = model.get_base_model()[0].hra_u["default"]
    torch.testing.assert_close(u[:, 0], u[:, 1], atol=0, rtol=0)
    torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="r=3 is odd"):
        get_peft_model(copy.deepcopy(base), HRAConfig(r=3, target_modules=["0"]))


# -- against peft -------------------------------------------------------------------------------
def seeded_pair(base, config: dict, seed: int = 3):
    return against_peft.seeded_pair(base, "HRAConfig", config, seed)


OPTIONS = {"paired start": {}, "random": dict(init_weights=False), "gram-schmidt": dict(init_weights=False, apply_GS=True),
           "odd r": dict(r=3)}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_vectors_logits_and_gradients_match_peft(option):
    p, m = seeded_pair(tiny_transformers_model("llama"), dict(target_modules=TARGETS) | OPTIONS[option])
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())
    for name, t in p.named_parameters():
        torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)


def test_checkpoints_load_in_peft_and_back(tmp_path):
    base = tiny_transformers_model("llama")
    p, m = seeded_pair(base, dict(target_modules=TARGETS, init_weights=False, apply_GS=True))
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path)


def test_a_convolution_matches_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    p, m = seeded_pair(base, dict(r=4, target_modules=["0"], init_weights=False))
    image = torch.randn(2, 4, 7, 7)
    assert m.get_base_model()[0].hra_u["default"].shape == (36, 4)
    torch.testing.assert_close(m(image), p(image), atol=1e-5, rtol=1e-5)


# -- what minipeft adds, and the lifecycle ----------------------------------------------------------
def test_two_adapters_compose_as_their_merges_and_unmerge_restores_the_weights():
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), HRAConfig(r=4, target_modules=TARGETS, init_weights=False))
    model.add_adapter("b", HRAConfig(r=2, apply_GS=True, target_modules=TARGETS, init_weights=False))
    ids = input_ids()
    merge_checks.assert_merge_in_order_and_unmerge(model, base, lambda m: m(input_ids=ids).logits)


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="positive integer, got 0"):
        HRAConfig(r=0)
    with pytest.raises(ValueError, match="'none', 'all' or 'hra_only'"):
        HRAConfig(bias="oft_only")
    with pytest.raises(ValueError, match="HRAConfig.apply_GS must be True or False"):
        HRAConfig(apply_GS="yes")
    with pytest.raises(ValueError, match="HRA supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Embedding(4, 4)), HRAConfig(target_modules=["0"]))


def test_gram_schmidt_refuses_more_vectors_than_dimensions_and_warns_about_paired_starts():
    with pytest.raises(ValueError, match="holds at most 4 orthonormal vectors; use r <= 4"):
        get_peft_model(nn.Sequential(nn.Linear(4, 2)), HRAConfig(r=6, apply_GS=True, target_modules=["0"],
                                                                 init_weights=False))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="Use init_weights=False with apply_GS"):
        model = get_peft_model(copy.deepcopy(base), HRAConfig(r=4, apply_GS=True, target_modules=["0"]))
    # Its M is no orthogonal matrix, so unmerging solves against it: the weights come back.
    with torch.no_grad():
        model.merge_adapter()
        model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model()[0].base_layer.weight, base[0].weight, atol=1e-4, rtol=1e-4)


def test_loading_an_odd_rank_for_inference_does_not_warn_about_its_start(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="r=3 is odd"):
        model = get_peft_model(copy.deepcopy(base), HRAConfig(r=3, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the trained vectors replace the start: nothing to say
        loaded = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)

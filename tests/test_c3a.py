"""C3A against hand-derived math (each circulant block written out entry by entry; the forward
and every gradient, the input's included, equal to those of the dense update) and against peft
(one seed: the same kernels, logits, checkpoints both ways; the kernel's gradient where peft's is
right, see the module docstring of minipeft/tuners/c3a.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import C3AConfig, get_peft_model
from minipeft.tuners.c3a import CircularCorrelation
from tests import against_peft
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")


def dense_update(kernel: torch.Tensor) -> torch.Tensor:
    """``Delta W`` (out, in) before the ``1 / in``, entry by entry: block ``(i, j)``, row ``u``,
    column ``t`` is ``kernel[i, j, (t - u) mod b]`` (differentiable: built from the kernel's entries)."""
    m, n, b = kernel.shape
    rows = [torch.cat([torch.stack([torch.stack([kernel[i, j, (t - u) % b] for t in range(b)]) for u in range(b)])
                       for j in range(n)], dim=1) for i in range(m)]
    return torch.cat(rows, dim=0)


def test_a_2x2_circulant_block_by_hand():
    base = nn.Sequential(nn.Linear(2, 2, bias=False))
    model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=2, init_weights=True, target_modules=["0"]))
    with torch.no_grad():
        model.get_base_model()[0].c3a_kernel["default"].copy_(torch.tensor([[[3.0, 5.0]]]))
    # rows: u = 0 -> [w0, w1]; u = 1 -> [w1, w0]; divided by in = 2
    x = torch.tensor([[1.0, 10.0]])
    torch.testing.assert_close(model(x) - base(x), torch.tensor([[(3 + 50) / 2, (5 + 30) / 2]]))


def test_the_forward_and_every_gradient_equal_the_dense_updates():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))
    model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=4, init_weights="gaussian",
                                                          target_modules=["0", "2"]))
    kernels = [model.get_base_model()[i].c3a_kernel["default"] for i in (0, 2)]
    x = torch.randn(5, 12, requires_grad=True)
    model(x).square().sum().backward()
    got = [x.grad.clone(), *(k.grad.clone() for k in kernels)]

    refs = [k.detach().clone().requires_grad_() for k in kernels]
    x_ref = x.detach().clone().requires_grad_()
    h = x_ref @ (base[0].weight + dense_update(refs[0]) / 12).T + base[0].bias
    y = h.tanh() @ (base[2].weight + dense_update(refs[1]) / 8).T + base[2].bias
    y.square().sum().backward()
    for mine, want in zip(got, [x_ref.grad, *(r.grad for r in refs)]):
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model.get_base_model()[0].base_layer.weight,
                                   base[0].weight + dense_update(kernels[0]) / 12, atol=1e-6, rtol=1e-6)


def test_the_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CircularCorrelation.apply, (x, kernel))


# -- against peft ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform", "gaussian", True])
def test_kernels_and_logits_match_peft(init):
    p, m = against_peft.seeded_pair(tiny_transformers_model("llama"), "C3AConfig",
                                    dict(block_size=8, init_weights=init, target_modules=["q_proj", "v_proj", "down_proj"],
                                         block_size_pattern={"down_proj": 16}))
    for name, t in p.named_parameters():
        if t.requires_grad:
            torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)
    assert m.get_base_model().model.layers[0].mlp.down_proj.c3a_kernel["default"].shape == (2, 3, 16)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, p(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_the_last_layers_kernel_gradient_matches_peft():
    """Only there: a C3A layer's gradient to what comes before it differs in peft (module docstring)."""
    p, m = against_peft.seeded_pair(tiny_transformers_model("llama"), "C3AConfig",
                                    dict(block_size=8, target_modules=["model.layers.1.mlp.down_proj"]))
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())


def test_peft_0_21_sends_another_input_gradient_and_minipeft_the_dense_updates():
    """The claim of the module docstring, checked (peft is pinned below 0.22 for the tests)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8, bias=False))
    p, m = against_peft.seeded_pair(base, "C3AConfig", dict(block_size=4, init_weights="gaussian",
                                                           target_modules=["0"]))
    kernel = m.get_base_model()[0].c3a_kernel["default"].detach()
    x, upstream = torch.randn(3, 8), torch.randn(3, 8)  # (a constant upstream gradient would hide it)
    grads = []
    for run in (p, m, lambda t: t @ (base[0].weight + dense_update(kernel) / 8).T):
        xi = x.clone().requires_grad_()
        run(xi).backward(upstream)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grads[0], grads[2], atol=1e-3)


def test_block_size_patterns_pick_what_peft_picks():
    """peft's C3A rule, not LoRA's rank_pattern rule: "q_proj|v_proj" after ".*\\." groups as
    "(.*\\.q_proj)|(v_proj)", so only q_proj matches; a key naming a whole module matches it."""
    patterns = {"q_proj|v_proj": 4, "model.layers.1.mlp.down_proj": 16}
    p, m = against_peft.seeded_pair(tiny_transformers_model("llama"), "C3AConfig",
                                    dict(block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         block_size_pattern=patterns))
    shapes = {n: t.shape for n, t in p.named_parameters() if t.requires_grad}
    assert {n: t.shape for n, t in m.named_parameters() if t.requires_grad} == shapes
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.c3a_kernel.default"][-1] == 4
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.c3a_kernel.default"][-1] == 8
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.c3a_kernel.default"][-1] == 16


def test_checkpoints_load_in_peft_and_back(tmp_path):
    base = tiny_transformers_model("llama")
    p, m = against_peft.seeded_pair(base, "C3AConfig", dict(block_size=8, target_modules=["q_proj", "v_proj"],
                                                           block_size_pattern={"v_proj": 4}))
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path)


# -- minipeft's own, and errors ----------------------------------------------------------------------
def test_gpt2_conv1d_merges_to_its_forward():
    base = tiny_transformers_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=16, target_modules=["c_attn", "c_fc"]))
    ids = input_ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert not torch.allclose(unmerged, base(input_ids=ids).logits, atol=1e-3)
        torch.testing.assert_close(copy.deepcopy(model).merge_and_unload()(input_ids=ids).logits, unmerged,
                                   atol=1e-5, rtol=1e-5)


def test_float64_models_stay_in_float64_and_an_empty_batch_passes_through():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 4)).double()
    model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=4, init_weights="gaussian",
                                                          target_modules=["0"]))
    kernel = model.get_base_model()[0].c3a_kernel["default"]
    assert kernel.dtype == torch.float64
    x = torch.randn(3, 8, dtype=torch.float64)
    want = x @ (base[0].weight + dense_update(kernel.detach()) / 8).T + base[0].bias
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-12)
    assert model(x[:0]).shape == (0, 4)


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="init_weights is one of"):
        C3AConfig(init_weights="orthogonal")
    with pytest.raises(ValueError, match=r"init_weights must be True or False or a string, got 0.0 .*; use one of"):
        C3AConfig(init_weights=0.0)  # (== False to Python, but no init)
    with pytest.raises(ValueError, match="positive integers; got 0 for 'x'"):
        C3AConfig(block_size_pattern={"x": 0})
    with pytest.raises(ValueError, match="'none', 'all' or 'c3a_only'"):
        C3AConfig(bias="lora_only")
    with pytest.raises(ValueError, match=r"block_size=256 must divide both its output size 12 and its input size 18; "
                                         r"use one of \[1, 2, 3, 6\]"):
        get_peft_model(nn.Sequential(nn.Linear(18, 12)), C3AConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="C3A supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Embedding(4, 4)), C3AConfig(block_size=2, target_modules=["0"]))

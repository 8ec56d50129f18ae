"""LoKr against peft (factorisation, factor shapes and initialisation under one seed, outputs,
gradients, dropout draws, checkpoints both ways) and against hand-derived math (the Kronecker
product written with torch.kron, merging).

One deliberate difference: on a Conv1d with a CP core and rank 1, peft 0.21's torch.kron raises
on the core's strides; minipeft computes the update there, checked against torch.kron on a
contiguous copy."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import minipeft
from minipeft.tuners.lokr import factorization
from tests.test_loha import Net as LoHaNet
from tests.test_loha import assert_same_training_draws, inputs, seeded_pair

peft = pytest.importorskip("peft")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

TARGETS = ["fc1", "conv", "conv1d", "wide"]


class Net(LoHaNet):
    """LoHa's test model, and a layer wide enough for W2 to be a product at small ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(64, 48)

    def forward(self, x, image, sequence):
        return torch.cat([super().forward(x, image, sequence), self.wide(x.repeat(1, 6)[:, :64]).flatten()])


def pair(seed: int = 1, **config):
    torch.manual_seed(0)
    base = Net()
    config = dict(r=2, alpha=3, target_modules=TARGETS, init_weights=False) | config
    return base, *seeded_pair(base, "LoKrConfig", config, seed)


def test_factorization_is_peft_s():
    for dimension, factor in itertools.product(range(1, 300), [-3, -1, 0, 1, 2, 3, 4, 8, 16, 20, 64]):
        assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


CONFIGS = [dict(r=r, use_effective_conv2d=effective, decompose_both=both, decompose_factor=factor, init_weights=init)
           for r, effective, both, factor, init in itertools.product(
               [2, 8], [False, True], [False, True], [-1, 4], [True, False, "lycoris"])]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_same_factors_outputs_and_gradients_as_peft(config):
    _, p, m = pair(**config)
    theirs, ours = p.state_dict(), m.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    with torch.no_grad():  # every factor non-zero, so that none hides a term
        for name, t in p.named_parameters():
            if t.requires_grad:
                t.add_(0.1 * torch.randn_like(t))
                m.get_parameter(name).copy_(t)
    out_p, out_m = p(*inputs()), m(*inputs())
    torch.testing.assert_close(out_m, out_p, atol=1e-5, rtol=1e-5)
    out_p.square().sum().backward()
    out_m.square().sum().backward()
    for name, t in p.named_parameters():
        if t.requires_grad:
            torch.testing.assert_close(m.get_parameter(name).grad, t.grad, atol=1e-4, rtol=1e-4)


def test_the_update_is_a_kronecker_product():
    _, _, m = pair(r=2)
    layer = m.get_base_model().wide  # 48 = 6 x 8 rows, 64 = 8 x 8 columns; W2 a rank-2 product
    w1 = layer.lokr_w1["default"]
    w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    assert w1.shape == (6, 8) and w2.shape == (8, 8)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (torch.kron(w1, w2) * 3 / 2).T, atol=1e-5, rtol=0)


def test_a_rank_one_cp_core_on_a_conv1d_where_peft_raises():
    model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1))
    config = dict(r=1, target_modules=["0"], use_effective_conv2d=True, init_weights=False)
    p = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(**config))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        p(inputs()[2])
    m = minipeft.get_peft_model(copy.deepcopy(model), minipeft.LoKrConfig(**config))
    layer = m.get_base_model()[0]
    core = torch.einsum("ijkl,ip,jq->pqkl", layer.lokr_t2["default"], layer.lokr_w2_a["default"],
                        layer.lokr_w2_b["default"]).clone(memory_format=torch.contiguous_format)  # (b, d, k, 1)
    want = torch.kron(layer.lokr_w1["default"][:, :, None, None], core).reshape(6, 4, 3) * layer.scaling["default"]
    torch.testing.assert_close(layer.delta_weight("default"), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [False, True])
def test_rank_and_module_dropout_draw_what_peft_draws(scale):
    _, p, m = pair(rank_dropout=0.3, module_dropout=0.4, rank_dropout_scale=scale)
    assert_same_training_draws(p, m, atol=1e-5)


def test_checkpoints_merging_and_unloading():
    base, p, m = pair(decompose_both=True, use_effective_conv2d=True)
    with torch.no_grad():
        for t in p.parameters():
            if t.requires_grad:
                t.add_(0.1)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        p.save_pretrained(folder)
        m = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    with torch.no_grad():
        adapted = p(*inputs())
        torch.testing.assert_close(m(*inputs()), adapted, atol=1e-5, rtol=1e-5)
        with tempfile.TemporaryDirectory() as folder:
            m.save_pretrained(folder)
            p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
            torch.testing.assert_close(p2(*inputs()), adapted, atol=1e-5, rtol=1e-5)
        m.merge_adapter()
        torch.testing.assert_close(m(*inputs()), adapted, atol=1e-5, rtol=1e-5)
        m.unmerge_adapter()
        torch.testing.assert_close(m.unload()(*inputs()), base(*inputs()), atol=1e-5, rtol=0)


def test_bad_input_is_refused_with_what_would_be_right():
    with pytest.raises(ValueError, match=r"init_weights must be True, False or 'lycoris', got 'gaussian'"):
        minipeft.LoKrConfig(target_modules=["fc1"], init_weights="gaussian")
    with pytest.raises(ValueError, match=r"decompose_factor must be an integer, got 2.5"):
        minipeft.LoKrConfig(target_modules=["fc1"], decompose_factor=2.5)
    with pytest.raises(ValueError, match=r"decompose_factor is a size to split dimensions at \(-1: near the square"):
        minipeft.LoKrConfig(target_modules=["fc1"], decompose_factor=0)
    with pytest.raises(ValueError, match=r"LoKr's rank must be a positive integer, got fc1=0"):
        minipeft.LoKrConfig(target_modules=["fc1"], rank_pattern={"fc1": 0})
    with pytest.raises(ValueError, match=r"cannot apply LoKr to 'embed': it is a Embedding; LoKr supports nn.Linear"):
        model = nn.Module()
        model.embed = nn.Embedding(4, 4)
        minipeft.get_peft_model(model, minipeft.LoKrConfig(target_modules=["embed"]))

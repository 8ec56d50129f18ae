"""LoHa against peft (initialisation under one seed, outputs, gradients, dropout draws,
checkpoints both ways, rank/alpha patterns) and against hand-derived math (the update as a
Hadamard product, merging, gradients by finite differences).

One deliberate difference: for the CP form (``use_effective_conv2d``) peft 0.21's hand-written
backward gives wrong gradients for ``hada_w1_a`` and ``hada_w2_a`` (they fail gradcheck);
minipeft lets autograd differentiate the einsum, and its gradients are checked by gradcheck."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft

peft = pytest.importorskip("peft")

TARGETS = ["fc1", "conv", "conv1d"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x, image, sequence):
        return torch.cat([self.fc2(torch.relu(self.fc1(x))).flatten(), self.conv(image).flatten(),
                          self.conv1d(sequence).flatten()])


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(5, 12, generator=g, dtype=dtype), torch.randn(2, 3, 8, 8, generator=g, dtype=dtype),
            torch.randn(2, 4, 9, generator=g, dtype=dtype))


def seeded_pair(base, method: str, config: dict, seed: int = 1):
    """(peft model, minipeft model) of config class ``method`` on copies of ``base``, each built
    right after ``torch.manual_seed(seed)``: the same seed must give both the same factors."""
    torch.manual_seed(seed)
    p = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**config))
    torch.manual_seed(seed)
    m = minipeft.get_peft_model(copy.deepcopy(base), getattr(minipeft, method)(**config))
    return p, m


def assert_same_training_draws(p, m, atol: float) -> None:
    """Six training forwards of each from one seed give the same outputs (the same rank- and
    module-dropout draws), and the draws do change the output."""
    p.train(), m.train()
    torch.manual_seed(5)
    theirs = [p(*inputs()) for _ in range(6)]
    torch.manual_seed(5)
    ours = [m(*inputs()) for _ in range(6)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert len({round(o.sum().item(), 4) for o in ours}) > 1


def pair(seed: int = 1, **config):
    torch.manual_seed(0)
    base = Net()
    config = dict(r=3, alpha=6, target_modules=TARGETS, init_weights=False) | config
    return base, *seeded_pair(base, "LoHaConfig", config, seed)


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("effective_conv", [False, True])
def test_same_seed_same_factors_and_outputs_as_peft(init_weights, effective_conv):
    base, p, m = pair(init_weights=init_weights, use_effective_conv2d=effective_conv)
    theirs, ours = p.state_dict(), m.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    out = m(*inputs())
    torch.testing.assert_close(out, p(*inputs()), atol=0, rtol=0)
    if init_weights:  # hada_w2_b starts at zero: the base model
        torch.testing.assert_close(out, base(*inputs()), atol=0, rtol=0)


def test_gradients_match_peft():
    _, p, m = pair()
    p(*inputs()).square().sum().backward()
    m(*inputs()).square().sum().backward()
    grads_p = {n: t.grad for n, t in p.named_parameters() if t.requires_grad}
    grads_m = {n: t.grad for n, t in m.named_parameters() if t.requires_grad}
    assert sorted(grads_m) == sorted(grads_p) and len(grads_m) == 12
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_m[name], grad, atol=1e-5, rtol=1e-5)
        assert grad.abs().sum() > 0


def test_the_update_is_the_hadamard_product_of_two_low_rank_products():
    _, _, m = pair()
    layer = m.get_base_model().fc1
    w1 = layer.hada_w1_a["default"] @ layer.hada_w1_b["default"]
    w2 = layer.hada_w2_a["default"] @ layer.hada_w2_b["default"]
    x = inputs()[0]
    want = layer.base_layer(x) + x @ (w1 * w2 * 6 / 3).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=0)


def test_effective_conv_gradients_pass_gradcheck_and_match_peft_where_peft_is_right():
    _, p, m = pair(use_effective_conv2d=True)
    layer = m.get_base_model().conv.double()
    params = {name: t for name, t in layer.named_parameters() if ".default" in name}
    image = inputs(torch.float64)[1]

    def output(*tensors):
        return torch.func.functional_call(layer, dict(zip(params, tensors)), (image,))

    assert torch.autograd.gradcheck(output, tuple(t.detach().requires_grad_() for t in params.values()))

    m = copy.deepcopy(pair(use_effective_conv2d=True)[2])
    p(*inputs()).square().sum().backward()
    m(*inputs()).square().sum().backward()
    for name, t in p.named_parameters():
        if t.requires_grad and not any(f"hada_w{i}_a" in name and "conv" in name for i in (1, 2)):
            torch.testing.assert_close(m.get_parameter(name).grad, t.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_rank_and_module_dropout_draw_what_peft_draws(effective_conv):
    _, p, m = pair(rank_dropout=0.3, module_dropout=0.4, use_effective_conv2d=effective_conv)
    assert_same_training_draws(p, m, atol=1e-6)
    m.eval()
    torch.testing.assert_close(m(*inputs()), m(*inputs()), atol=0, rtol=0)  # no dropout at eval


def test_rank_dropout_keeps_rows_whole_and_rescales_them():
    _, _, m = pair(rank_dropout=0.5)
    layer = m.get_base_model().fc1
    layer.train()
    x = torch.eye(12)  # the output's rows of Delta W x are the update's columns: read it back
    torch.manual_seed(3)
    update = (layer(x) - layer.base_layer(x)).T  # (out, in) = Delta W * keep / mean(keep)
    full = layer.delta_weight("default").detach()
    kept = [i for i in range(20) if update[i].abs().sum() > 0]
    assert 0 < len(kept) < 20
    torch.testing.assert_close(update[kept], full[kept] * 20 / len(kept), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_the_update_pads_as_its_convolution_does(effective_conv):
    """Delta W x runs through the layer's own convolution, padding mode included, so the adapter
    computes what its merged kernel does (peft pads with zeros whatever the layer's mode)."""
    model = nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"))
    m = minipeft.get_peft_model(model, minipeft.LoHaConfig(r=2, target_modules=["0"], init_weights=False,
                                                            use_effective_conv2d=effective_conv))
    sequence = inputs()[2]
    with torch.no_grad():
        unmerged = m(sequence)
        m.merge_adapter()
        torch.testing.assert_close(m(sequence), unmerged, atol=1e-5, rtol=0)


def test_checkpoints_load_in_peft_and_back(tmp_path):
    base, p, m = pair(use_effective_conv2d=True)
    m.save_pretrained(tmp_path / "mini")
    p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(p2(*inputs()), m(*inputs()), atol=0, rtol=0)
    with torch.no_grad():
        for t in p.parameters():
            if t.requires_grad:
                t.mul_(1.5)
    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(m2(*inputs()), p(*inputs()), atol=0, rtol=0)


def test_rank_and_alpha_patterns_as_peft_reads_them():
    _, p, m = pair(rank_pattern={"conv": 2, "^conv1d$": 4}, alpha_pattern={"fc1": 1.5})
    for name in TARGETS:
        ours, theirs = m.get_base_model().get_submodule(name), p.get_base_model().get_submodule(name)
        assert ours.r["default"] == theirs.r["default"] and ours.scaling["default"] == theirs.scaling["default"]
    assert m.get_base_model().conv1d.r["default"] == 4 and m.get_base_model().fc1.scaling["default"] == 0.5


def test_merge_unmerge_disable_unload_and_a_second_adapter():
    base, _, m = pair()
    with torch.no_grad():
        adapted, plain = m(*inputs()), base(*inputs())
        with m.disable_adapter():
            torch.testing.assert_close(m(*inputs()), plain, atol=0, rtol=0)
        m.merge_adapter()
        torch.testing.assert_close(m(*inputs()), adapted, atol=1e-5, rtol=0)
        m.unmerge_adapter()
        torch.testing.assert_close(m.get_base_model().fc1.base_layer.weight, base.fc1.weight, atol=1e-6, rtol=0)
        m.add_adapter("other", minipeft.LoHaConfig(r=2, target_modules=["fc1"], init_weights=False))
        m.set_adapter("other")
        other = m(*inputs())
        assert not torch.allclose(other, adapted)
        torch.testing.assert_close(copy.deepcopy(m).merge_and_unload()(*inputs()), other, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.unload()(*inputs()), plain, atol=1e-6, rtol=0)  # merged once, unmerged


def test_bad_input_is_refused_with_what_would_be_right():
    with pytest.raises(ValueError, match=r"cannot apply LoHa to 'embed': it is a Embedding; LoHa supports nn.Linear"):
        model = nn.Module()
        model.embed = nn.Embedding(4, 4)
        minipeft.get_peft_model(model, minipeft.LoHaConfig(target_modules=["embed"]))
    with pytest.raises(ValueError, match=r"LoHa's rank must be a positive integer, got r=0"):
        minipeft.LoHaConfig(r=0, target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"module_dropout is a probability in \[0, 1\], got 1.5"):
        minipeft.LoHaConfig(module_dropout=1.5, target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"LoHa's alpha is a number \(the scale is alpha / r\), got fc1='2'"):
        minipeft.LoHaConfig(alpha_pattern={"fc1": "2"}, target_modules=["fc1"])
    with pytest.raises(ValueError, match=r"LoHaConfig.init_weights must be True or False, .*; True is a zero update"):
        minipeft.LoHaConfig(init_weights="gaussian", target_modules=["fc1"])

"""VeRA against peft 0.21 and against its formula.

Tiny transformers models built from configs (LLaMA: nn.Linear targets of several shapes, so the
shared pair is sliced differently per layer; GPT-2: Conv1D, weights stored (in, out)) and a
hand-written module. The trained vectors d and b are set to random values first, so that an
adapter that did nothing, or used the wrong slice of the pair, could not pass.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import minipeft
from minipeft import PeftModel, VeraConfig, get_peft_model
from minipeft.tuners.vera import VeraLinear, VeraProjection
from tests.models import first_output, input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],  # 32->32, 32->16, 32->48, 48->32
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],  # Conv1D: 32->96, 32->128, 128->32
}
WIDEST = {"llama": (48, 48), "gpt2": (128, 128)}  # (in_max, out_max) over the targets


class Net(nn.Module):
    """Two linear layers of different shapes, and one VeRA cannot adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 10)
        self.conv = nn.Conv1d(10, 10, 1)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = h + self.conv(h.unsqueeze(-1)).squeeze(-1)
        return self.head(h)


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def both(base: nn.Module, **kwargs):
    """minipeft's and peft's VeRA models on copies of ``base``, same config."""
    ours = get_peft_model(copy.deepcopy(base), VeraConfig(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice for Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**kwargs))
    return ours, theirs


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def copy_vectors(src: nn.Module, dst: nn.Module) -> None:
    """d and b from one model into the other, by parameter name (both libraries use the same names)."""
    theirs = dict(dst.named_parameters())
    names = [n for n, _ in src.named_parameters() if "vera_lambda" in n]
    assert names and all(n in theirs for n in names)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "vera_lambda" in name:
                theirs[name].copy_(p)


def pair(model, adapter: str = "default") -> VeraProjection:
    layer = next(m for m in model.modules() if isinstance(m, VeraLinear))
    return layer.vera_projection[adapter]


def out(model, x):
    return first_output(model(input_ids=x)) if x.dtype == torch.long else model(x)


def tiny(kind: str) -> nn.Module:
    return tiny_transformers_model(kind) if kind != "net" else net()


def inputs(kind: str) -> torch.Tensor:
    return input_ids(2, 7) if kind != "net" else torch.randn(4, 8, generator=torch.Generator().manual_seed(2))


SETUPS = {"llama": TARGETS["llama"], "gpt2": TARGETS["gpt2"], "net": ["a", "b"]}


# -- the shared pair ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_projection_is_bit_identical_to_peft_and_sized_by_the_widest_target(kind):
    ours, theirs = both(tiny(kind), r=8, target_modules=TARGETS[kind], projection_prng_key=1234)
    # the saved config records the layout as peft's does: GPT-2's Conv1D stores (in, out)
    assert ours.peft_config["default"].fan_in_fan_out is theirs.peft_config["default"].fan_in_fan_out is (kind == "gpt2")
    A, B = pair(ours).vera_A, pair(ours).vera_B
    in_max, out_max = WIDEST[kind]
    assert A.shape == (8, in_max) and B.shape == (out_max, 8)
    assert torch.equal(A, theirs.base_model.vera_A["default"])
    assert torch.equal(B, theirs.base_model.vera_B["default"])
    # Kaiming-uniform for ReLU: |A| < sqrt(6 / in_max), |B| < sqrt(6 / r), and the draw fills that range.
    assert A.abs().max() <= (6 / in_max) ** 0.5 and A.abs().max() > 0.9 * (6 / in_max) ** 0.5
    assert B.abs().max() <= (6 / 8) ** 0.5
    # Another key, another pair.
    other = get_peft_model(tiny(kind), VeraConfig(r=8, target_modules=TARGETS[kind], projection_prng_key=1235))
    assert not torch.equal(pair(other).vera_A, A)


def test_pair_is_held_once_and_stays_shared_through_to():
    model = get_peft_model(tiny("llama"), VeraConfig(r=4, target_modules=TARGETS["llama"]))
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 10
    assert all(layer.vera_projection["default"] is layers[0].vera_projection["default"] for layer in layers)
    # Buffers, not parameters: nothing to train, nothing counted.
    assert not any("vera_projection" in n for n, _ in model.named_parameters())
    model.to(torch.float64)
    ptrs = {layer.vera_projection["default"].vera_A.data_ptr() for layer in layers}
    assert len(ptrs) == 1 and layers[0].vera_projection["default"].vera_A.dtype == torch.float64
    assert layers[0].vera_lambda_d["default"].dtype == torch.float64


# -- the forward --------------------------------------------------------------------------------------
def test_forward_is_the_formula_on_a_hand_written_module():
    base = net()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=5, target_modules=["a", "b"], projection_prng_key=7))
    x = inputs("net")
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # b starts at zero
    randomize(model, seed=1)
    A, B = pair(model).vera_A, pair(model).vera_B  # (5, 8), (10, 5): a is 8 -> 6, b is 6 -> 10
    assert A.shape == (5, 8) and B.shape == (10, 5)
    a, b = model.base_model.model.a, model.base_model.model.b

    def vera(layer, base_layer, h, n, m):
        d, bb = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
        return base_layer(h) + bb * ((d * (h @ A[:, :n].T)) @ B[:m, :].T)

    h = vera(b, base.b, torch.relu(vera(a, base.a, x, 8, 6)), 6, 10)
    expected = base.head(h + base.conv(h.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "net"])
def test_forward_and_gradients_match_peft(kind):
    ours, theirs = both(tiny(kind), r=6, target_modules=SETUPS[kind], projection_prng_key=5)
    randomize(ours, seed=2)
    copy_vectors(ours, theirs)
    x = inputs(kind)
    y_ours, y_theirs = out(ours, x), out(theirs, x)
    assert not torch.allclose(y_ours, out(tiny(kind), x), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    y_ours.square().mean().backward()
    y_theirs.square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    trained = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trained.keys() == grads.keys()  # the same parameters train, under the same names
    for name, grad in trained.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_dropout_is_on_the_vera_input_as_in_peft():
    ours, theirs = both(net(), r=4, target_modules=["a", "b"], vera_dropout=0.5)
    randomize(ours, seed=3)
    copy_vectors(ours, theirs)
    ours.train(), theirs.train()
    x = inputs("net")
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs)
    torch.manual_seed(11)
    assert not torch.allclose(ours(x), ours.eval()(x))  # the mask changed the output in training


def test_bf16_base_keeps_fp32_vectors_and_computes_the_formula():
    base = net().to(torch.bfloat16)
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a"]))
    randomize(model, seed=4)
    layer = model.base_model.model.a
    d, b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]
    assert d.dtype == b.dtype == layer.vera_projection["default"].vera_A.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        A, B = layer.projections("default")
        xf = x.float()
        expected = xf @ base.a.weight.float().T + base.a.bias.float() + b * ((d * (xf @ A.T)) @ B.T)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)


# -- initialisation and what trains -------------------------------------------------------------------
def test_initial_vectors_and_only_d_and_b_train():
    base = tiny("llama")
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=16, target_modules=TARGETS["llama"], d_initial=0.25))
    x = inputs("llama")
    torch.testing.assert_close(out(model, x), out(base, x), rtol=0, atol=0)
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert all(torch.equal(m.vera_lambda_d["default"], torch.full((16,), 0.25)) for m in layers)
    assert all(not m.vera_lambda_b["default"].any() for m in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(16 + m.out_features for m in layers)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: b moves in the first, d (whose gradient needs b) in the second
        opt.zero_grad()
        out(model, x).square().mean().backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("vera_lambda" in k for k in changed)  # the pair and the base stay frozen
    assert any("vera_lambda_d" in k for k in changed) and any("vera_lambda_b" in k for k in changed)


def test_init_weights_false_draws_as_peft_does():
    base = net()
    torch.manual_seed(3)
    ours = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a", "b"], init_weights=False))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=["a", "b"], init_weights=False))
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if "vera_lambda" in name:
            assert torch.equal(p, theirs_params[name]), name
    assert torch.equal(ours.base_model.model.a.vera_lambda_b["default"], torch.ones(6))


# -- checkpoints both ways ----------------------------------------------------------------------------
def saved(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_checkpoints_load_both_ways(tmp_path, kind, save_projection):
    base = tiny(kind)
    kwargs = dict(r=6, target_modules=TARGETS[kind], projection_prng_key=9, save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns, in both libraries
        ours, theirs = both(base, **kwargs)
        randomize(ours, seed=5)
        copy_vectors(ours, theirs)
        x = inputs(kind)
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        ours_file, theirs_file = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
        assert ours_file.keys() == theirs_file.keys()
        assert ("base_model.vera_A" in ours_file) == save_projection
        assert all(torch.equal(ours_file[k], theirs_file[k]) for k in ours_file)

        into_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        into_ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    expected = out(ours, x)
    torch.testing.assert_close(out(into_peft, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(out(into_ours, x), expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_projection"] == save_projection


def test_a_saved_pair_is_what_loading_uses(tmp_path):
    """With save_projection=True the file's A and B win over the key's draw, in both libraries."""
    base = net()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a", "b"]))
    randomize(model, seed=6)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = saved(tmp_path)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * -2  # not what the key draws
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    x = inputs("net")
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(pair(ours).vera_A, tensors["base_model.vera_A"])
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert not torch.allclose(ours(x), model(x))


def test_load_adapter_and_strict_keys(tmp_path):
    base = net()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a", "b"]))
    randomize(model, seed=7)
    model.save_pretrained(tmp_path)
    other = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a", "b"]), adapter_name="first")
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    x = inputs("net")
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    # A file without the pair for a config that says it holds one: refused, model unchanged.
    tensors = saved(tmp_path)
    del tensors["base_model.vera_A"]
    safetensors.torch.save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="base_model.vera_A"):
        other.load_adapter(tmp_path, "broken")
    assert list(other.peft_config) == ["first", "loaded"]


# -- merging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(kind):
    base = tiny(kind)
    ours, theirs = both(base, r=6, target_modules=TARGETS[kind])
    randomize(ours, seed=8)
    copy_vectors(ours, theirs)
    x = inputs(kind)
    expected = out(ours, x).detach()
    weights = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith("base_layer.weight")}

    ours.merge_adapter()
    assert all(not torch.equal(ours.state_dict()[k], w) for k, w in weights.items())
    torch.testing.assert_close(out(ours, x), expected, rtol=1e-4, atol=1e-5)
    ours.unmerge_adapter()
    for k, w in weights.items():
        torch.testing.assert_close(ours.state_dict()[k], w, rtol=0, atol=1e-6)
    torch.testing.assert_close(out(ours, x), expected, rtol=1e-5, atol=1e-6)

    merged = ours.merge_and_unload()
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    torch.testing.assert_close(out(merged, x), expected, rtol=1e-4, atol=1e-5)
    theirs_merged = theirs.merge_and_unload()
    theirs_weights = dict(theirs_merged.named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, theirs_weights[name], rtol=0, atol=1e-6, msg=name)


def test_disabled_adapter_unmerges_and_unload_gives_the_base_back():
    base = net()
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["a", "b"]))
    randomize(model, seed=9)
    x = inputs("net")
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-6)
    plain = model.unload()
    torch.testing.assert_close(plain(x), base(x), rtol=1e-5, atol=1e-6)
    assert isinstance(plain.a, nn.Linear)


# -- several adapters ---------------------------------------------------------------------------------
def test_two_adapters_match_peft_and_each_has_its_own_copy_of_the_pair(tmp_path):
    base = net()
    ours, theirs = both(base, r=4, target_modules=["a", "b"], projection_prng_key=2)
    ours.add_adapter("small", VeraConfig(r=4, target_modules=["a"], projection_prng_key=2, init_weights=False))
    theirs.add_adapter("small", peft.VeraConfig(r=4, target_modules=["a"], projection_prng_key=2))
    randomize(ours, seed=10)
    copy_vectors(ours, theirs)
    # The second adapter uses the first one's numbers (its own targets alone would draw A (4, 8), B (6, 4)).
    first, second = pair(ours, "default"), ours.base_model.model.a.vera_projection["small"]
    assert torch.equal(first.vera_B, second.vera_B) and second.vera_B.shape == (10, 4)
    assert second.vera_A.data_ptr() != first.vera_A.data_ptr()
    x = inputs("net")
    for name in ("default", "small"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == [
        "base_model.model.a.vera_lambda_b.small", "base_model.model.a.vera_lambda_d.small"
    ]
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "small", "small")
    loaded.set_adapter("small")
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    ours.delete_adapter("default")
    assert type(ours.base_model.model.b) is nn.Linear  # it held "default" alone
    assert list(ours.base_model.model.a.vera_projection) == ["small"]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------------
def test_unsupported_layer_is_refused_as_peft_does():
    model = net()
    with pytest.raises(TypeError, match=r"'conv'.*Conv1d.*nn.Linear and transformers' GPT-2 Conv1D"):
        get_peft_model(model, VeraConfig(r=4, target_modules=["a", "conv"]))
    assert isinstance(model.a, nn.Linear)  # nothing was wrapped
    with pytest.raises(TypeError):
        peft.get_peft_model(net(), peft.VeraConfig(r=4, target_modules=["a", "conv"]))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(projection_prng_key=1), "projection_prng_key=0"),
        (dict(save_projection=False), "save_projection=True"),
        (dict(r=8), "Use r=4"),
        (dict(r=2), "Use r=4"),
        (dict(target_modules=["head"]), r"'head' is 10 -> 3 wide.*A: \(4, 8\)"),
    ],
)
def test_a_second_adapter_must_fit_the_shared_pair(change, message):
    model = get_peft_model(net(), VeraConfig(r=4, target_modules=["a", "b"]))  # A (4, 8), B (10, 4)
    x = inputs("net")
    kwargs = {**dict(r=4, target_modules=["a"]), **change}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            model.add_adapter("other", VeraConfig(**kwargs))
    assert list(model.peft_config) == ["default"]
    assert not any("other" in n for n, _ in model.named_parameters())
    model(x)
    if change != dict(r=2):  # peft accepts a smaller r, then fails in its forward
        theirs = peft.get_peft_model(net(), peft.VeraConfig(r=4, target_modules=["a", "b"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError):
                theirs.add_adapter("other", peft.VeraConfig(**kwargs))


def test_config_errors_and_peft_fields():
    with pytest.raises(ValueError, match="positive integer"):
        VeraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        VeraConfig(bias="lora_only")
    with pytest.raises(ValueError, match="layers_to_transform"):
        VeraConfig(layers_pattern="layers")
    with pytest.warns(UserWarning, match="save_projection=False"):
        VeraConfig(save_projection=False)
    ours = set(VeraConfig(target_modules=["a"]).to_dict())
    theirs = set(peft.VeraConfig(target_modules=["a"]).to_dict())
    assert ours <= theirs and theirs - ours <= {"auto_mapping", "peft_version"}


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_trained_biases_as_peft(bias):
    """GPT-2's Conv1D layers have biases: the same ones train and are saved, under the same keys."""
    ours, theirs = both(tiny("gpt2"), r=4, target_modules=TARGETS["gpt2"], bias=bias)
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(ours) == trainable(theirs) and any(n.endswith(".bias") for n in trainable(ours))
    assert minipeft.get_peft_model_state_dict(ours).keys() == peft.get_peft_model_state_dict(theirs).keys()

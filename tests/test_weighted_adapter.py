"""add_weighted_adapter: LoRA adapters combined into a new one.

References: peft itself on the same weights (the new adapter's A and B, its config and the
outputs), and the hand-derived math of ``lora_combine.combine``: "cat" gives exactly
``sum_i w_i s_i B_i A_i``, "svd" its best rank-k approximation (residual = the (k+1)-th
singular value), a single adapter exactly ``w * delta``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from minipeft import IA3Config, LoraConfig, PeftModel, get_peft_model
from minipeft.tuners.lora import LoraLayer
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

WEIGHTS = [0.7, -1.3]  # a negative weight: subtracting an adapter is allowed


def pair(base, first: dict, second: dict):
    """(peft model, minipeft model): adapters "default" and "b", peft's random weights in both."""
    models = []
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**first))
        model.add_adapter("b", library.LoraConfig(**second))
        models.append(model)
    randomize_adapters(models[0])
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models


def lora_layers(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


# -- against peft -------------------------------------------------------------------------------
# peft's "svd" breaks when the new rank exceeds a layer's min(out, in) (it stores a B of the wrong
# shape), so the parity cases keep every layer at least as wide as the rank; see the padding test.
CASES = {
    "tinynet": (lambda: TinyNet().eval(), dict(target_modules=["fc1", "fc2", "embed", "conv2d"])),
    "gpt2": (lambda: tiny_transformers_model("gpt2"), dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"])),
    "llama": (lambda: tiny_transformers_model("llama"), dict(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"])),
}


# GPT-2's Conv1D stores W as (in, out); only "svd" works on W itself, so it alone runs there.
PARITY = [(arch, kind) for arch in ("tinynet", "llama") for kind in ("linear", "cat", "svd")] + [("gpt2", "svd")]


@pytest.mark.parametrize("arch, combination_type", PARITY)
def test_new_adapter_matches_peft(arch, combination_type):
    make, targets = CASES[arch]
    # "b" uses rsLoRA and another alpha, so per-source scalings differ; "linear" needs equal ranks.
    second = dict(targets, r=4 if combination_type == "linear" else 2, lora_alpha=3, use_rslora=True)
    peft_model, mini_model = pair(make(), dict(targets, r=4, lora_alpha=8), second)
    for model in (peft_model, mini_model):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type=combination_type)

    expected = {k: v for k, v in peft_model.state_dict().items() if ".mix" in k}
    got = {k: v for k, v in mini_model.state_dict().items() if ".mix" in k}
    assert got.keys() == expected.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
    peft_config, mini_config = peft_model.peft_config["mix"], mini_model.peft_config["mix"]
    assert (mini_config.r, mini_config.lora_alpha) == (peft_config.r, peft_config.lora_alpha)
    assert set(mini_config.target_modules) == set(peft_config.target_modules)

    for model in (peft_model, mini_model):
        model.set_adapter("mix")
    ids = input_ids()
    out = [m(input_ids=ids) for m in (peft_model, mini_model)]
    out = [o.logits if hasattr(o, "logits") else o for o in out]
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)


def test_svd_options_match_peft():
    base = tiny_transformers_model("llama")
    config = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    peft_model, mini_model = pair(base, config, {**config, "r": 3})
    options = dict(combination_type="svd", svd_rank=5, svd_clamp=0.9, svd_full_matrices=False)
    for model in (peft_model, mini_model):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", **options)
    expected = {k: v for k, v in peft_model.state_dict().items() if ".mix" in k}
    for key, value in expected.items():
        torch.testing.assert_close(mini_model.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_saved_combination_loads_in_peft(tmp_path):
    base = tiny_transformers_model("llama")
    config = dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    model.add_adapter("b", LoraConfig(**config, use_rslora=True))
    randomize_adapters(model)
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")
    model.set_adapter("mix")
    expected = model(input_ids=input_ids()).logits
    model.save_pretrained(tmp_path, selected_adapters=["mix"])

    for library in (peft, minipeft):
        loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
        torch.testing.assert_close(loaded(input_ids=input_ids()).logits, expected, atol=1e-5, rtol=0)


def test_sources_inside_another_methods_wrapper(tmp_path):
    """(IA)^3 added after the LoRA adapters wraps their LoraLinear, which now sits at
    ``blocks.N.fc1.base_layer``. The combination goes into that LoraLinear (no new wrapper), its
    config names the layers as peft's does, and it computes and saves what peft's combination of
    the same adapters, in a model without (IA)^3, does."""
    lora = dict(target_modules=["fc1"], r=4, lora_alpha=8)
    base = TinyNet().eval()
    peft_model, mini_model = pair(base, lora, {**lora, "r": 2, "use_rslora": True})
    mini_model.add_adapter("ia3", IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    randomize_adapters(mini_model, seed=1, names=("ia3_l",), std=0.3, mean=1.0)
    inner = mini_model.get_base_model()
    wrappers_before = [n for n, m in inner.named_modules() if isinstance(m, minipeft.tuners.AdapterLayer)]
    for model in (peft_model, mini_model):
        model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")

    assert [n for n, m in inner.named_modules() if isinstance(m, minipeft.tuners.AdapterLayer)] == wrappers_before
    assert "mix" in inner.blocks[0]["fc1"].base_layer.lora_A  # inside the (IA)^3 wrapper
    assert mini_model.peft_config["mix"].target_modules == sorted(peft_model.peft_config["mix"].target_modules)
    theirs = {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {minipeft.targeting.logical_name(inner, n): m for n, m in lora_layers(mini_model).items()}
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        torch.testing.assert_close(layer.delta_weight("mix"), theirs[name].get_delta_weight("mix"), atol=1e-6, rtol=0)

    for model in (peft_model, mini_model):
        model.set_adapter("mix")
    expected = peft_model(input_ids=input_ids())
    torch.testing.assert_close(mini_model(input_ids=input_ids()), expected, atol=1e-6, rtol=0)
    mini_model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix")
    torch.testing.assert_close(loaded(input_ids=input_ids()), expected, atol=1e-6, rtol=0)


# -- the math by hand ---------------------------------------------------------------------------
ALL_TYPES = ["embed", "conv1d", "conv2d", "fc1", "fc2", "head"]


def two_adapters(**second):
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, lora_alpha=4, target_modules=ALL_TYPES))
    model.add_adapter("b", LoraConfig(**{"r": 3, "lora_alpha": 5, "use_rslora": True, "target_modules": ALL_TYPES,
                                         **second}))
    randomize_adapters(model)
    return model


def weighted_sum(layer, adapters, weights):
    return sum(w * layer.delta_weight(a) for a, w in zip(adapters, weights) if a in layer.r)


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_cat_and_full_rank_svd_give_exactly_the_weighted_sum_of_updates(combination_type):
    """On every layer type. Full rank: svd_rank >= every layer's rank of the sum (here 2 + 3)."""
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type=combination_type, svd_rank=5)
    layers = lora_layers(model)
    assert set(layers) == {n for n, m in model.get_base_model().named_modules() if n.split(".")[-1] in ALL_TYPES}
    for name, layer in layers.items():
        assert layer.r["mix"] == 5 and layer.scaling["mix"] == 1.0
        torch.testing.assert_close(layer.delta_weight("mix"), weighted_sum(layer, ["default", "b"], WEIGHTS),
                                   atol=1e-5, rtol=0, msg=name)


def test_cat_of_float64_adapters_is_exact_in_float64():
    # The factors are combined in at least fp32, so fp64 ones are not rounded to fp32 on the way.
    model = two_adapters().double()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("mix"), weighted_sum(layer, ["default", "b"], WEIGHTS),
                                   atol=1e-12, rtol=1e-12, msg=name)


def test_low_rank_svd_is_the_best_approximation():
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=2)
    layer = model.base_model.model.blocks[0]["fc1"]  # (32, 16): the sum has rank 5
    target = weighted_sum(layer, ["default", "b"], WEIGHTS)
    sigma = torch.linalg.svdvals(target)
    residual = torch.linalg.matrix_norm(target - layer.delta_weight("mix"), ord=2)
    torch.testing.assert_close(residual, sigma[2], atol=1e-5, rtol=1e-4)  # Eckart-Young: sigma_3


def test_svd_rank_above_a_layers_size_is_zero_padded():
    """head is (3, 16): a rank-5 adapter holds the exact sum in 3 directions, the rest zero."""
    model = two_adapters()
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=5)
    head = model.base_model.model.head
    assert head.lora_B["mix"].weight.shape == (3, 5) and torch.all(head.lora_B["mix"].weight[:, 3:] == 0)
    model.set_adapter("mix")
    model(input_ids=input_ids())  # runs (peft's adapter of this shape cannot)


def test_a_single_adapter_is_combined_exactly():
    model = two_adapters()
    model.add_weighted_adapter(["b"], [-0.5], "scaled", combination_type="svd", svd_rank=1)  # linear: exact
    for name, layer in lora_layers(model).items():
        assert layer.r["scaled"] == 3
        torch.testing.assert_close(layer.delta_weight("scaled"), -0.5 * layer.delta_weight("b"), atol=1e-6, rtol=0)


def test_linear_mixes_factors():
    model = two_adapters(r=2)
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="linear")
    layer = model.base_model.model.blocks[1]["fc2"]
    c = [w * layer.scaling[a] for a, w in zip(["default", "b"], WEIGHTS)]  # c_1 > 0 > c_2
    A = c[0] ** 0.5 * layer.lora_A["default"].weight - (-c[1]) ** 0.5 * layer.lora_A["b"].weight
    B = c[0] ** 0.5 * layer.lora_B["default"].weight + (-c[1]) ** 0.5 * layer.lora_B["b"].weight
    torch.testing.assert_close(layer.delta_weight("mix"), B @ A, atol=1e-6, rtol=0)


def test_sources_on_different_layers():
    """Ranks differ by layer (rank_pattern) and sources cover different layers: "cat" pads,
    layers with one source get its update alone, and the config names exactly those layers."""
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, target_modules=["fc1"], layers_to_transform=[0],
                                                        layers_pattern="blocks"))
    model.add_adapter("b", LoraConfig(r=3, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 1},
                                      layers_to_transform=[1], layers_pattern="blocks"))
    randomize_adapters(model)
    model.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert config.target_modules == ["blocks.0.fc1", "blocks.1.fc1", "blocks.1.fc2"]
    assert config.layers_to_transform is None and config.r == 5 and config.rank_pattern == {}
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("mix"), weighted_sum(layer, ["default", "b"], WEIGHTS),
                                   atol=1e-6, rtol=0, msg=name)


def test_new_adapter_is_inactive_frozen_and_keeps_the_trained_head():
    config = dict(r=2, target_modules=["fc1"], modules_to_save=["head"])
    model = get_peft_model(TinyNet().eval(), LoraConfig(**config))
    model.add_adapter("b", LoraConfig(**config))
    randomize_adapters(model)
    expected = model(input_ids=input_ids())
    # peft would give the new adapter an untrained copy of the original head; this one keeps default's.
    model.add_weighted_adapter(["default"], [1.0], "scaled")
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".scaled" in n)
    torch.testing.assert_close(model(input_ids=input_ids()), expected)
    model.set_adapter("scaled")
    torch.testing.assert_close(model(input_ids=input_ids()), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="each train their own copy of 'head'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "both", combination_type="cat")


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((["default", "nope"], [1, 1], "x"), {}, ValueError, r"unknown adapter\(s\) \['nope'\]"),
        ((["default", "b"], [1, 1], "b"), {}, ValueError, "adapter 'b' already exists"),
        ((["default", "b"], [1], "x"), {}, ValueError, "one weight per adapter"),
        ((["default", "b"], [1, 1], "x"), dict(combination_type="dare", density=0.5), ValueError,
         r"'dare' is not supported; it is one of \['svd', 'linear', 'cat', 'ties', 'ties_svd', 'dare_linear', "),
        ((["default", "b"], [1, 1], "x"), dict(combination_type="linear"), ValueError,
         r"'linear' needs adapters of one rank, got \{'default': 2, 'b': 3\}"),
        ((["default", "b"], [1, 1], "x"), dict(svd_rank=0), ValueError, "svd_rank must be a positive integer"),
        ((["default", "ia3"], [1, 1], "x"), {}, TypeError, r"each kind only with its own; \{'ia3': 'IA3'\} are not LoRA"),
        ((["default", "dora"], [1, 1], "x"), dict(combination_type="cat"), ValueError, r"DoRA adapters \['dora'\]"),
        ((["default", "b"], [1, float("nan")], "x"), {}, ValueError, r"weights must be finite numbers.*\[nan\]"),
        ((["default", "b"], [1, "2"], "x"), {}, ValueError, r"weights must be finite numbers.*\['2'\]"),
        ((["default", "b"], [1, 1], "x"), dict(svd_clamp=0), ValueError, r"svd_clamp .* in \(0, 1\].*got 0"),
        ((["default", "b"], [1, 1], "x"), dict(svd_clamp=1.5), ValueError, r"svd_clamp .* in \(0, 1\].*got 1.5"),
        ((["default", "b"], [1, 1], "x"), dict(svd_clamp=float("nan")), ValueError, "svd_clamp .* got nan"),
        (("default", [1], "x"), {}, TypeError, "adapters is a list of names"),
    ],
)
def test_errors_leave_the_model_unchanged(args, kwargs, error, match):
    model = two_adapters()
    model.add_adapter("ia3", IA3Config(target_modules=["fc2"], feedforward_modules=[]))
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert list(model.peft_config) == ["default", "b", "ia3", "dora"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_plain_modules_work_too():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert isinstance(model, PeftModel) and model.peft_config["mix"].target_modules == ["0", "2"]

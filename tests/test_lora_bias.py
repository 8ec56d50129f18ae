"""LoRA with ``lora_bias=True`` (a trainable bias b_B on B) against peft on the same weights.

The update is ``s * (B A x + b_B)``; merging adds ``s * b_B`` to the base bias. Every test
gives b_B nonzero values (``randomize_adapters`` draws all ``lora_`` tensors), so a bias left
out of the forward, the merge, the gradient or the checkpoint changes a number it compares.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import minipeft
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model
from tests.test_lora_peft_parity import assert_same_behaviour, build_pair

peft = pytest.importorskip("peft")

# Every layer type of TinyNet that takes lora_bias: nn.Linear (fc1, fc2, head), nn.Conv1d, nn.Conv2d.
TINY_TARGETS = ["fc1", "fc2", "conv1d", "conv2d", "head"]
# peft 0.21.2's save_pretrained takes the 1-D lora_B.bias for an unsharded ZeRO-3 tensor and warns.
PEFT_SAVE_WARNING = "ignore:Adapter .* LoRA tensor\\(s\\) have invalid shape"


def tiny_base() -> TinyNet:
    torch.manual_seed(0)  # the same base weights on every call: checkpoints are loaded onto a new one
    return TinyNet().eval()


def tiny_pair(**config):
    return build_pair(tiny_base(), target_modules=TINY_TARGETS, lora_bias=True, r=2, lora_alpha=6, **config)


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, minipeft.tuners.lora.LoraLayer)}


# -- forward and gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_and_conv_layers_match_peft(use_rslora):
    peft_model, mini_model = tiny_pair(use_rslora=use_rslora)
    biases = {n: p for n, p in mini_model.named_parameters() if n.endswith("lora_B.default.bias")}
    assert len(biases) == 7 and all(p.abs().min() > 0 for p in biases.values())  # one per target, nonzero
    # Trainable counts, printed line, logits and every gradient (the biases' included) equal peft's.
    assert_same_behaviour(peft_model, mini_model, input_ids())


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")  # Llama's projections have no bias: merging warns
@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn", "c_proj"]), ("llama", ["q_proj", "v_proj"])])
def test_transformers_models_match_peft(arch, targets):
    """GPT-2's Conv1D (weight stored (in, out), bias (out,)) and Llama's bias-less projections."""
    peft_model, mini_model = build_pair(
        tiny_transformers_model(arch), task_type="CAUSAL_LM", target_modules=targets, r=4, lora_alpha=8,
        lora_bias=True,
    )
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_dropout_in_training_matches_peft_with_the_same_random_stream():
    peft_model, mini_model = tiny_pair(lora_dropout=0.4)
    peft_model.train(), mini_model.train()
    torch.manual_seed(3)
    expected = peft_model(input_ids=input_ids())
    torch.manual_seed(3)
    torch.testing.assert_close(mini_model(input_ids=input_ids()), expected, atol=1e-6, rtol=0)


def test_the_bias_term_is_s_times_b_on_every_row():
    """y = W x + b + s (B A x + b_B), spelled out on one layer; 2-D and 3-D inputs, with and without autograd
    (the layer adds the term in place where it can, out of place under autograd)."""
    torch.manual_seed(0)
    model = minipeft.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)), minipeft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], lora_bias=True)
    )
    randomize_adapters(model)
    layer = model.base_model.model[0]
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, b_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    for x in (torch.randn(4, 6), torch.randn(2, 3, 6)):
        expected = x @ W.T + b + 1.5 * (x @ A.T @ B.T + b_B)
        torch.testing.assert_close(layer(x), expected)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


def test_half_precision_base_with_fp32_adapter():
    """bf16 base, fp32 adapter (as placed by minipeft): the bias is cast with B, and merging adds s * b_B
    to the bf16 bias."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_bias=True))
    randomize_adapters(model)
    layer = model.base_model.model[0]
    assert layer.lora_B["default"].bias.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    W, b = layer.base_layer.weight.float(), layer.base_layer.bias.float()
    A, B, b_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    expected = x.float() @ W.T + b + 2 * (x.float() @ A.T @ B.T + b_B)
    out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    bias_before = layer.base_layer.bias.clone()
    model.merge_adapter()
    assert layer.base_layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(layer.base_layer.bias, (bias_before.float() + 2 * b_B).to(torch.bfloat16))


def test_under_autocast():
    """Autocast gives a bf16 base output for an fp32 input: the branch that leaves the matmul dtype to autocast."""
    torch.manual_seed(0)
    model = minipeft.get_peft_model(
        nn.Sequential(nn.Linear(8, 6)), minipeft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_bias=True)
    )
    randomize_adapters(model)
    layer, x = model.base_model.model[0], torch.randn(3, 8)
    A, B, b_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias
    expected = layer.base_layer(x) + 2 * (x @ A.T @ B.T + b_B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    (b_B_grad,) = torch.autograd.grad(out.float().sum(), b_B)
    torch.testing.assert_close(b_B_grad, torch.full_like(b_B, 2.0 * 3))  # s * (rows), d/d b_B of the sum


# -- initialisation and what trains ----------------------------------------------------------------
def test_bias_starts_at_zero_and_trains_with_a_and_b_only():
    model = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=2, target_modules=TINY_TARGETS, lora_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    suffixes = ("lora_A.default.weight", "lora_B.default.weight", "lora_B.default.bias")
    assert len(lora_layers(model)) == 7
    assert trainable == {f"{layer}.{suffix}" for layer in lora_layers(model) for suffix in suffixes}
    for name, layer in lora_layers(model).items():
        out_features = layer.get_base_layer().weight.shape[0]
        assert layer.lora_B["default"].bias.shape == (out_features,), name
        assert not layer.lora_B["default"].bias.any(), name  # zero, like B: the model starts as the base
    with model.disable_adapter():
        base_out = model(input_ids())
    torch.testing.assert_close(model(input_ids()), base_out)


def test_init_false_leaves_the_bias_random_as_peft_does():
    torch.manual_seed(0)
    model = minipeft.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)),
        minipeft.LoraConfig(r=4, target_modules=["0"], lora_bias=True, init_lora_weights=False),
    )
    b_B = model.base_model.model[0].lora_B["default"].bias
    # nn.Linear's own bias init, U(-1/sqrt(r), 1/sqrt(r)), as peft leaves it.
    assert b_B.abs().min() > 0 and b_B.abs().max() <= 0.5


def test_a_second_adapter_without_bias_has_none():
    model = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=2, target_modules=["fc1"], lora_bias=True))
    model.add_adapter("plain", minipeft.LoraConfig(r=2, target_modules=["fc1"]))
    layer = model.base_model.model.blocks[0]["fc1"]
    assert layer.lora_B["default"].bias is not None and layer.lora_B["plain"].bias is None


# -- merging ------------------------------------------------------------------------------------------
def test_merge_unmerge_roundtrip():
    _, model = tiny_pair()
    ids = input_ids()
    expected = model(input_ids=ids).detach()
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    layer = model.base_model.model.head
    b_B, s = layer.lora_B["default"].bias.detach().clone(), layer.scaling["default"]

    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, before["base_model.model.head.base_layer.bias"] + s * b_B)
    torch.testing.assert_close(model(input_ids=ids), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(model(input_ids=ids), expected, atol=1e-5, rtol=0)


def test_safe_merge_checks_the_bias_too():
    _, model = tiny_pair()
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        model.base_model.model.head.lora_B["default"].bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"merging adapter 'default' into 'head' gives non-finite weights"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # nothing written


@pytest.mark.parametrize("arch", ["tiny", "gpt2"])
def test_merge_and_unload_matches_peft(arch):
    if arch == "tiny":
        peft_model, mini_model = tiny_pair()
    else:
        peft_model, mini_model = build_pair(
            tiny_transformers_model("gpt2"), target_modules=["c_attn", "c_proj"], r=4, lora_bias=True
        )
    ids = input_ids()
    expected = mini_model(input_ids=ids)
    expected = expected.logits if hasattr(expected, "logits") else expected
    mini_merged, peft_merged = mini_model.merge_and_unload(), peft_model.merge_and_unload()
    assert mini_merged.state_dict().keys() == peft_merged.state_dict().keys()
    for key, value in peft_merged.state_dict().items():
        torch.testing.assert_close(mini_merged.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    out = mini_merged(input_ids=ids)
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out, expected, atol=1e-5, rtol=0)


def test_merge_refused_where_the_base_has_no_bias():
    base = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.warns(UserWarning, match=r"lora_bias=True on '0', a Linear without bias: .* cannot be merged"):
        model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    randomize_adapters(model)
    x = torch.randn(2, 4)
    expected, weight = model(x), model.base_model.model[0].base_layer.weight.clone()
    message = r"cannot merge adapter 'default' into '0', so nothing was merged: it trains a bias on lora_B " \
              r"\(lora_bias=True\), but this Linear has no bias"
    for merge in (model.merge_adapter, lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=message):
            merge()
        assert not model.base_model.model[0].merged
        assert torch.equal(model.base_model.model[0].base_layer.weight, weight)
    torch.testing.assert_close(model(x), expected)  # still adapted, unmerged


@pytest.mark.filterwarnings("ignore:lora_bias=True on")
def test_a_merge_that_cannot_finish_does_not_start():
    # Layer "0" could take the adapter, layer "1" cannot: without safe_merge too, merging must
    # refuse before "0" is written, or the model would be half merged.
    base = nn.Sequential(nn.Linear(4, 4, bias=True), nn.Linear(4, 4, bias=False))
    model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True))
    randomize_adapters(model)
    x = torch.randn(2, 4)
    expected, before = model(x), {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge adapter 'default' into '1', so nothing was merged"):
            merge()
        state = model.get_base_model().state_dict()
        assert all(torch.equal(state[k], v) for k, v in before.items())
        assert not any(layer.merged for layer in (model.base_model.model[0], model.base_model.model[1]))
    torch.testing.assert_close(model(x), expected)


# -- checkpoints, both ways -----------------------------------------------------------------------
@pytest.mark.filterwarnings(PEFT_SAVE_WARNING)
def test_checkpoints_load_both_ways(tmp_path):
    peft_model, mini_model = tiny_pair()
    ids = input_ids()
    expected = mini_model(input_ids=ids)

    mini_model.save_pretrained(tmp_path / "mini")
    tensors = safetensors.torch.load_file(tmp_path / "mini" / "adapter_model.safetensors")
    assert "base_model.model.head.lora_B.bias" in tensors  # peft's key: adapter name removed
    assert "base_model.model.conv2d.lora_B.bias" in tensors
    assert json.loads((tmp_path / "mini" / "adapter_config.json").read_text())["lora_bias"] is True
    in_peft = peft.PeftModel.from_pretrained(tiny_base(), tmp_path / "mini")
    assert in_peft.peft_config["default"].lora_bias is True
    torch.testing.assert_close(in_peft(input_ids=ids), expected, atol=1e-6, rtol=0)

    # peft -> minipeft: biases redrawn in peft, so only a correct load reproduces peft's output.
    randomize_adapters(peft_model, seed=7)
    peft_model.save_pretrained(tmp_path / "peft")
    assert safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").keys() == tensors.keys()
    in_mini = minipeft.PeftModel.from_pretrained(tiny_base(), tmp_path / "peft")
    assert in_mini.peft_config["default"].lora_bias is True
    torch.testing.assert_close(in_mini(input_ids=ids), peft_model(input_ids=ids), atol=1e-6, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,message",
    [
        (dict(use_dora=True), r"lora_bias=True does not combine with use_dora=True .* Set use_dora=False"),
        (dict(init_lora_weights="gaussian"), r"lora_bias=True works with init_lora_weights=True .* got 'gaussian'"),
        (dict(init_lora_weights="pissa"), r"lora_bias=True works with init_lora_weights=True .* got 'pissa'"),
        (dict(init_lora_weights="olora"), r"lora_bias=True works with init_lora_weights=True .* got 'olora'"),
    ],
)
def test_config_refuses_what_peft_refuses(options, message):
    with pytest.raises(ValueError, match=message):
        minipeft.LoraConfig(target_modules=["fc1"], lora_bias=True, **options)
    with pytest.raises(ValueError):  # peft refuses the same config, so minipeft never saves one it cannot load
        peft.LoraConfig(target_modules=["fc1"], lora_bias=True, **options)


@pytest.mark.parametrize("value", ["lora_only", "all", 1, None])
def test_config_refuses_a_lora_bias_that_is_not_a_bool(value):
    with pytest.raises(ValueError, match=r"lora_bias must be True or False, .* use bias='all' or bias='lora_only'"):
        minipeft.LoraConfig(target_modules=["fc1"], lora_bias=value)


def test_embedding_is_refused_and_the_model_left_as_it_was():
    message = r"lora_bias=True on 'embed', an nn.Embedding: .* exclude_modules"
    model = TinyNet()
    with pytest.raises(ValueError, match=message):
        minipeft.get_peft_model(model, minipeft.LoraConfig(r=2, target_modules=["fc1", "embed"], lora_bias=True))
    assert not lora_layers(model)  # fc1 was not left wrapped
    with pytest.raises(ValueError, match=r"lora_bias=True is not supported for Embedding"):
        peft.get_peft_model(TinyNet(), peft.LoraConfig(r=2, target_modules=["embed"], lora_bias=True))
    # An embedding wrapped already (a LoRA adapter without bias on it) meets the same refusal.
    wrapped = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=2, target_modules=["embed"]))
    with pytest.raises(ValueError, match=message):
        wrapped.add_adapter("biased", minipeft.LoraConfig(r=2, target_modules=["embed"], lora_bias=True))
    assert list(wrapped.peft_config) == ["default"]
    assert lora_layers(wrapped)["base_model.model.embed"].adapter_names == ["default"]


def test_add_weighted_adapter_refuses_lora_bias_adapters():
    # One combination type: the refusal comes before the type is looked at.
    combination_type = "linear"
    peft_model, mini_model = tiny_pair()
    mini_model.add_adapter("plain", minipeft.LoraConfig(r=2, lora_alpha=6, target_modules=TINY_TARGETS))
    message = r"cannot combine adapters \['default'\] trained with lora_bias=True: .* merge_and_unload"
    with pytest.raises(ValueError, match=message):
        mini_model.add_weighted_adapter(["plain", "default"], [0.5, 1.0], "both", combination_type=combination_type)
    assert list(mini_model.peft_config) == ["default", "plain"]
    assert all("both" not in layer.adapter_names for layer in lora_layers(mini_model).values())
    # Why: peft's combination of one adapter (exact for the factors) keeps none of its bias.
    peft_model.add_weighted_adapter(["default"], [1.0], "copy", combination_type=combination_type)
    assert not peft_model.base_model.model.head.lora_B["copy"].bias.any()
    assert peft_model.base_model.model.head.lora_B["default"].bias.abs().min() > 0


def test_merging_several_lora_bias_adapters_adds_each_bias():
    """What the refusal above suggests instead: b + s_1 b_1 + s_2 b_2 in the merged model."""
    _, model = tiny_pair()
    model.add_adapter("second", minipeft.LoraConfig(r=3, lora_alpha=3, target_modules=TINY_TARGETS, lora_bias=True))
    randomize_adapters(model, seed=4)
    head = model.base_model.model.head
    expected = head.base_layer.bias + sum(head.scaling[a] * head.lora_B[a].bias for a in ("default", "second"))
    merged = model.merge_and_unload(adapter_names=["default", "second"])
    torch.testing.assert_close(merged.head.bias, expected.detach())


def test_no_warning_where_the_base_has_a_bias():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minipeft.get_peft_model(copy.deepcopy(TinyNet()), minipeft.LoraConfig(target_modules=TINY_TARGETS, lora_bias=True))

"""LoftQ (init_lora_weights="loftq"): the base weight quantized, A and B on what quantizing lost.

The references: the paper's alternation written out here with bitsandbytes' own quantization
(Li et al. 2023, Algorithm 1), the errors it must lower, and bitsandbytes' quantized layers,
which must hold the new base weight exactly. (peft's LoftQ needs a GPU, so it is no reference
on this machine; its config is.)"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import minipeft
from tests.models import TinyNet, input_ids

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def nf4(weight: torch.Tensor) -> torch.Tensor:
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state)


def by_hand(W: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, L R): Algorithm 1 of the paper, NF4."""
    low_rank = torch.zeros_like(W)
    for _ in range(iterations):
        Q = nf4(W - low_rank)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        low_rank = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    return Q, low_rank


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_the_base_and_the_factors_are_the_algorithm_s(iterations, use_rslora):
    torch.manual_seed(0)
    base = TinyNet()
    W = base.blocks[0]["fc1"].weight.detach().clone()  # (32, 16)
    config = minipeft.LoraConfig(r=4, lora_alpha=16, target_modules=["fc1"], init_lora_weights="loftq",
                                 loftq_config=minipeft.LoftQConfig(loftq_bits=4, loftq_iter=iterations),
                                 use_rslora=use_rslora)
    model = minipeft.get_peft_model(base, config)
    layer = model.base_model.model.blocks[0]["fc1"]
    Q, low_rank = by_hand(W, 4, iterations)
    assert torch.equal(layer.base_layer.weight, Q)
    s = 16 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling["default"] == s
    torch.testing.assert_close(s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight, low_rank,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_starts_closer_to_the_weights_than_quantizing_alone(bits):
    torch.manual_seed(0)
    W = torch.randn(64, 128) / 10
    model = minipeft.get_peft_model(nn.Sequential(nn.Linear(128, 64)), minipeft.LoraConfig(
        r=8, target_modules=["0"], init_lora_weights="loftq", loftq_config=minipeft.LoftQConfig(loftq_bits=bits)))
    with torch.no_grad():
        errors = {}
        for iterations in (1, 5):
            layer = copy.deepcopy(model.base_model.model[0])
            layer.base_layer.weight.copy_(W)
            layer.init_from_base_weight("default", "loftq", minipeft.LoftQConfig(bits, iterations))
            errors[iterations] = (W - layer.base_layer.weight - layer.delta_weight("default")).norm()
        quantized_alone = (W - minipeft.tuners.quantized.round_trip(W, bits)).norm()
    assert errors[1] < 0.95 * quantized_alone  # the low-rank part takes back some of the loss
    assert errors[5] <= errors[1] * 1.001  # (more alternations do not lose)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_holds_the_new_base_weight_exactly(bits):
    # The point of LoftQ: the model saved after it and loaded in `bits` bits computes with Q itself.
    torch.manual_seed(0)
    model = minipeft.get_peft_model(nn.Sequential(nn.Linear(128, 64)), minipeft.LoraConfig(
        r=8, target_modules=["0"], init_lora_weights="loftq", loftq_config=minipeft.LoftQConfig(loftq_bits=bits)))
    Q = model.base_model.model[0].base_layer.weight.detach()
    if bits == 4:
        layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=False)
    else:
        layer = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
    layer.load_state_dict({"weight": Q.clone(), "bias": torch.zeros(64)})
    layer = layer.to("cpu")  # (quantizes)
    assert torch.equal(minipeft.tuners.quantized.dequantized_weight(layer).float(), Q)


def test_a_saved_loftq_adapter_loads_onto_the_original_model(tmp_path):
    # As for PiSSA: loading on the full-precision base runs LoftQ again (it is deterministic),
    # then the trained factors replace the initial ones. peft reads the config.
    torch.manual_seed(0)
    base = TinyNet()
    config = minipeft.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights="loftq",
                                 loftq_config=minipeft.LoftQConfig(loftq_iter=2))
    model = minipeft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # "trained"
    model.save_pretrained(tmp_path)
    loaded = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids()), model(input_ids()))
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.init_lora_weights == "loftq" and theirs.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


def test_what_loftq_cannot_do_is_refused(tmp_path):
    for options, error, message in [
        (dict(loftq_bits=3), ValueError, r"loftq_bits is 4 \(NF4\) or 8 \(int8\)"),
        (dict(loftq_iter=0), ValueError, "loftq_iter is a number of alternations"),
    ]:
        with pytest.raises(error, match=message):
            minipeft.LoftQConfig(**options)
    with pytest.raises(ValueError, match=r"LoftQ is for nn.Linear layers"):
        minipeft.get_peft_model(_gpt2(), minipeft.LoraConfig(
            r=4, target_modules=["c_attn"], init_lora_weights="loftq"))
    with pytest.raises(ValueError, match=r"has at most 16; r=20 is more"):
        minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=20, target_modules=["fc1"], init_lora_weights="loftq"))
    with pytest.warns(UserWarning, match="loftq_config is used by init_lora_weights='loftq' only"):
        minipeft.LoraConfig(loftq_config=minipeft.LoftQConfig())
    assert minipeft.LoraConfig(loftq_config={}).loftq_config is None  # (peft's default, as its configs write it)
    model = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights="loftq"))
    model.save_pretrained(tmp_path / "initial")
    with pytest.raises(ValueError, match="a LoftQ adapter's base holds the quantized weight"):
        model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")


def _gpt2():
    from tests.models import tiny_transformers_model

    return tiny_transformers_model("gpt2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_is_quantized_from_its_own_dtype(dtype):
    # Q's blocks take their maxima in the weight's dtype, so a bitsandbytes layer of that dtype holds Q exactly.
    torch.manual_seed(0)
    model = minipeft.get_peft_model(nn.Sequential(nn.Linear(128, 64)).to(dtype), minipeft.LoraConfig(
        r=8, target_modules=["0"], init_lora_weights="loftq"))
    Q = model.base_model.model[0].base_layer.weight.detach()
    assert Q.dtype == dtype
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=False, compute_dtype=dtype).to(dtype)
    layer.load_state_dict({"weight": Q.clone(), "bias": torch.zeros(64, dtype=dtype)})
    assert torch.equal(minipeft.tuners.quantized.dequantized_weight(layer.to("cpu")), Q)  # (quantized as it moves)


@torch.no_grad()
def test_a_loftq_adapter_loads_onto_its_base_saved_and_loaded_quantized(tmp_path):
    # LoftQ's workflow: save the base after LoftQ, load it in 4 bits, load the adapter onto it.
    torch.manual_seed(0)
    model = minipeft.get_peft_model(nn.Sequential(nn.Linear(128, 64)), minipeft.LoraConfig(
        r=8, target_modules=["0"], init_lora_weights="loftq", loftq_config=minipeft.LoftQConfig(loftq_iter=3)))
    model.save_pretrained(tmp_path)
    Q, bias = model.base_model.model[0].base_layer.weight, model.base_model.model[0].base_layer.bias
    quantized = nn.Sequential(bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=False))
    quantized[0].load_state_dict({"weight": Q.clone(), "bias": bias.clone()})
    loaded = minipeft.PeftModel.from_pretrained(quantized.to("cpu"), tmp_path).train()  # (the CPU kernels' fp32 path)
    x = torch.randn(5, 128)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_more_that_loftq_refuses_or_leaves_alone():
    with pytest.raises(TypeError, match=r"whose weight is torch.float64: bitsandbytes quantizes float32, float16"):
        minipeft.get_peft_model(nn.Sequential(nn.Linear(128, 64)).double(), minipeft.LoraConfig(
            r=8, target_modules=["0"], init_lora_weights="loftq"))
    with pytest.raises(ValueError, match="that is peft's LoftQConfig: give minipeft's, or a dict of its fields"):
        minipeft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig())
    assert minipeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}).loftq_config.loftq_bits == 8
    torch.manual_seed(0)
    model = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights="loftq"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a combined adapter is plain LoRA: no loftq_config beside init True)
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="svd")
    assert model.peft_config["combined"].loftq_config is None


# -- replace_lora_weights_loftq: LoftQ for a model loaded quantized --------------------------------

class TwoLayers(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def original_and_quantized(folder, bits: int, shards: bool = False):
    """The full-precision model, saved to ``folder`` as model.safetensors (or two shards and an
    index), and the same model loaded in ``bits`` bits."""
    import safetensors.torch

    torch.manual_seed(0)
    original = TwoLayers(nn.Linear(64, 128), nn.Linear(128, 32))
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    folder.mkdir(exist_ok=True)
    if shards:
        first = {k: v for k, v in state.items() if k.startswith("fc1")}
        safetensors.torch.save_file(first, folder / "a.safetensors")
        safetensors.torch.save_file({k: v for k, v in state.items() if k not in first}, folder / "b.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            '{"weight_map": {%s}}' % ", ".join(f'"{k}": "{"a" if k in first else "b"}.safetensors"' for k in state))
    else:
        safetensors.torch.save_file(state, folder / "model.safetensors")
    make = (lambda i, o: bnb.nn.Linear4bit(i, o, quant_type="nf4", compute_dtype=torch.float32)) if bits == 4 else \
        (lambda i, o: bnb.nn.Linear8bitLt(i, o, has_fp16_weights=False))
    quantized = TwoLayers(make(64, 128), make(128, 32))
    quantized.load_state_dict(original.state_dict())
    return original, quantized.to("cpu")


@pytest.mark.parametrize("bits, shards", [(4, False), (8, False), (4, True)])
@torch.no_grad()
def test_replace_lora_weights_loftq_fits_what_quantizing_lost(tmp_path, bits, shards):
    original, quantized = original_and_quantized(tmp_path, bits, shards)
    model = minipeft.get_peft_model(quantized, minipeft.LoraConfig(r=8, lora_alpha=4, target_modules=["fc1", "fc2"]))
    x = torch.randn(16, 64)
    qlora_error = (model(x) - original(x)).norm()
    minipeft.replace_lora_weights_loftq(model, tmp_path)
    for name in ("fc1", "fc2"):
        layer = getattr(model.base_model.model, name)
        lost = getattr(original, name).weight - minipeft.tuners.quantized.dequantized_weight(layer.base_layer).float()
        U, S, Vh = torch.linalg.svd(lost, full_matrices=False)  # by hand: s B A = SVD_8(W - Q)
        torch.testing.assert_close(layer.delta_weight("default"), U[:, :8] @ torch.diag(S[:8]) @ Vh[:8],
                                   rtol=1e-4, atol=1e-6)
    assert (model(x) - original(x)).norm() < 0.9 * qlora_error  # closer to the full-precision model


@torch.no_grad()
def test_a_callback_keeps_or_rolls_back_each_layer(tmp_path):
    _, quantized = original_and_quantized(tmp_path, 4)
    model = minipeft.get_peft_model(quantized, minipeft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    fc2_before = [t.clone() for t in model.base_model.model.fc2.lora_factors("default")]
    seen = []
    minipeft.replace_lora_weights_loftq(model, tmp_path / "model.safetensors",
                                        callback=lambda m, name: seen.append(name) or name == "fc1")
    assert seen == ["fc1", "fc2"]
    assert model.base_model.model.fc1.lora_B["default"].weight.abs().sum() > 0  # kept
    assert all(torch.equal(a, b) for a, b in zip(model.base_model.model.fc2.lora_factors("default"), fc2_before))


def test_replace_lora_weights_loftq_refuses_what_it_cannot_do(tmp_path):
    _, quantized = original_and_quantized(tmp_path, 4)
    plain = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="no LoRA layer of adapter 'default' sits on a bitsandbytes 4-bit or 8-bit layer"):
        minipeft.replace_lora_weights_loftq(plain, tmp_path)
    model = minipeft.get_peft_model(quantized, minipeft.LoraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="needs model_path"):
        minipeft.replace_lora_weights_loftq(model)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        minipeft.replace_lora_weights_loftq(model, tmp_path / "elsewhere")
    (tmp_path / "model.safetensors").unlink()
    import safetensors.torch

    safetensors.torch.save_file({"other.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"'fc1.weight' is not in the safetensors files .* hold e.g. \['other.weight'\]"):
        minipeft.replace_lora_weights_loftq(model, tmp_path)

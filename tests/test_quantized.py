"""QLoRA: LoRA and (IA)^3 on bitsandbytes' 4-bit and 8-bit linear layers (on the CPU, which
bitsandbytes supports). The reference is peft on the same quantized model: the same outputs and
gradients, the same merged (re-quantized) weights, and checkpoints that load both ways."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minipeft
from tests.models import randomize_adapters

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*quantization grid", "ignore:Merge .* may get different",
                                        "ignore:Unmerge .* may get different",
                                        "ignore:.*invalid shape")  # (peft takes lora_B's bias for a sharded tensor)


class QuantizedNet(nn.Module):
    """Two linear layers stored in ``bits`` bits, as transformers loads a model with a
    BitsAndBytesConfig (which also sets the is_loaded_in_* flags peft reads)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        plain = [nn.Linear(64, 128), nn.Linear(128, 32)]  # (bitsandbytes' CPU kernels want whole blocks of 64)
        if bits == 4:
            layers = [bnb.nn.Linear4bit(p.in_features, p.out_features, quant_type="nf4", compute_dtype=torch.float32)
                      for p in plain]
        else:
            layers = [bnb.nn.Linear8bitLt(p.in_features, p.out_features, has_fp16_weights=False) for p in plain]
        for layer, p in zip(layers, plain):
            layer.load_state_dict(p.state_dict())
        self.fc1, self.fc2 = (layer.to("cpu") for layer in layers)  # (moving quantizes)
        self.is_loaded_in_4bit, self.is_loaded_in_8bit = bits == 4, bits == 8

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def pair(bits: int, config_class: str, **config):
    """(peft's, ours): the same adapter on copies of one quantized model, ours loaded from peft's."""
    base = QuantizedNet(bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (bitsandbytes on the CPU notes its slower kernels)
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_class)(**config))
        ours = minipeft.get_peft_model(copy.deepcopy(base), getattr(minipeft, config_class)(**config))
    minipeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours


CASES = [
    ("LoraConfig", dict(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False)),
    ("LoraConfig", dict(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False, use_dora=True)),
    ("LoraConfig", dict(r=4, target_modules=["fc1", "fc2"], init_lora_weights=False, lora_bias=True)),
    ("IA3Config", dict(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"], init_ia3_weights=False)),
]


def dequantized(layer) -> torch.Tensor:
    return minipeft.tuners.quantized.dequantized_weight(layer)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("config_class, config", CASES, ids=["lora", "dora", "lora_bias", "ia3"])
def test_outputs_and_gradients_are_peft_s(bits, config_class, config):
    theirs, ours = pair(bits, config_class, **config)
    x = torch.randn(5, 64)
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected)
    expected.pow(2).sum().backward()
    got.pow(2).sum().backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], msg=name)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_dora", [False, True])
@torch.no_grad()
def test_merging_re_quantizes_as_peft_does(bits, use_dora):
    theirs, ours = pair(bits, "LoraConfig", r=4, target_modules=["fc1", "fc2"], init_lora_weights=False,
                        use_dora=use_dora)
    x = torch.randn(5, 64)
    theirs.merge_adapter()
    with pytest.warns(UserWarning, match=f"a {bits}-bit weight rounds the result to its quantization grid"):
        ours.merge_adapter()
    assert type(ours.base_model.model.fc1.base_layer.weight).__name__ == ("Params4bit" if bits == 4 else "Int8Params")
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.unmerge_adapter()
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(x), theirs(x))
    unloaded = ours.merge_and_unload()
    assert type(unloaded.fc1) is type(QuantizedNet(bits).fc1)  # the quantized layer itself, merged
    torch.testing.assert_close(unloaded(x), theirs.merge_and_unload()(x))


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_a_zero_update_merges_to_the_same_quantized_weight(bits):
    # Quantizing a dequantized weight gives its codes back (each block's or row's largest entry
    # is its scale), so merging and unmerging a zero update must leave the stored codes as they
    # were. (Not the scales themselves under double quantization, compress_statistics, which
    # stores them quantized again: those drift a little with each merge, as in peft.)
    ours = minipeft.get_peft_model(QuantizedNet(bits), minipeft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    layer = ours.base_model.model.fc1.base_layer
    stored = layer.weight.data.clone()
    ours.merge_adapter()
    assert torch.equal(layer.weight.data, stored)
    ours.unmerge_adapter()
    assert torch.equal(layer.weight.data, stored)


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_merging_lora_bias_and_ia3_by_hand(bits):
    # lora_bias merges b + s b_B (peft 0.21's quantized layers add b_B unscaled), and (IA)^3's
    # merge, which peft's quantized layers do not implement, is deq(W) diag(l) re-quantized.
    lora = minipeft.get_peft_model(QuantizedNet(bits), minipeft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["fc1"], init_lora_weights=False, lora_bias=True))
    layer = lora.base_model.model.fc1
    b, b_B = layer.base_layer.bias.clone(), layer.lora_B["default"].bias.clone()
    lora.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, b + 3.0 * b_B)

    ia3 = minipeft.get_peft_model(QuantizedNet(bits), minipeft.IA3Config(
        target_modules=["fc2"], feedforward_modules=["fc2"], init_ia3_weights=False))
    layer = ia3.base_model.model.fc2
    scaled = dequantized(layer.base_layer) * layer.ia3_l["default"]  # (out, in) * (1, in)
    reference = copy.deepcopy(layer.base_layer)
    minipeft.tuners.quantized.set_quantized_weight(reference, scaled)
    ia3.merge_adapter()
    assert torch.equal(layer.base_layer.weight.data, reference.weight.data)


@torch.no_grad()  # (bitsandbytes' CPU kernels differ with and without an input that needs gradients, too)
def test_a_qlora_checkpoint_loads_both_ways(tmp_path):
    theirs, ours = pair(4, "LoraConfig", r=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    x = torch.randn(3, 64)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours.eval(), theirs.eval()  # (as loaded models are: the CPU kernels differ in eval mode)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(QuantizedNet(4), tmp_path / "ours")(x), ours(x))
    torch.testing.assert_close(minipeft.PeftModel.from_pretrained(QuantizedNet(4), tmp_path / "theirs")(x), theirs(x))


def test_what_a_quantized_weight_cannot_take_is_refused_before_anything_changes():
    model = QuantizedNet(4)
    with pytest.raises(TypeError, match=r"LOHA cannot adapt bitsandbytes' quantized layers, and the targets hold "
                                        r"'fc1' \(4-bit\), 'fc2' \(4-bit\)\. minipeft adapts them with LoRA"):
        minipeft.get_peft_model(model, minipeft.LoHaConfig(r=4, target_modules=["fc1", "fc2"]))
    with pytest.raises(TypeError, match=r"init_lora_weights='pissa' rewrites the base weight from the full-precision one, and 'fc1' is stored 4-bit"):
        minipeft.get_peft_model(model, minipeft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights="pissa"))
    assert type(model.fc1).__name__ == "Linear4bit"  # not wrapped


@pytest.mark.parametrize("bits, mode", [(4, "train"), (4, "eval"), (8, "train")])
@torch.no_grad()
def test_the_dequantized_weight_is_the_one_the_layer_computes_with(bits, mode):
    # What merging reads: x deq(W)^T + b must be the layer's own output. In eval mode the CPU
    # kernels repack a 4-bit weight at its first forward (absmax rounded to bf16), into a layout
    # dequantize_4bit does not read (peft 0.21 reads the repacked bytes as if they were not).
    layer = getattr(QuantizedNet(bits).fc1, mode)()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    layer(x)
    packed = getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
    assert packed == (mode == "eval")
    weight = minipeft.tuners.quantized.dequantized_weight(layer)
    assert weight.shape == (128, 64)
    # (8-bit: LLM.int8() rounds the input to int8 too, and the packed kernel computes in bf16)
    tolerance = dict(rtol=0, atol=0.02) if bits == 8 or packed else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x @ weight.float().T + layer.bias, layer(x), **tolerance)


@torch.no_grad()
def test_a_repacked_weight_reads_back_without_its_bias_in_half_precision():
    # The CPU kernels compute in bf16 here: a large bias added before it is taken off again
    # would round the weight read back to bf16 steps of the bias's size.
    layer = QuantizedNet(4).fc1
    layer.compute_dtype = torch.bfloat16
    layer.bias += 8.0
    unpacked = minipeft.tuners.quantized.dequantized_weight(layer).float()
    layer.eval()(torch.randn(2, 64))  # repacks
    assert layer.weight.quant_state.packing_format_for_cpu
    packed = minipeft.tuners.quantized.dequantized_weight(layer).float()
    torch.testing.assert_close(packed, unpacked, rtol=1e-2, atol=2e-3)  # (its scales are rounded to bf16)


@torch.no_grad()
def test_an_8bit_layer_with_float_weights_merges_as_a_float_layer():
    # has_fp16_weights=True keeps the weight in floats (quantized at each call): nothing to dequantize.
    torch.manual_seed(0)
    model = nn.Sequential(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True))
    model[0].load_state_dict(nn.Linear(64, 32).state_dict())
    ours = minipeft.get_peft_model(model, minipeft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 64)
    unmerged = ours(x)
    weight = ours.base_model.model[0].base_layer.weight.detach().clone()
    ours.merge_adapter()
    assert ours.base_model.model[0].base_layer.weight.dtype == torch.float32
    torch.testing.assert_close(ours.base_model.model[0].base_layer.weight, weight + ours.base_model.model[0].delta_weight("default"))
    torch.testing.assert_close(ours(x), unmerged, rtol=0, atol=0.05)  # (LLM.int8() rounds both to int8 at the call)


def test_other_bitsandbytes_layers_and_quantized_modules_to_save_are_refused():
    model = nn.ModuleDict({"embed": bnb.nn.Embedding4bit(100, 64).to("cpu"), "fc": QuantizedNet(4).fc1})
    with pytest.raises(TypeError, match=r"bitsandbytes layers minipeft does not adapt: 'embed' \(Embedding4bit\)"):
        minipeft.inject_adapter_in_model(minipeft.LoraConfig(r=4, target_modules=["embed", "fc"]), model)
    model = QuantizedNet(4)
    with pytest.raises(TypeError, match=r"modules_to_save selects 'fc2', whose \['weight'\] are stored quantized"):
        minipeft.get_peft_model(model, minipeft.LoraConfig(r=4, target_modules=["fc1"], modules_to_save=["fc2"]))
    assert type(model.fc1).__name__ == "Linear4bit" and type(model.fc2).__name__ == "Linear4bit"  # nothing changed


def test_parameter_counts_and_casts_see_4bit_weights_as_they_are():
    theirs, ours = pair(4, "LoraConfig", r=4, target_modules=["fc1", "fc2"])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()  # two weights per byte
    assert minipeft.get_model_status(ours).total_params == ours.get_nb_trainable_parameters()[1]
    # FSDP-QLoRA stores the 4-bit codes in a float dtype: no cast may touch them.
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    stored = layer.weight.data.clone()
    minipeft.cast_mixed_precision_params(layer, torch.float16)
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.data.view(torch.uint8), stored.view(torch.uint8))  # (the bytes: some read as NaN)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bottleneck_adapter_on_a_quantized_layer_is_the_one_on_its_dequantized_weight(bits):
    # A bottleneck adapter reads the layer's input and output alone: on a plain nn.Linear holding
    # deq(W) it must compute the same.
    quantized = QuantizedNet(bits)
    plain = nn.Sequential()
    plain.fc1, plain.fc2 = (nn.Linear(layer.in_features, layer.out_features) for layer in (quantized.fc1, quantized.fc2))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(plain, name).weight.copy_(dequantized(getattr(quantized, name)))
            getattr(plain, name).bias.copy_(getattr(quantized, name).bias)
    plain.forward = quantized.forward.__func__.__get__(plain)
    config = dict(target_modules=["fc1"], bottleneck_size=8)
    ours = minipeft.get_peft_model(quantized, minipeft.BottleneckConfig(**config))
    reference = minipeft.get_peft_model(plain, minipeft.BottleneckConfig(**config))
    for model in (ours, reference):
        randomize_adapters(model, seed=1, names=("adapter_",))  # (up starts at zero)
    x = torch.randn(5, 64)
    tolerance = dict(rtol=0, atol=0.05) if bits == 8 else {}  # (LLM.int8() rounds the input to int8 too)
    torch.testing.assert_close(ours(x), reference(x), **tolerance)
    with ours.disable_adapter():
        assert not torch.allclose(ours(x), reference(x), atol=0.05)  # (the adapters do change the output)

"""Bottleneck adapters: closed-form sizes, identity at init, hand-computed outputs for the
sequential and parallel forms, tuple outputs, the papers' presets on tiny BERT / LLaMA,
training, several adapters of different methods on one model, unload, and bad input."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft import BottleneckConfig, LoraConfig, get_peft_model  # noqa: E402
from minipeft.tuners.bottleneck import BottleneckLayer  # noqa: E402

from tests.models import first_output, fit, randomize_adapters, tiny_transformers_model  # noqa: E402
from tests.models import input_ids as ids  # noqa: E402


def tiny(kind: str) -> nn.Module:
    """The shared tiny models; BERT without a head, so module names start at "encoder."."""
    return tiny_transformers_model("bert_model" if kind == "bert" else kind)


def randomize_up(model: nn.Module, seed: int = 0) -> None:
    """``up`` starts at zero; give it values so that the adapter's term is visible."""
    randomize_adapters(model, seed, names=("adapter_up", "lora_B"), std=0.3)


class Net(nn.Module):
    """A hand-written model: two residual blocks of width 8."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(d, d), "proj": nn.Linear(d, 2 * d)}) for _ in range(2))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for block in self.blocks:
            x = x + block["fc"](x)
        return self.head(x)


def bottleneck(layer: BottleneckLayer, name: str, h: torch.Tensor, act=torch.relu, s: float = 1.0) -> torch.Tensor:
    """The adapter term written out: s * (act(h Wd^T + bd) Wu^T + bu)."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return s * (act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


# -- sizes and identity ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, b", [({"bottleneck_size": 3}, 3), ({"reduction_factor": 4}, 2)])
def test_parameter_count_is_2db_plus_b_plus_d(kwargs, b):
    d = 8
    model = get_peft_model(Net(d), BottleneckConfig(target_modules=["fc"], **kwargs))
    n_targets = 2
    assert model.get_nb_trainable_parameters()[0] == n_targets * (2 * d * b + b + d)
    layer = model.base_model.model.blocks[0]["fc"]
    assert layer.adapter_down["default"].weight.shape == (b, d) and layer.adapter_up["default"].weight.shape == (d, b)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_identity_at_init_and_hand_computed_forward(placement):
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(5, 8)
    config = BottleneckConfig(target_modules=["blocks.0.fc"], bottleneck_size=3, placement=placement,
                              non_linearity="gelu", scaling=2.0)
    model = get_peft_model(copy.deepcopy(base), config)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    randomize_up(model)
    layer = model.base_model.model.blocks[0]["fc"]
    h = base.blocks[0]["fc"](x)
    adapted = h + bottleneck(layer, "default", h if placement == "sequential" else x, nn.functional.gelu, 2.0)
    y = x + adapted
    y = y + base.blocks[1]["fc"](y)
    torch.testing.assert_close(model(x), base.head(y))


def test_parallel_on_a_linear_that_changes_width_uses_in_and_out_features():
    torch.manual_seed(0)
    base = Net()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["blocks.0.proj"], bottleneck_size=2,
                                                                 placement="parallel"))
    layer = model.base_model.model.blocks[0]["proj"]
    assert layer.adapter_down["default"].in_features == 8 and layer.adapter_up["default"].out_features == 16
    randomize_up(model)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), base.blocks[0]["proj"](x) + bottleneck(layer, "default", x))


@pytest.mark.parametrize("parallel_input", [0, "input"])
def test_parallel_input_by_position_or_first_argument_name_read_in_features(parallel_input):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16))
    config = BottleneckConfig(target_modules=["0"], bottleneck_size=2, placement="parallel", parallel_input=parallel_input)
    layer = get_peft_model(copy.deepcopy(base), config).base_model.model[0]
    assert layer.adapter_down["default"].in_features == 8 and layer.adapter_up["default"].out_features == 16
    randomize_up(layer)
    x = torch.randn(3, 8)
    expected = base[0](x) + bottleneck(layer, "default", x)
    torch.testing.assert_close(layer(x), expected)
    if parallel_input == "input":
        torch.testing.assert_close(layer(input=x), expected)


def test_tuple_outputs_adapt_the_first_element_and_pass_the_rest():
    class Attention(nn.Module):
        hidden_size = 8

        def __init__(self):
            super().__init__()
            self.o = nn.Linear(8, 8)

        def forward(self, h, mask=None):
            return self.o(h), "weights", mask

    torch.manual_seed(0)
    base = nn.Sequential()
    base.attn = Attention()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["attn"], bottleneck_size=2))
    randomize_up(model)
    layer = model.base_model.model.attn
    x, mask = torch.randn(2, 8), torch.ones(2)
    h, extra, m = layer(x, mask=mask)
    expected = base.attn.o(x)
    torch.testing.assert_close(h, expected + bottleneck(layer, "default", expected))
    assert extra == "weights" and m is mask


def test_tuple_returning_llama_attention_block():
    base = tiny("llama")
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["self_attn"], bottleneck_size=4))
    x = ids()
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=0)
    randomize_up(model)
    assert not torch.allclose(model(x).logits, base(x).logits)


# -- presets --------------------------------------------------------------------------------------
def adapted_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]


@pytest.mark.parametrize(
    "kind, preset, expected",
    [
        ("bert", "houlsby", ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]),
        ("bert", "pfeiffer", ["encoder.layer.0.output.dense"]),
        ("bert", "parallel", ["encoder.layer.0.output"]),
        ("llama", "houlsby", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]),
        ("llama", "pfeiffer", ["model.layers.0.mlp.down_proj"]),
        ("llama", "parallel", ["model.layers.0.mlp"]),
    ],
)
def test_presets_place_adapters_where_the_papers_did(kind, preset, expected):
    base = tiny(kind)
    config = BottleneckConfig.preset(preset, model_type=kind)
    model = get_peft_model(copy.deepcopy(base), config)
    names = adapted_names(model.base_model.model)
    assert [n for n in names if ".0." in n] == expected
    assert len(names) == 2 * len(expected)  # and the same in layer 1
    assert config.scaling == (4.0 if preset == "parallel" else 1.0)
    x = ids()
    torch.testing.assert_close(first_output(model(x)), first_output(base(x)), rtol=0, atol=0)
    randomize_up(model)
    assert not torch.allclose(first_output(model(x)), first_output(base(x)))
    # reduction factor 16 by default: d = 32 -> b = 2
    layer = model.base_model.model.get_submodule(expected[0])
    assert layer.adapter_down["default"].out_features == 2


def test_bert_parallel_preset_reads_the_feed_forward_input():
    base = tiny("bert")
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig.preset("parallel", model_type="bert", bottleneck_size=4))
    randomize_up(model)
    layer = model.base_model.model.encoder.layer[0].output
    intermediate, block_input = torch.randn(2, 3, 48), torch.randn(2, 3, 32)
    expected = base.encoder.layer[0].output(intermediate, block_input) + bottleneck(layer, "default", block_input, s=4.0)
    torch.testing.assert_close(layer(intermediate, block_input), expected)
    torch.testing.assert_close(layer(intermediate, input_tensor=block_input), expected)


# -- training -------------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = get_peft_model(Net(), BottleneckConfig(target_modules=["fc"], bottleneck_size=4))
    x = torch.randn(128, 8)
    y = torch.sin(x).sum(-1, keepdim=True)
    losses = fit(model, x, y, lr=1e-2, steps=40)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "adapter_" not in n)


# -- several adapters, several methods ------------------------------------------------------------
def test_lora_and_bottleneck_adapters_switch_by_name():
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(4, 8)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["fc"], r=2, lora_alpha=4), adapter_name="a")
    model.add_adapter("b", BottleneckConfig(target_modules=["fc"], bottleneck_size=3, placement="parallel", scaling=0.5))
    model.add_adapter("c", BottleneckConfig(target_modules=["blocks.1.fc"], bottleneck_size=2))
    randomize_up(model)
    inner = model.base_model.model

    def run(block_fc):
        y = x
        for i, block in enumerate(base.blocks):
            y = y + block_fc(i, y)
        return base.head(y)

    # "a": LoRA on both fc layers, y = W x + b + 2 * B A x
    def lora_fc(i, h):
        lora = inner.blocks[i]["fc"].base_layer  # bottleneck wraps the LoRA wrapper
        A, B = lora.lora_A["a"].weight, lora.lora_B["a"].weight
        return base.blocks[i]["fc"](h) + 2.0 * h @ A.T @ B.T

    assert model.active_adapter == "a"
    torch.testing.assert_close(model(x), run(lora_fc))

    # "b": parallel bottleneck on both fc layers, LoRA off
    model.set_adapter("b")
    torch.testing.assert_close(
        model(x), run(lambda i, h: base.blocks[i]["fc"](h) + bottleneck(inner.blocks[i]["fc"], "b", h, s=0.5))
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)

    # "c": sequential on the second block only
    model.set_adapter("c")

    def seq_fc(i, h):
        out = base.blocks[i]["fc"](h)
        return out + bottleneck(inner.blocks[1]["fc"], "c", out) if i == 1 else out

    torch.testing.assert_close(model(x), run(seq_fc))

    model.delete_adapter("b")
    assert not any("b" in m.adapter_down for m in inner.modules() if isinstance(m, BottleneckLayer))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))


def test_merge_and_unload_refuses_and_unload_restores_the_base():
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(3, 8)
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig(target_modules=["fc"], bottleneck_size=2))
    randomize_up(model)
    with pytest.raises(TypeError, match="cannot merge.*BottleneckLayer.*call unload"):
        model.merge_and_unload()
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), base(x), rtol=0, atol=0)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bottleneck_size": 4, "reduction_factor": 16}, "exactly one of bottleneck_size"),
        ({}, "exactly one of bottleneck_size"),
        ({"bottleneck_size": 0}, "bottleneck_size must be a positive integer"),
        ({"reduction_factor": 0.5}, "reduction_factor must be a number >= 1"),
        ({"bottleneck_size": 4, "non_linearity": "tanh"}, r"non_linearity='tanh' is not supported; use one of \['gelu', 'relu', 'silu'\]"),
        ({"bottleneck_size": 4, "placement": "before"}, "placement must be one of"),
        ({"bottleneck_size": 4, "adapter_dropout": 1.0}, r"adapter_dropout is a probability in \[0, 1\)"),
        # LoRA's rule: was silently ignored, every layer adapted
        ({"bottleneck_size": 4, "layers_pattern": "layers"}, "layers_pattern only says where layer numbers are"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(target_modules=["fc"], **kwargs)


def test_preset_errors():
    with pytest.raises(ValueError, match="no bottleneck presets for model_type='t5'"):
        BottleneckConfig.preset("houlsby", model_type="t5")
    with pytest.raises(ValueError, match="unknown preset 'lora'"):
        BottleneckConfig.preset("lora", model_type="bert")


def test_convolutions_are_refused_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(TypeError, match="'0': it is a Conv2d, whose output is channels-first"):
        get_peft_model(model, BottleneckConfig(target_modules=["0"], bottleneck_size=2, hidden_size=8))


def test_adapter_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(Net(), BottleneckConfig(target_modules=["fc"], bottleneck_size=4, adapter_dropout=0.5))
    randomize_up(model)
    x = torch.randn(16, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_width_that_cannot_be_inferred_asks_for_hidden_size():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"cannot infer the output width of '1' \(ReLU\).*hidden_size="):
        get_peft_model(copy.deepcopy(model), BottleneckConfig(target_modules=["1"], bottleneck_size=2))
    peft_model = get_peft_model(model, BottleneckConfig(target_modules=["1"], bottleneck_size=2, hidden_size=4))
    assert peft_model(torch.randn(2, 4)).shape == (2, 4)
    assert isinstance(model[0], nn.Linear)  # the failed attempt left nothing behind


def test_unsupported_placements_and_widths_are_explained():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.GELU())
    with pytest.raises(TypeError, match="parallel adapter reads the module's input, but '0' is an nn.Embedding"):
        get_peft_model(copy.deepcopy(model), BottleneckConfig(target_modules=["0"], bottleneck_size=2, placement="parallel"))
    # A width-changing module that is not a linear layer breaks the parallel d -> d rule.
    peft_model = get_peft_model(
        model, BottleneckConfig(target_modules=["2"], bottleneck_size=2, placement="parallel", hidden_size=4)
    )
    with pytest.raises(ValueError, match="expects width 4 at the module input, got 6.*mapping width d to d"):
        peft_model(torch.tensor([[1, 2]]))
    wrong = get_peft_model(nn.Sequential(nn.Linear(4, 6), nn.GELU()),
                           BottleneckConfig(target_modules=["1"], bottleneck_size=2, hidden_size=4))
    with pytest.raises(ValueError, match="expects width 4 at the module output, got 6; set BottleneckConfig"):
        wrong(torch.randn(2, 4))


def test_adapters_follow_buffers_and_a_weightless_module_on_another_device_is_explained():
    class Scale(nn.Module):  # no parameters, one float64 buffer
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.full((4,), 2.0, dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    layer = get_peft_model(nn.Sequential(Scale()), BottleneckConfig(target_modules=["0"], bottleneck_size=2,
                                                                    hidden_size=4)).base_model.model[0]
    assert layer.adapter_down["default"].weight.dtype == torch.float64
    # A module with nothing to place adapters by gets CPU ones; an input elsewhere is a clear error.
    model = get_peft_model(nn.Sequential(nn.ReLU()), BottleneckConfig(target_modules=["0"], bottleneck_size=2,
                                                                      hidden_size=4))
    with pytest.raises(ValueError, match=r"is on cpu but its input is on meta; move the whole model.*\.to\('meta'\)"):
        model(torch.randn(2, 4, device="meta"))


# -- checkpoints ----------------------------------------------------------------------------------
def test_save_load_round_trip_with_two_adapters(tmp_path):
    from safetensors.torch import load_file

    from minipeft import PeftModel

    base = tiny("bert")
    x = ids()
    model = get_peft_model(copy.deepcopy(base), BottleneckConfig.preset("parallel", model_type="bert"))
    model.add_adapter("houlsby", BottleneckConfig.preset("houlsby", model_type="bert", non_linearity="gelu"))
    # Houlsby adapts both dense layers of each block, also the one now inside the parallel
    # adapter's wrapper (layer.N.output.base_layer.dense).
    houlsby = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer) and "houlsby" in m.adapter_down]
    assert len(houlsby) == 2 * 2 and sum(".output.base_layer.dense" in n for n in houlsby) == 2
    randomize_up(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_down" in name:
                p.add_(0.1)  # loaded down weights must be the saved ones, not a fresh init
    expected = {}
    for name in ("default", "houlsby"):
        model.set_adapter(name)
        expected[name] = first_output(model(x))
    model.save_pretrained(tmp_path)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    d, b = 32, 2
    assert sum(t.numel() for t in tensors.values()) == 2 * (2 * d * b + b + d)  # one per layer
    assert "base_model.model.encoder.layer.0.output.adapter_down.weight" in tensors
    tensors = load_file(tmp_path / "houlsby" / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 4 * (2 * d * b + b + d)  # two per layer
    assert "base_model.model.encoder.layer.0.output.dense.adapter_down.weight" in tensors  # no base_layer

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    reloaded.load_adapter(tmp_path / "houlsby", adapter_name="houlsby")
    for name in ("default", "houlsby"):
        reloaded.set_adapter(name)
        torch.testing.assert_close(first_output(reloaded(x)), expected[name], rtol=0, atol=0)
    assert reloaded.peft_config["houlsby"].non_linearity == "gelu"
    assert reloaded.peft_config["default"].parallel_input == "input_tensor"

"""LoRA on bare parameters (``LoraConfig.target_parameters``) against peft and by hand.

Two tiny transformers MoE models built from configs, whose experts are one 3-D parameter each:
Qwen3-MoE stores them (experts, out, in), as nn.Linear weights are; GPT-OSS stores them
(experts, in, out) and says so (``is_transposed = True``). And a hand-written module with a 3-D
parameter in either layout, read twice in its forward, and a 2-D one; beside it a head whose
nn.Linear weight is targeted as a parameter. lora_A and lora_B are random, so an adapter that
did nothing, or put an expert's factors in the wrong place, cannot pass.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import minipeft
from minipeft.tuners.lora_parameter import LoraParameter
from tests.models import VOCAB, input_ids

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MOE_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
NET_TARGETS = ["experts.up", "experts.proj", "head.weight"]
E, IN, OUT = 4, 6, 10  # the hand-written experts: 4 experts from 6 to 10 features


class Experts(nn.Module):
    """E experts from IN to OUT features averaged, then a shared (IN, OUT) projection.

    ``up`` is (E, OUT, IN), or (E, IN, OUT) with ``is_transposed``; ``proj`` is 2-D (IN, OUT)."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        g = torch.Generator().manual_seed(0)
        up = torch.randn(E, OUT, IN, generator=g) / IN**0.5
        self.up = nn.Parameter(up.mT.contiguous() if transposed else up)
        self.proj = nn.Parameter(torch.randn(IN, OUT, generator=g) / OUT**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, IN)
        assert self.up.shape[0] == E  # a first read of the parameter; the second one computes
        per_expert = self.up if self.is_transposed else self.up.mT  # (E, IN, OUT)
        h = torch.relu(torch.einsum("ni,eio->neo", x, per_expert)).mean(1)  # (N, OUT)
        return h @ self.proj.T  # (N, IN)


class Net(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = Experts(transposed)
        self.head = nn.Linear(IN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(x))


def moe_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_experts_per_tok=2, max_position_embeddings=32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-OSS's RoPE scaling notes the tiny context length
        if kind == "qwen3_moe":
            cfg = transformers.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=12, num_experts=E, **common)
            model = transformers.Qwen3MoeForCausalLM(cfg)
        else:
            cfg = transformers.GptOssConfig(
                intermediate_size=12, num_local_experts=E, layer_types=["full_attention"] * 2, **common
            )
            model = transformers.GptOssForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the experts start at zero or tiny: give them weight in the output
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


CASES = {
    "qwen3_moe": MOE_TARGETS,
    "gpt_oss": MOE_TARGETS,
    "net": NET_TARGETS,
    "net_transposed": NET_TARGETS,
}


def build(kind: str) -> nn.Module:
    return Net(transposed=kind == "net_transposed") if kind.startswith("net") else moe_model(kind)


def batch(kind: str) -> torch.Tensor:
    if kind.startswith("net"):
        return torch.randn(5, IN, generator=torch.Generator().manual_seed(2))
    return input_ids(2, 6)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def randomize_factors(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output(model, x).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_and_mini(kind: str, **options):
    """The same base model adapted by peft and by minipeft, with peft's random factors in both."""
    base, targets = build(kind), CASES[kind]
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=targets, **options)
    )
    mini = minipeft.get_peft_model(
        copy.deepcopy(base), minipeft.LoraConfig(r=2, lora_alpha=3, target_parameters=targets, **options)
    )
    randomize_factors(peft_model)
    mini.load_state_dict(peft_model.state_dict(), strict=True)  # the same module tree and names as peft's
    return base, peft_model, mini


def lora_parameters(model: nn.Module) -> list[LoraParameter]:
    return [m for m in model.modules() if isinstance(m, LoraParameter)]


# -- forward, gradients and the layout, against peft -----------------------------------------------
@pytest.mark.parametrize("kind", list(CASES))
def test_forward_and_gradients_match_peft(kind):
    # rank_pattern / alpha_pattern match "<module>.<parameter>": down_proj or proj at rank 3
    patterns = {"down_proj": 3, "experts.proj": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that the patterns match no *module*
        base, peft_model, mini = peft_and_mini(kind, use_rslora=True, rank_pattern=patterns, alpha_pattern=patterns)
    assert {m.r["default"] for m in lora_parameters(mini)} == {2, 3}
    x = batch(kind)
    got, want = output(mini, x), output(peft_model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - output(base, x)).abs().max() > 1e-2  # the adapter does change the output
    peft_grads, mini_grads = grads(peft_model, x), grads(mini, x)
    assert mini_grads.keys() == peft_grads.keys() and all("lora_" in n for n in mini_grads)
    for name in peft_grads:
        torch.testing.assert_close(mini_grads[name], peft_grads[name], atol=1e-5, rtol=1e-4)
    # checkpoint keys and shapes as peft writes them: the nesting decides the key of each parameter
    mine, theirs = minipeft.get_peft_model_state_dict(mini), peft.get_peft_model_state_dict(peft_model)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("kind", ["qwen3_moe", "net"])
def test_targeted_parameter_names_are_peft_s(kind):
    _, peft_model, mini = peft_and_mini(kind)
    assert mini.targeted_parameter_names == peft_model.targeted_parameter_names != []
    assert mini.targeted_module_names == peft_model.targeted_module_names == []


def test_half_precision_base_gets_float32_factors_and_matches_peft():
    base = Net(transposed=False).to(torch.bfloat16)
    config = dict(r=2, lora_alpha=3, target_parameters=["experts.up", "experts.proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=[], **config))
    mini = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    randomize_factors(peft_model)
    mini.load_state_dict(peft_model.state_dict(), strict=True)
    assert {p.dtype for n, p in mini.named_parameters() if "lora_" in n} == {torch.float32}
    x = batch("net").to(torch.bfloat16)
    got = output(mini, x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, output(peft_model, x), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_its_own_b_a(transposed):
    """W'_e = W_e + s B_e A_e (or its transpose), with A_e rows e r .. e r + r - 1 of lora_A and B_e
    the columns e, e + E, ... of lora_B; written out here expert by expert, independently of peft."""
    model = minipeft.get_peft_model(Net(transposed), minipeft.LoraConfig(r=3, lora_alpha=6, target_parameters=["up"]))
    randomize_factors(model)
    experts = model.get_base_model().experts
    layer, plain = experts, experts.get_base_layer()
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert A.shape == (E * 3, IN) and B.shape == (OUT, 3 * E) and s == 2.0
    W = plain.up.detach().clone()
    expected = W.clone()
    for e in range(E):
        delta = s * B[:, e::E] @ A[e * 3 : (e + 1) * 3]  # (OUT, IN)
        expected[e] += delta.T if transposed else delta

    x = batch("net")
    by_hand = copy.deepcopy(plain)
    with torch.no_grad():
        by_hand.up.copy_(expected)
    calls = []
    build = layer.adapted_weight
    layer.adapted_weight = lambda *args, **kwargs: calls.append(1) or build(*args, **kwargs)
    torch.testing.assert_close(layer(x), by_hand(x), atol=1e-6, rtol=1e-5)
    assert len(calls) == 1  # Experts reads ``up`` twice; W' is built once per forward
    # Outside the forward the module is as it was: its own class, its frozen W, no parametrization.
    assert type(plain) is Experts and not parametrize.is_parametrized(plain)
    assert isinstance(plain.up, nn.Parameter) and torch.equal(plain.up, W) and not plain.up.requires_grad


def test_module_filters_leave_parameters_alone():
    """exclude_modules and layers_to_transform filter target_modules only, in peft and here."""
    base = moe_model("qwen3_moe")
    filters = dict(target_parameters=MOE_TARGETS, layers_to_transform=[0], exclude_modules=["layers.1.mlp.experts"])
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=[], **filters))
    mini = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**filters))
    assert minipeft.get_peft_model_state_dict(mini).keys() == peft.get_peft_model_state_dict(peft_model).keys()
    assert len(lora_parameters(mini)) == 4


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_checkpoints_load_both_ways(kind, tmp_path):
    base, peft_model, mini = peft_and_mini(kind)
    x = batch(kind)
    want = output(mini, x)

    mini.save_pretrained(tmp_path / "mini")
    saved = json.loads((tmp_path / "mini" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == MOE_TARGETS and saved["target_modules"] == []
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(output(in_peft, x), want, atol=1e-6, rtol=1e-6)

    peft_model.save_pretrained(tmp_path / "peft")
    back = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(output(back, x), want, atol=1e-6, rtol=1e-6)
    from safetensors.torch import load_file

    ours, theirs = (load_file(os.path.join(tmp_path, d, "adapter_model.safetensors")) for d in ("mini", "peft"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# -- merging ----------------------------------------------------------------------------------------
def test_merge_unmerge_and_unload():
    base, _, model = peft_and_mini("qwen3_moe")
    x = batch("qwen3_moe")
    adapted, plain = output(model, x), output(base, x)
    experts = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    W = {n: p.detach().clone() for n, p in experts.named_parameters()}

    model.merge_adapter(safe_merge=True)
    assert not torch.allclose(experts.gate_up_proj, W["gate_up_proj"])
    assert not torch.allclose(experts.down_proj, W["down_proj"])
    torch.testing.assert_close(output(model, x), adapted, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():  # a merged layer with adapters disabled unmerges itself (peft's rule)
        torch.testing.assert_close(output(model, x), plain, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    model.unmerge_adapter()
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p, W[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(output(model, x), adapted, atol=1e-6, rtol=1e-6)

    unloaded = copy.deepcopy(model).unload()
    assert not lora_parameters(unloaded)
    torch.testing.assert_close(output(unloaded, x), plain, atol=1e-6, rtol=1e-5)  # W after merge, unmerge
    merged = model.merge_and_unload()
    assert not lora_parameters(merged)
    moe = merged.model.layers[0].mlp.experts
    assert type(moe) is transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
    torch.testing.assert_close(output(merged, x), adapted, atol=1e-5, rtol=1e-5)


# -- several adapters -------------------------------------------------------------------------------
def test_second_adapter_shares_the_wrappers_and_matches_peft(tmp_path):
    base, peft_model, mini = peft_and_mini("gpt_oss")
    second = dict(r=3, lora_alpha=5, target_parameters=MOE_TARGETS)
    peft_model.add_adapter("other", peft.LoraConfig(target_modules=[], **second))
    mini.add_adapter("other", minipeft.LoraConfig(**second))
    randomize_factors(peft_model, seed=1)
    mini.load_state_dict(peft_model.state_dict(), strict=True)
    assert len(lora_parameters(mini)) == 4  # 2 layers x 2 parameters: the new adapter nests nothing new
    x = batch("gpt_oss")
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        mini.set_adapter(name)
        torch.testing.assert_close(output(mini, x), output(peft_model, x), atol=1e-5, rtol=1e-5)

    # Saved alone, "other" is the only adapter of a fresh peft model.
    mini.save_pretrained(tmp_path, selected_adapters=["other"])
    alone = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other")
    torch.testing.assert_close(output(alone, x), output(mini, x), atol=1e-5, rtol=1e-5)

    both = dict(adapter_names=["default", "other"])
    want = copy.deepcopy(peft_model).merge_and_unload(**both)
    torch.testing.assert_close(output(copy.deepcopy(mini).merge_and_unload(**both), x), output(want, x), atol=1e-5,
                               rtol=1e-5)

    mini.delete_adapter("default")
    mini.delete_adapter("other")  # the last one: both nested wrappers go, innermost first
    assert not lora_parameters(mini)
    torch.testing.assert_close(output(mini.get_base_model(), x), output(base, x), atol=0, rtol=0)


# -- errors -------------------------------------------------------------------------------------------
def assert_untouched(model: nn.Module) -> None:
    assert not any(isinstance(m, minipeft.tuners.AdapterLayer) for m in model.modules())


def test_a_name_that_matches_nothing_lists_the_nearest():
    model = moe_model("qwen3_moe")
    with pytest.raises(ValueError, match="matched no parameter") as err:
        minipeft.inject_adapter_in_model(
            minipeft.LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "experts.gate_proj"]), model
        )
    assert "'experts.gate_up_proj'" in str(err.value) and "model.layers.0.mlp.experts.gate_up_proj" in str(err.value)
    assert_untouched(model)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(lora_dropout=0.1), "lora_dropout=0.1.*Use lora_dropout=0.0"),
        (dict(use_dora=True), "use_dora=True"),
        (dict(lora_bias=True), "lora_bias=True"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=True.*is_transposed"),
        (dict(init_lora_weights="olora"), "init_lora_weights='olora'.*Use init_lora_weights=True, 'gaussian' or False"),
    ],
)
def test_options_that_do_not_apply_are_refused(option, message):
    with pytest.raises(ValueError, match=message):
        minipeft.LoraConfig(target_parameters=["experts.up"], **option)


def test_config_normalisation():
    with pytest.raises(ValueError, match=r"write \['experts.up'\]; a regex is not supported"):
        minipeft.LoraConfig(target_parameters="experts.up")
    config = minipeft.LoraConfig(target_parameters=("experts.up",))
    assert config.target_parameters == ["experts.up"] and config.target_modules == []
    assert minipeft.LoraConfig(target_parameters=["up"], target_modules=["head"]).target_modules == ["head"]


@pytest.mark.parametrize(
    "targets, modules, message",
    [
        (["head.bias"], [], r"'head.bias': it is 1-D \(3,\)"),
        (["head.weight"], ["head"], "also wraps its module"),
        (["experts.up"], None, "trained whole"),  # modules_to_save=["experts"]
    ],
)
def test_parameters_lora_cannot_adapt_are_refused(targets, modules, message):
    model = Net(transposed=False)
    extra = dict(modules_to_save=["experts"]) if modules is None else dict(target_modules=modules)
    with pytest.raises(ValueError, match=message):
        minipeft.inject_adapter_in_model(minipeft.LoraConfig(target_parameters=targets, **extra), model)
    assert_untouched(model)


def test_a_module_an_earlier_adapter_trains_whole_is_refused():
    model = minipeft.get_peft_model(
        Net(transposed=False), minipeft.LoraConfig(target_modules=["head"], modules_to_save=["experts"])
    )
    with pytest.raises(ValueError, match="'experts.up': its module is trained whole"):
        model.add_adapter("other", minipeft.LoraConfig(target_parameters=["experts.up"]))
    assert list(model.peft_config) == ["default"] and not lora_parameters(model)


def test_a_parameter_of_the_top_level_module_is_refused():
    model = Experts(transposed=False)
    with pytest.raises(ValueError, match="'up'.*top-level Experts"):
        minipeft.inject_adapter_in_model(minipeft.LoraConfig(target_parameters=["up"]), model)
    assert_untouched(model)


def test_adapters_must_adapt_the_same_parameters():
    model = minipeft.get_peft_model(moe_model("qwen3_moe"), minipeft.LoraConfig(target_parameters=MOE_TARGETS))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="must all adapt the same parameters"):
        model.add_adapter("other", minipeft.LoraConfig(target_parameters=["mlp.experts.down_proj"]))
    # a module whose parameters are adapted is no target_modules target, for this adapter or the next
    with pytest.raises(ValueError, match=r"its parameters \['gate_up_proj', 'down_proj'\] are adapted"):
        model.add_adapter("other", minipeft.LoraConfig(target_modules=["experts"]))
    assert list(model.peft_config) == ["default"] and len(lora_parameters(model)) == 4
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="cannot combine adapters \\['default'\\] that use target_parameters"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")


def test_the_out_proj_weight_of_an_attention_is_refused_as_it_would_never_run():
    # nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj, the call a
    # parameter's LoRA acts in: the adapter would train nothing and change nothing.
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(ValueError, match=r"cannot put LoRA on parameter 'attn.out_proj.weight': its module is the "
                                         r"out_proj of the nn.MultiheadAttention 'attn'.*target_modules=\['attn'\]"):
        minipeft.get_peft_model(Attention(), minipeft.LoraConfig(target_parameters=["attn.out_proj.weight"]))

"""minipeft's LoRA against Hugging Face peft on the same weights.

Each test builds one base model twice, adapts one copy with peft and the other with
minipeft using the same config, copies peft's adapter weights (randomised, so B != 0) into
minipeft with a strict ``load_state_dict`` (which also proves the parameter names match),
and compares outputs, gradients and trainable-parameter counts.
"""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

CASES = {
    "distilbert": dict(task_type="SEQ_CLS", target_modules=["q_lin", "v_lin"]),
    "bert": dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
    "gpt2": dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"]),
    "llama": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]),
}
VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "bias_all": dict(r=2, lora_alpha=4, bias="all"),
    "lora_only_bias": dict(r=2, lora_alpha=4, bias="lora_only"),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "value": 2, "v_lin": 2, "c_proj": 3},
                     alpha_pattern={"q_proj": 3, "query": 3, "q_lin": 3}),
    "layers": dict(r=4, lora_alpha=8, layers_to_transform=[1]),
}


def build_pair(base, **config):
    """(peft model, minipeft model) from one base model and one config, peft's weights in both."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    mini_model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    randomize_adapters(peft_model)
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    return peft_model, mini_model


def forward_backward(model, ids):
    model.zero_grad()
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same_behaviour(peft_model, mini_model, ids, capsys=None):
    assert mini_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    if capsys is not None:
        peft_model.print_trainable_parameters()
        expected = capsys.readouterr().out
        mini_model.print_trainable_parameters()
        assert capsys.readouterr().out == expected
    peft_logits, peft_grads = forward_backward(peft_model, ids)
    mini_logits, mini_grads = forward_backward(mini_model, ids)
    torch.testing.assert_close(mini_logits, peft_logits, atol=1e-5, rtol=0)
    assert mini_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        torch.testing.assert_close(mini_grads[name], peft_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", CASES)
def test_transformers_models_match_peft(arch, variant, capsys):
    base = tiny_transformers_model(arch)
    peft_model, mini_model = build_pair(base, **CASES[arch], **VARIANTS[variant])
    assert_same_behaviour(peft_model, mini_model, input_ids(), capsys)


# (peft itself fails on DistilBERT here: it puts LoRA in pre_classifier, then cannot wrap it for modules_to_save.)
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_all_linear_selects_the_same_layers_as_peft(arch):
    base = tiny_transformers_model(arch)
    peft_model, mini_model = build_pair(base, task_type=CASES[arch]["task_type"], target_modules="all-linear", r=2)
    assert mini_model.state_dict().keys() == peft_model.state_dict().keys()
    assert_same_behaviour(peft_model, mini_model, input_ids())


@pytest.mark.parametrize(
    "targets", [["fc1", "fc2"], ["embed"], ["conv1d"], ["conv2d"], r"blocks\.1\.fc\d", ["fc1", "embed", "conv2d", "head"]]
)
def test_hand_written_module_matches_peft(targets):
    base = TinyNet().eval()
    peft_model, mini_model = build_pair(base, r=2, lora_alpha=6, target_modules=targets)
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_modules_to_save_and_dropout_in_eval_match_peft():
    base = TinyNet()
    config = dict(r=2, lora_alpha=4, lora_dropout=0.3, target_modules=["fc1"], modules_to_save=["head"])
    peft_model, mini_model = build_pair(base, **config)
    peft_model.eval(), mini_model.eval()
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_dropout_in_training_matches_peft_with_the_same_random_stream():
    base = TinyNet()
    peft_model, mini_model = build_pair(base, r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["fc1", "fc2"])
    peft_model.train(), mini_model.train()
    ids = input_ids()
    torch.manual_seed(3)
    expected = peft_model(input_ids=ids)
    torch.manual_seed(3)
    torch.testing.assert_close(mini_model(input_ids=ids), expected, atol=1e-6, rtol=0)


def test_peft_state_dict_loads_both_ways_with_two_adapters():
    base = tiny_transformers_model("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model, mini_model = build_pair(base, **config)
    peft_model.add_adapter("other", peft.LoraConfig(**config, use_rslora=True))
    mini_model.add_adapter("other", minipeft.LoraConfig(**config, use_rslora=True))
    randomize_adapters(mini_model, seed=5)
    # minipeft -> peft this time, strict: every name exists on both sides.
    peft_model.load_state_dict(mini_model.state_dict(), strict=True)
    peft_model.set_adapter("other"), mini_model.set_adapter("other")
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_seed_scenario_prints_what_peft_prints(capsys):
    """The README's first example, unchanged but for the import line."""
    for library in (peft, minipeft):
        model = tiny_transformers_model("distilbert")
        peft_config = library.LoraConfig(
            task_type=library.TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["q_lin", "v_lin"]
        )
        model = library.get_peft_model(model, peft_config)
        model.print_trainable_parameters()
    peft_line, mini_line = capsys.readouterr().out.strip().splitlines()
    assert mini_line == peft_line

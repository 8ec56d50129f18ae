"""Checkpoints move between minipeft and the real peft package, both ways, with equal logits.

Tiny transformers models are built from configs (no hub). Every adapter tensor is perturbed away
from its initial value, so a tensor that is dropped, misnamed or loaded into the wrong place
changes the logits and fails the test.
"""

import copy
import json
import os

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import minipeft

VOCAB = 64


def bert():
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg), "SEQ_CLS", ["query", "value"], ["key"]


def distilbert():
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                           max_position_embeddings=32, num_labels=2)
    return DistilBertForSequenceClassification(cfg), "SEQ_CLS", ["q_lin", "v_lin"], ["out_lin"]


def gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg), "CAUSAL_LM", ["c_attn"], ["c_proj"]


def llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg), "CAUSAL_LM", ["q_proj", "v_proj"], ["down_proj"]


MODELS = {"bert": bert, "distilbert": distilbert, "gpt2": gpt2, "llama": llama}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def make_base(name):
    torch.manual_seed(0)
    model, task, targets, second_targets = MODELS[name]()
    return model.eval(), task, targets, second_targets


def lora_kwargs(task, targets, variant, r=4):
    return dict(task_type=task, r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False, **VARIANTS[variant])


def perturb(model, seed=1):
    """Move every trainable (adapter) tensor, so each one shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def logits(model):
    ids = torch.arange(12).remainder(VOCAB).view(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


PARAMS = [(m, v) for m in MODELS for v in VARIANTS]


@pytest.mark.parametrize("model_name,variant", PARAMS)
def test_minipeft_saves_peft_loads(tmp_path, model_name, variant):
    base, task, targets, _ = make_base(model_name)
    clean, reference = copy.deepcopy(base), copy.deepcopy(base)
    ours = minipeft.get_peft_model(base, minipeft.LoraConfig(**lora_kwargs(task, targets, variant)))
    perturb(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(clean, tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(ours), logits(reference), atol=1e-4)


@pytest.mark.parametrize("model_name,variant", PARAMS)
def test_peft_saves_minipeft_loads(tmp_path, model_name, variant):
    base, task, targets, _ = make_base(model_name)
    clean = copy.deepcopy(base)
    reference = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs(task, targets, variant)))
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = minipeft.PeftModel.from_pretrained(clean, tmp_path).eval()
    expected = logits(theirs)
    torch.testing.assert_close(logits(ours), expected, atol=1e-6, rtol=0)
    # The adapter really acts: without it the logits are the base model's.
    assert not torch.allclose(expected, logits(reference), atol=1e-4)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(reference), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name,variant", [("bert", "dora"), ("gpt2", "lora"), ("llama", "rslora")])
def test_same_keys_and_config_fields_as_peft(tmp_path, model_name, variant):
    base, task, targets, _ = make_base(model_name)
    clean = copy.deepcopy(base)
    kwargs = lora_kwargs(task, targets, variant)
    peft.get_peft_model(base, peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    minipeft.get_peft_model(clean, minipeft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")

    def shapes(folder):
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(peft_cfg), f"keys peft does not know: {set(ours_cfg) - set(peft_cfg)}"
    for key in ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
                "modules_to_save", "inference_mode", "base_model_name_or_path"):
        norm = lambda v: sorted(v) if isinstance(v, list) else v  # noqa: E731 (peft keeps a set: any order)
        assert norm(ours_cfg[key]) == norm(peft_cfg[key]), key


@pytest.mark.parametrize("model_name", ["distilbert", "gpt2"])
def test_second_named_adapter_both_ways(tmp_path, model_name):
    base, task, targets, second_targets = make_base(model_name)
    clean_a, clean_b = copy.deepcopy(base), copy.deepcopy(base)

    # minipeft -> peft: "default" in the folder, "second" in folder/second.
    ours = minipeft.get_peft_model(base, minipeft.LoraConfig(**lora_kwargs(task, targets, "lora")))
    ours.add_adapter("second", minipeft.LoraConfig(**lora_kwargs(task, second_targets, "dora", r=2)))
    ours.set_adapter("second")
    perturb(ours, seed=2)
    ours.set_adapter("default")
    perturb(ours, seed=3)
    ours.eval().save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours" / "second")) == ["adapter_config.json", "adapter_model.safetensors"]

    theirs = peft.PeftModel.from_pretrained(clean_a, tmp_path / "ours").eval()
    theirs.load_adapter(tmp_path / "ours" / "second", adapter_name="second")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-6, rtol=0)
    theirs.set_adapter("second")
    ours.set_adapter("second")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-6, rtol=0)

    # peft -> minipeft, the same two adapters written by peft.
    theirs.save_pretrained(tmp_path / "peft")
    back = minipeft.PeftModel.from_pretrained(clean_b, tmp_path / "peft").eval()
    back.load_adapter(tmp_path / "peft" / "second", "second")
    theirs.set_adapter("default")
    torch.testing.assert_close(logits(back), logits(theirs), atol=1e-6, rtol=0)
    back.set_adapter("second")
    theirs.set_adapter("second")
    torch.testing.assert_close(logits(back), logits(theirs), atol=1e-6, rtol=0)


BIAS_CASES = [("bert", "lora_only"), ("gpt2", "all"), ("bert", "all")]  # BERT: a SEQ_CLS head trained whole


def saved_keys(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("model_name,bias", BIAS_CASES)
def test_trained_biases_travel_with_the_adapter(tmp_path, model_name, bias):
    base, task, targets, _ = make_base(model_name)
    clean = copy.deepcopy(base)
    kwargs = {**lora_kwargs(task, targets, "lora"), "bias": bias}
    theirs = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = minipeft.PeftModel.from_pretrained(clean, tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)
    assert set(minipeft.get_peft_model_state_dict(ours)) == saved_keys(tmp_path)


@pytest.mark.parametrize("model_name,bias", BIAS_CASES)
def test_trained_biases_minipeft_saves_peft_loads(tmp_path, model_name, bias):
    base, task, targets, _ = make_base(model_name)
    clean, reference = copy.deepcopy(base), copy.deepcopy(base)
    kwargs = {**lora_kwargs(task, targets, "lora"), "bias": bias}
    ours = minipeft.get_peft_model(base, minipeft.LoraConfig(**kwargs))
    perturb(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(clean, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-6, rtol=0)
    # The same keys as peft writes for this adapter (for a head trained whole under bias="all"
    # that includes classifier.modules_to_save.bias and classifier.original_module.bias).
    peft.get_peft_model(reference, peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "peft")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")


def test_peft_duplicate_head_bias_must_agree(tmp_path):
    """peft writes a trained head's bias twice under bias="all"; two different values are refused."""
    from safetensors.torch import load_file, save_file

    base, task, targets, _ = make_base("bert")
    clean = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs(task, targets, "lora"), bias="all"))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(path)
    assert "base_model.model.classifier.modules_to_save.bias" in tensors  # peft's spelling this test is about
    tensors["base_model.model.classifier.modules_to_save.bias"] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="two different values .*'base_model.model.classifier.bias'"):
        minipeft.PeftModel.from_pretrained(clean, tmp_path)


def test_peft_checkpoint_without_task_type_loads(tmp_path):
    """With no task_type peft writes an ``auto_mapping`` entry: metadata, not a feature."""
    base, _, targets, _ = make_base("llama")
    clean = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(theirs)
    theirs.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()).get("auto_mapping")
    ours = minipeft.PeftModel.from_pretrained(clean, tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-6, rtol=0)

"""``PeftModel.get_prompt`` and ``word_embeddings``: the virtual tokens peft's methods return,
compared with peft's on the same checkpoint (prompt tuning, P-tuning, prefix tuning; decoder-only
and encoder-decoder), and the refusals for adapters without virtual tokens."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minipeft
from tests.models import tiny_transformers_model

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def pair(kind: str, config_class: str, **config):
    """peft's model with random trainable tensors, and minipeft's loaded from its state dict."""
    base = tiny_transformers_model(kind)
    task = "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_class)(task_type=task, **config))
        with torch.no_grad():
            for t in theirs.parameters():
                if t.requires_grad:
                    t.normal_()
        ours = minipeft.get_peft_model(copy.deepcopy(base), getattr(minipeft, config_class)(task_type=task, **config))
        minipeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("config_class, extra", [("PromptTuningConfig", {}),
                                                 ("PromptEncoderConfig", {"encoder_hidden_size": 16})])
def test_prompt_is_peft_prompt(kind, config_class, extra):
    theirs, ours = pair(kind, config_class, num_virtual_tokens=3, **extra)
    expected = theirs.get_prompt(batch_size=2)
    got = ours.get_prompt(batch_size=2)
    assert got.shape == expected.shape  # (2, 3, 32), or (2, 6, 32) on T5 (a block per stack)
    torch.testing.assert_close(got, expected)
    assert ours.word_embeddings is ours.get_base_model().get_input_embeddings()


def test_prefix_is_peft_cache_per_layer():
    theirs, ours = pair("llama", "PrefixTuningConfig", num_virtual_tokens=3)
    cache = theirs.get_prompt(batch_size=2)
    layers = ours.get_prompt(batch_size=2)
    assert len(layers) == len(cache.layers) == 2
    for (key, value), expected in zip(layers, cache.layers):
        assert key.shape == (2, 2, 3, 8)  # (B, kv heads, n, head_dim): the GQA model's 2 key/value heads
        torch.testing.assert_close(key, expected.keys)
        torch.testing.assert_close(value, expected.values)


def test_encoder_decoder_prefix_is_peft_self_attention_cache():
    # Decoder layer j reads the table's layer 2j mod L (prefix_tuning_seq2seq.py): the same as peft's.
    theirs, ours = pair("t5", "PrefixTuningConfig", num_virtual_tokens=3)
    cache = theirs.get_prompt(batch_size=2).self_attention_cache
    for (key, value), expected in zip(ours.get_prompt(batch_size=2), cache.layers, strict=True):
        torch.testing.assert_close(key, expected.keys)
        torch.testing.assert_close(value, expected.values)


def test_prompt_carries_gradient_to_the_table():
    _, ours = pair("llama", "PromptTuningConfig", num_virtual_tokens=3)
    ours.get_prompt(batch_size=4).sum().backward()
    table = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(table.grad, torch.full_like(table, 4.0))  # each row is used by 4 examples


def test_word_embeddings_while_another_kind_of_adapter_is_active():
    _, ours = pair("llama", "PromptTuningConfig", num_virtual_tokens=3)
    ours.add_adapter("lora", minipeft.LoraConfig(target_modules=["q_proj"]))
    ours.set_adapter("lora")
    assert ours.word_embeddings is ours.get_base_model().get_input_embeddings()  # (was a KeyError)


def test_refusals():
    model = minipeft.get_peft_model(tiny_transformers_model("llama"), minipeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="adds no virtual tokens"):
        model.get_prompt(2)
    _, ours = pair("llama", "PromptTuningConfig", num_virtual_tokens=3)
    with pytest.raises(ValueError, match="multitask"):
        ours.get_prompt(2, task_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ours.get_prompt(0)

"""A wrapper sits where its layer was, and model code that reads the layer's tensors directly
must find them there. T5's feed-forward checks ``self.wo.weight.dtype`` before it calls
``self.wo``: with ``wo`` adapted (the (IA)^3 paper's placement for T5) the forward crashed. The
reference is peft on the same model, whose wrappers answer for their layers too."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from tests.models import randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

CONFIGS = [
    ("IA3Config", dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]), ("ia3_l",), 1.0),
    ("LoraConfig", dict(r=4, target_modules=["q", "wo"]), ("lora_",), 0.0),
    ("VeraConfig", dict(r=8, target_modules=["q", "wo"]), ("vera_lambda",), 0.0),
]


@pytest.mark.parametrize("cls, config, names, mean", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_t5_runs_with_its_feed_forward_output_adapted(cls, config, names, mean):
    base = tiny_transformers_model("t5")
    ids, decoder_ids = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 4))
    logits = {}
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), getattr(library, cls)(task_type="SEQ_2_SEQ_LM", **config))
        randomize_adapters(model, names=names, std=0.3, mean=mean)
        with torch.no_grad():
            logits[library.__name__] = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(logits["minipeft"], logits["peft"], atol=1e-5, rtol=0)


def test_a_module_trained_whole_answers_with_the_copy_in_use():
    base = tiny_transformers_model("llama")
    model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["q_proj"],
                                                              modules_to_save=["lm_head"]))
    head = model.get_base_model().lm_head
    assert head.weight is head.modules_to_save["default"].weight
    with model.disable_adapter():
        assert head.weight is head.original_module.weight
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.weight is q.base_layer.weight and q.bias is None

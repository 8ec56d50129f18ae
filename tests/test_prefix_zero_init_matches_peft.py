"""Prefix tuning with init_weights="zero": every layer's keys and values start at zero, with or
without the reparametrisation MLP (its last layer's weight and bias both zero), as in peft 0.21.
Zero keys still take attention mass, so the model differs from the base; the reference is peft's
freshly built model on the same base, which needs no copied weights since nothing random
reaches the prefix."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from minipeft import PrefixTuningConfig
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_prefix_is_zero_and_computes_what_peft_computes(projection):
    base = tiny_transformers_model("gpt2")
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", prefix_projection=projection)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), PrefixTuningConfig(**config))
    table = ours.prompt_encoder["default"].prompt_embeddings()
    assert table.shape == (3, 2 * 2 * 32) and torch.count_nonzero(table) == 0
    ids = input_ids()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        torch.testing.assert_close(logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)
        with ours.disable_adapter():
            assert not torch.allclose(ours(input_ids=ids).logits, logits, atol=1e-4)

"""Prefix tuning under a decoding loop written by hand: the model is called with the KV cache
and neither ``position_ids`` nor ``attention_mask`` (``generate()`` passes position ids, so its
test does not reach this path). The prefix hook must then number the new tokens after the
cached ones itself. Reference: the logits of the whole sequence run at once without a cache.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import minipeft
from minipeft import PrefixTuningConfig
from tests.models import input_ids, tiny_transformers_model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_steps_without_position_ids_match_the_uncached_forward(kind):
    model = minipeft.get_peft_model(tiny_transformers_model(kind), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        for p in model.prompt_encoder["default"].parameters():
            p.normal_(0, 0.5)
    ids = input_ids(batch=2, length=8)
    # transformers renamed past_key_values to cache (5.2x); minipeft's hook reads either.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        out = model(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 8):  # one token at a time
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kwarg: cache})
            steps.append(out.logits)
            cache = out.past_key_values
        with model.disable_adapter():
            plain = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, full, atol=1e-3)  # the prefix matters, so positions are tested

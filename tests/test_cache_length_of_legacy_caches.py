"""How many tokens a call's KV cache already holds, for the virtual-token hooks: a legacy cache
((k, v) per layer, k shaped (batch, heads, tokens, head_dim), as hand-written models such as
nanoGPT variants still pass) must read the same length as transformers' own cache object holding
the same tensors. Reference: DynamicCache.get_seq_length()."""

import pytest
import torch

from minipeft.tuners.virtual_tokens import cache_length

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_a_legacy_cache_reads_the_length_transformers_reads(key):
    batch, heads, tokens, head_dim = 2, 3, 7, 5  # every axis a different size
    layers = [(torch.randn(batch, heads, tokens, head_dim), torch.randn(batch, heads, tokens, head_dim)) for _ in range(2)]
    cache = transformers.DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    assert cache.get_seq_length() == tokens
    assert cache_length({key: cache}) == tokens
    assert cache_length({key: tuple(layers)}) == tokens
    assert cache_length({key: None}) == 0 and cache_length({}) == 0

"""LoRA on an nn.Embedding built with max_norm or scale_grad_by_freq, against peft 0.21: the
lookup into A's table honours the base embedding's options as peft's does (max_norm renormalises
the looked-up rows of the table in place; scale_grad_by_freq divides each row's gradient by how
often its token occurs). Same outputs, gradients and, after the forward, the same A."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from tests.models import VOCAB, input_ids, randomize_adapters

peft = pytest.importorskip("peft")


class EmbeddingNet(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, **options)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(1))


@pytest.mark.parametrize("options", [dict(max_norm=0.1), dict(scale_grad_by_freq=True)])
def test_embedding_options_apply_to_the_lora_table_as_in_peft(options):
    torch.manual_seed(0)
    base = EmbeddingNet(**options)
    config = dict(r=3, lora_alpha=6, target_modules=["embed"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    randomize_adapters(theirs, std=0.5)  # rows of A^T well above max_norm
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = input_ids(batch=3, length=9)
    ids[:, :3] = 5  # a repeated token: scale_grad_by_freq has something to scale
    for model in (theirs, ours):
        model.zero_grad()
        model(input_ids=ids).pow(2).sum().backward()
    name = "base_model.model.embed.lora_embedding_A.default"
    theirs_p, ours_p = dict(theirs.named_parameters()), dict(ours.named_parameters())
    torch.testing.assert_close(ours_p[name], theirs_p[name], rtol=0, atol=1e-6)  # max_norm renormalised it alike
    for key, p in theirs_p.items():
        if p.requires_grad:
            torch.testing.assert_close(ours_p[key].grad, p.grad, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids), rtol=1e-5, atol=1e-6)

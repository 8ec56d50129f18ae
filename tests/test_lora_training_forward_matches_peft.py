"""LoRA in training mode against peft 0.21, on the paths the other parity tests run only in eval:
dropout inside DoRA and inside convolutions, and an embedding's padding row.

peft draws one dropout mask per adapted layer per forward, in module order, as minipeft does,
so with the same seed both libraries drop the same activations and must agree on outputs and
gradients. Adapter weights are peft's, randomised (B != 0), copied with a strict load.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from tests.models import VOCAB, TinyNet, input_ids, randomize_adapters

peft = pytest.importorskip("peft")


def pair(base, **config):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    randomize_adapters(theirs, std=0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.train(), ours.train()


def run(model, ids, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(input_ids=ids)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_step(theirs, ours, ids):
    for seed in (0, 1):
        expected, expected_grads = run(theirs, ids, seed)
        got, grads = run(ours, ids, seed)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dora_with_dropout_in_training_matches_peft():
    # DoRA with dropout computes the base term from the dropped input as well (peft's
    # base_result=None path); TinyNet's linear layers have nonzero biases.
    theirs, ours = pair(TinyNet(), r=2, lora_alpha=4, lora_dropout=0.4, use_dora=True, target_modules=["fc1", "fc2", "head"])
    assert_same_training_step(theirs, ours, input_ids(batch=3))


@pytest.mark.parametrize("target", ["conv1d", "conv2d"])
def test_conv_lora_with_dropout_in_training_matches_peft(target):
    theirs, ours = pair(TinyNet(), r=2, lora_alpha=4, lora_dropout=0.5, target_modules=[target])
    assert_same_training_step(theirs, ours, input_ids(batch=3))


class PaddedEmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(1))


def test_embedding_lora_keeps_the_padding_row_out_of_the_gradient_as_peft_does():
    torch.manual_seed(0)
    theirs, ours = pair(PaddedEmbeddingNet(), r=2, lora_alpha=4, target_modules=["embed"])
    ids = input_ids(batch=3)
    ids[:, -2:] = 0  # padding tokens
    assert_same_training_step(theirs, ours, ids)
    _, grads = run(ours, ids, 0)
    # by hand: A is (r, num_embeddings); the padding token's column gets no gradient
    a_grad = grads["base_model.model.embed.lora_embedding_A.default"]
    assert torch.all(a_grad[:, 0] == 0) and a_grad[:, ids[0, 0]].abs().sum() > 0

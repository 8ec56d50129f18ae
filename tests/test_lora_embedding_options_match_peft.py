"""LoRA on an nn.Embedding built with max_norm or scale_grad_by_freq, against peft 0.21: the
lookup into A's table honours the base embedding's options as peft's does (max_norm renormalises
the looked-up rows of the table in place; scale_grad_by_freq divides each row's gradient by how
often its token occurs). Same outputs, gradients and, after the forward, the same A.

And on an embedding that scales its lookup (``embed_scale``: Gemma-3's tensor buffer, or a
plain float on a hand-written module): the LoRA term is scaled too, as in peft."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from minipeft.tuners.lora import LoraEmbedding
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


# -- embed_scale ---------------------------------------------------------------------------------
class FloatScaledEmbedding(nn.Embedding):
    """A hand-written scaled embedding whose ``embed_scale`` is a plain float (peft's other case)."""

    embed_scale = 3.5

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale


class FloatScaledNet(EmbeddingNet):
    def __init__(self) -> None:
        super().__init__()
        self.embed = FloatScaledEmbedding(VOCAB, 8)


def tiny_gemma3() -> nn.Module:
    """Gemma-3's text model: its Gemma3TextScaledWordEmbedding multiplies the lookup by
    embed_scale = sqrt(hidden_size), a tensor buffer."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )
    return transformers.Gemma3ForCausalLM(cfg).eval()


def scaled_case(case: str) -> tuple[nn.Module, list[str], nn.Module]:
    """(model, LoRA targets, the scaled embedding) for each kind of embed_scale peft recognises."""
    if case == "gemma3":
        model = tiny_gemma3()
        return model, ["embed_tokens", "q_proj"], model.model.embed_tokens
    torch.manual_seed(0)
    model = FloatScaledNet()
    return model, ["embed", "head"], model.embed


def out(model, ids) -> torch.Tensor:
    result = model(input_ids=ids)
    return getattr(result, "logits", result)


@pytest.mark.parametrize("case", ["gemma3", "float"])
def test_embed_scale_applies_to_the_lora_term_as_in_peft(case):
    """A scaled embedding returns embed_scale * W[x]; peft scales the LoRA term likewise, so the
    adapted table acts as embed_scale * (W + s (B A)^T)[x], the same as its merged weight
    W + s (B A)^T under the module's own scaling. Forward and gradients match peft's, and merging
    (which needs no embed_scale of its own) gives the same outputs."""
    base, targets, emb = scaled_case(case)
    scale = float(emb.embed_scale)
    assert scale not in (0.0, 1.0)
    config = dict(r=3, lora_alpha=6, target_modules=targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    randomize_adapters(theirs, std=0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = input_ids(batch=2, length=9)
    with torch.no_grad():
        expected = out(theirs, ids)
        torch.testing.assert_close(out(ours, ids), expected, rtol=1e-5, atol=1e-5)
        # The adapted lookup is embed_scale times the adapted table's rows, LoRA term included.
        layer = next(m for m in ours.modules() if isinstance(m, LoraEmbedding))
        table = layer.get_base_layer().weight + layer.delta_weight("default")
        torch.testing.assert_close(layer(ids), scale * table[ids], rtol=1e-5, atol=1e-5)
    for model in (theirs, ours):
        model.zero_grad()
        out(model, ids).pow(2).mean().backward()
    theirs_p, ours_p = dict(theirs.named_parameters()), dict(ours.named_parameters())
    for key, p in theirs_p.items():
        if p.requires_grad:
            torch.testing.assert_close(ours_p[key].grad, p.grad, rtol=1e-5, atol=1e-6, msg=key)
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(out(ours, ids), expected, rtol=1e-5, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(layer.get_base_layer().weight, emb.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(out(theirs.merge_and_unload(), ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out(ours.merge_and_unload(), ids), expected, rtol=1e-5, atol=1e-5)


def test_a_sparse_embedding_trains_its_lora_table_densely():
    # sparse=True is for the big base table; A's lookup goes through its transposed view, whose
    # sparse gradient cannot become A's (peft 0.21 fails in the backward there).
    model = minipeft.get_peft_model(EmbeddingNet(sparse=True), minipeft.LoraConfig(target_modules=["embed"],
                                                                                   init_lora_weights=False))
    ids = input_ids(2, 5)
    model(ids).sum().backward()
    dense = minipeft.get_peft_model(EmbeddingNet(), minipeft.LoraConfig(target_modules=["embed"], init_lora_weights=False))
    dense.load_state_dict(model.state_dict())
    dense(ids).sum().backward()
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)

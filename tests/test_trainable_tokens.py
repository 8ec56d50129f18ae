"""Trainable tokens (``TrainableTokensConfig`` and LoRA's ``trainable_token_indices``) against peft.

Tiny transformers models built from configs: GPT-2 ties its LM head to the input embedding
(``lm_head.weight is transformer.wte.weight``), LLaMA here does not. Trained rows are set to
random values so that an adapter that did nothing could not pass.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import minipeft
from minipeft.tuners.trainable_tokens import TiedTokensLayer, TrainableTokensLayer, TrainableTokensWrapper
from tests.models import VOCAB, input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TOKENS = [5, 1, 60, 7]  # unsorted on purpose: the rows are stored in the order given


@pytest.fixture(scope="module")
def gpt2():
    return tiny_transformers_model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return tiny_transformers_model("llama")


def ids_with(tokens=(1, 5, 7)) -> torch.Tensor:
    """A batch that holds ``tokens`` (and no other token of TOKENS), so their rows are looked up."""
    ids = input_ids(2, 9, seed=3)
    ids[torch.isin(ids, torch.tensor(TOKENS))] = 11
    ids[0, : len(tokens)] = torch.tensor(tokens)
    ids[1, -len(tokens) :] = torch.tensor(tokens)
    return ids


def randomize_rows(model: nn.Module, seed: int = 0) -> None:
    """Move every trained row away from the table's row (a no-op adapter would match anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g))


def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits(model, ids).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_no_adapter(model: nn.Module) -> None:
    assert not any(isinstance(m, (TrainableTokensLayer, TrainableTokensWrapper)) for m in model.modules())


# -- the method of its own, against peft ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_and_gradients_match_peft(arch, request):
    base = request.getfixturevalue(arch)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=TOKENS))
    mini_model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    randomize_rows(peft_model)
    # The same module tree and parameter names as peft (the tied head included for GPT-2).
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    assert mini_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    assert mini_model.peft_config["default"].target_modules == peft_model.peft_config["default"].target_modules

    ids = ids_with()
    torch.testing.assert_close(logits(mini_model, ids), logits(peft_model, ids), atol=2e-5, rtol=0)
    peft_grads, mini_grads = grads(peft_model, ids), grads(mini_model, ids)
    embedding = peft_model.peft_config["default"].target_modules
    assert mini_grads.keys() == peft_grads.keys() == {f"base_model.model.{embedding}.trainable_tokens_delta.default"}
    for name in peft_grads:
        torch.testing.assert_close(mini_grads[name], peft_grads[name], atol=1e-6, rtol=1e-4)


def test_an_untied_head_trains_its_own_rows_as_in_peft(llama, tmp_path):
    # LLaMA's lm_head is not tied: targeted beside the embedding, its rows of the chosen tokens
    # (their logits' weights) train too. Same logits as peft, and each loads the other's file.
    config = dict(token_indices=TOKENS, target_modules=["embed_tokens", "lm_head"])
    peft_model = peft.get_peft_model(copy.deepcopy(llama), peft.TrainableTokensConfig(**config))
    mini_model = minipeft.get_peft_model(copy.deepcopy(llama), minipeft.TrainableTokensConfig(**config))
    randomize_rows(peft_model)
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    ids = ids_with()
    torch.testing.assert_close(logits(mini_model, ids), logits(peft_model, ids), atol=2e-5, rtol=0)
    head = mini_model.get_base_model().lm_head
    assert isinstance(head, TrainableTokensLayer) and not isinstance(head, TiedTokensLayer)

    mini_model.save_pretrained(tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "theirs")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours")
    torch.testing.assert_close(logits(reloaded, ids), logits(peft_model, ids), atol=2e-5, rtol=0)
    reloaded = minipeft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "theirs")
    torch.testing.assert_close(logits(reloaded, ids), logits(peft_model, ids), atol=2e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits(mini_model.merge_and_unload(), ids),
                                   logits(peft_model.merge_and_unload(), ids), atol=2e-5, rtol=0)


def test_tied_head_sees_the_trained_rows(gpt2):
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    randomize_rows(model)
    inner = model.get_base_model()
    assert isinstance(inner.lm_head, TiedTokensLayer) and inner.lm_head.owner() is inner.transformer.wte
    rows = inner.transformer.wte.trainable_tokens_delta["default"]
    table = inner.transformer.wte.get_base_layer().weight.detach().clone()
    table[TOKENS] = rows.detach()
    # Logits from the table with the rows written in, computed by hand from the final hidden state.
    hidden = inner.transformer(input_ids=ids_with()).last_hidden_state
    torch.testing.assert_close(logits(model, ids_with()), hidden @ table.T, atol=1e-5, rtol=0)


def test_only_the_chosen_rows_train(llama):
    """LLaMA's head is untied, so a row gets gradient only where its token is in the batch."""
    model = minipeft.get_peft_model(copy.deepcopy(llama), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    table = model.get_base_model().model.embed_tokens.get_base_layer().weight
    before = table.detach().clone()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.trainable_tokens_delta.default"
    ]
    rows = model.get_base_model().model.embed_tokens.trainable_tokens_delta["default"]
    torch.testing.assert_close(rows.detach(), before[TOKENS], atol=0, rtol=0)  # init_weights: copies

    ids = ids_with((1, 5, 7))  # token 60 is chosen but absent
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    logits(model, ids).pow(2).mean().backward()
    assert table.grad is None
    got = rows.grad.abs().sum(1)
    assert (got[[0, 1, 3]] > 0).all() and got[2] == 0
    opt.step()
    assert torch.equal(table, before)  # the frozen table never changes
    merged = model.merge_and_unload().model.embed_tokens.weight
    changed = (merged != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 5, 7]


def test_tied_rows_train_through_the_head_too(gpt2):
    """GPT-2's head reads every trained row, so all of them change, and only they, in both tables."""
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    before = gpt2.transformer.wte.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    logits(model, ids_with((1, 5))).pow(2).mean().backward()
    opt.step()
    plain = model.merge_and_unload()
    assert plain.lm_head.weight is plain.transformer.wte.weight  # still tied
    changed = (plain.transformer.wte.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == sorted(TOKENS)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_in_minipeft_loads_in_peft_and_back(arch, request, tmp_path):
    base = request.getfixturevalue(arch)
    mini_model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    randomize_rows(mini_model)
    ids = ids_with()
    expected = logits(mini_model, ids).detach()
    mini_model.save_pretrained(tmp_path / "mini")

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=2e-5, rtol=0)
    peft_model.save_pretrained(tmp_path / "peft")
    # The same files: config fields and tensor keys (GPT-2: the tied head's copy too, as peft saves it).
    mini_config = json.loads((tmp_path / "mini" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: peft_config[k] for k in mini_config} == mini_config
    from safetensors.torch import load_file

    mini_tensors = load_file(tmp_path / "mini" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mini_tensors.keys() == peft_tensors.keys()
    for k in peft_tensors:
        assert torch.equal(mini_tensors[k], peft_tensors[k]), k

    back = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(back, ids), expected, atol=0, rtol=0)


def test_merge_and_unload_equal_the_unmerged_forward(gpt2):
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    randomize_rows(model)
    ids = ids_with()
    expected = logits(model, ids).detach()
    table = model.get_base_model().transformer.wte.get_base_layer().weight
    original = table.detach().clone()

    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), expected, atol=2e-5, rtol=0)
    with model.disable_adapter():  # a merged layer unmerges itself when disabled
        torch.testing.assert_close(logits(model, ids), logits(gpt2, ids), atol=0, rtol=0)
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(table, original)

    plain = model.merge_and_unload()
    assert_no_adapter(plain)
    assert type(plain.lm_head) is nn.Linear and plain.lm_head.weight is plain.transformer.wte.weight
    torch.testing.assert_close(logits(plain, ids), expected, atol=2e-5, rtol=0)


def test_unload_gives_the_base_model_back(gpt2):
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.TrainableTokensConfig(token_indices=TOKENS))
    randomize_rows(model)
    model.merge_adapter()
    plain = model.unload()
    assert_no_adapter(plain)
    torch.testing.assert_close(logits(plain, ids_with()), logits(gpt2, ids_with()), atol=0, rtol=0)


def test_several_named_adapters(gpt2, tmp_path):
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.TrainableTokensConfig(token_indices=[1, 5]))
    model.add_adapter("other", minipeft.TrainableTokensConfig(token_indices=[5, 7], init_weights=False))
    wte = model.get_base_model().transformer.wte
    assert set(wte.trainable_tokens_delta) == {"default", "other"}
    assert not wte.trainable_tokens_delta["other"].requires_grad  # added, not active
    randomize_rows(model)
    ids = ids_with()
    default = logits(model, ids).detach()
    model.set_adapter("other")
    other = logits(model, ids).detach()
    assert not torch.allclose(default, other)
    model.save_pretrained(tmp_path, selected_adapters=["other"])

    # Two adapters active at once may not train the same token (peft refuses it too).
    minipeft.injection.set_adapter(model.get_base_model(), ["default", "other"])
    with pytest.raises(ValueError, match="both train token 5"):
        logits(model, ids)
    with pytest.raises(ValueError, match="both train token 5"):
        model.merge_adapter(["default", "other"])
    model.set_adapter("other")

    model.delete_adapter("other")
    torch.testing.assert_close(logits(model, ids), default, atol=0, rtol=0)
    model.load_adapter(tmp_path / "other", "again")
    model.set_adapter("again")
    torch.testing.assert_close(logits(model, ids), other, atol=0, rtol=0)
    model.delete_adapter("default")
    model.delete_adapter("again")
    assert_no_adapter(model)


def test_padding_row_and_tied_head_bias():
    """A hand-written model: the padding row never trains (as in nn.Embedding), and a tied head with
    a bias keeps it (the adapter at init changes nothing; peft 0.21 drops a tied head's bias)."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8, padding_idx=0)
            self.head = nn.Linear(8, VOCAB)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    base = Tiny()
    ids = torch.tensor([[0, 3, 9, 0, 4]])
    config = minipeft.TrainableTokensConfig(token_indices=[0, 3], target_modules=["embed"])
    model = minipeft.get_peft_model(copy.deepcopy(base), config)
    assert isinstance(model.base_model.model.head, TiedTokensLayer)
    torch.testing.assert_close(model(ids), base(ids), atol=1e-6, rtol=0)

    model.base_model.model.head.disable_adapters = True  # the head alone: only the input side trains
    model(ids).sum().backward()
    grad = model.base_model.model.embed.trainable_tokens_delta["default"].grad
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0


def test_lora_only_bias_with_trainable_tokens_matches_peft(tmp_path):
    """bias="lora_only" trains the biases of the layers LoRA wraps, not the bias of a head tied to
    an embedding with trainable tokens (peft neither trains nor saves it), so peft's checkpoint
    loads in minipeft and minipeft's in peft."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, VOCAB)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.proj(self.embed(ids))))

    torch.manual_seed(0)
    base = Tiny()
    ids = torch.tensor([[1, 3, 9, 5, 4]])
    config = dict(r=2, target_modules=["proj"], bias="lora_only", trainable_token_indices={"embed": [3, 5]})
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    mini_model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    trained = {n for n, p in mini_model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert "base_model.model.head.base_layer.bias" not in trained

    randomize_rows(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.proj.base_layer.bias.add_(1.0)  # a trained bias, saved with the adapter
    peft_model.save_pretrained(tmp_path / "peft")
    mini_model = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    # peft 0.21 drops a tied head's bias on the trained tokens' logits, minipeft keeps it (see
    # test_padding_row_and_tied_head_bias): the other columns are compared.
    frozen = [v for v in range(VOCAB) if v not in (3, 5)]
    torch.testing.assert_close(mini_model(ids)[..., frozen], peft_model(ids)[..., frozen], atol=1e-5, rtol=0)
    mini_model.save_pretrained(tmp_path / "mini")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(again(ids), peft_model(ids), atol=0, rtol=0)


# -- LoRA's trainable_token_indices ---------------------------------------------------------------
LORA_CASES = {
    "gpt2_list": ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=TOKENS)),
    "llama_dict": ("llama", dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS})),
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_with_trainable_tokens_matches_peft_both_ways(case, request, tmp_path):
    arch, config = LORA_CASES[case]
    base = request.getfixturevalue(arch)
    ids = ids_with()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **config))
    randomize_rows(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")

    mini_model = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(logits(mini_model, ids), logits(peft_model, ids), atol=2e-5, rtol=0)
    assert mini_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()
    peft_grads, mini_grads = grads(peft_model, ids), grads(mini_model, ids)
    rows = [n for n in peft_grads if "trainable_tokens_delta" in n]
    assert len(rows) == 1
    torch.testing.assert_close(mini_grads[rows[0]], peft_grads[rows[0]], atol=1e-6, rtol=1e-4)

    mini_model.save_pretrained(tmp_path / "mini")
    saved = minipeft.get_peft_model_state_dict(mini_model)
    assert saved.keys() == peft.get_peft_model_state_dict(peft_model).keys()
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(logits(again, ids), logits(peft_model, ids), atol=0, rtol=0)


# peft's module tree: the embedding, and each module tied to it, becomes a TrainableTokensWrapper
# holding the layer as token_adapter. Tied and untied heads, a tied head LoRA adapts too, an encoder.
TREE_CASES = {
    "gpt2_tied": ("gpt2", dict(target_modules=["c_attn"], trainable_token_indices=TOKENS)),
    "gpt2_tied_head_adapted": ("gpt2", dict(target_modules=["c_attn", "lm_head"], trainable_token_indices=TOKENS)),
    "llama_untied": ("llama", dict(target_modules=["q_proj"],
                                   trainable_token_indices={"embed_tokens": TOKENS, "lm_head": [3, 4]})),
    "bert_encoder": ("bert_model", dict(target_modules=["query"], trainable_token_indices=TOKENS)),
}


def output(model, ids) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("case", TREE_CASES)
def test_lora_s_trainable_tokens_have_peft_s_module_tree(case):
    """The whole state dict and the trainable parameters are named as in peft, in peft's order,
    and peft's state dict loads strictly and computes peft's outputs; adapter files keep peft's keys."""
    arch, config = TREE_CASES[case]
    base = tiny_transformers_model(arch)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **config))
    mini_model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=4, **config))
    assert list(mini_model.state_dict()) == list(peft_model.state_dict())
    assert any(".token_adapter.trainable_tokens_delta." in key for key in mini_model.state_dict())
    trained = [n for n, p in mini_model.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in peft_model.named_parameters() if p.requires_grad]

    randomize_rows(peft_model)
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    ids = ids_with()
    with torch.no_grad():
        torch.testing.assert_close(output(mini_model, ids), output(peft_model, ids), atol=2e-5, rtol=0)
    assert minipeft.get_peft_model_state_dict(mini_model).keys() == peft.get_peft_model_state_dict(peft_model).keys()


@pytest.mark.parametrize("case", TREE_CASES)
def test_unload_puts_the_plain_embedding_back(case):
    """unload() takes the wrappers out with the layers they hold: the base model's own modules
    come back, under their own names, computing what they did. (peft 0.21 leaves a
    TrainableTokensWrapper on a tied head that LoRA adapts too.)"""
    arch, config = TREE_CASES[case]
    base = tiny_transformers_model(arch)
    model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=4, **config))
    randomize_rows(model)
    plain = model.unload()
    assert type(plain.get_input_embeddings()) is nn.Embedding
    head = plain.get_output_embeddings()
    assert head is None or type(head) is nn.Linear
    assert_no_adapter(plain)
    assert list(plain.state_dict()) == list(base.state_dict())
    ids = ids_with()
    with torch.no_grad():
        torch.testing.assert_close(output(plain, ids), output(base, ids), atol=0, rtol=0)


@pytest.mark.parametrize("lora_first", [False, True])
def test_token_layers_nested_on_one_embedding_train_disjoint_tokens(gpt2, lora_first):
    """The method of its own and LoRA's tokens on one embedding, both active: each token's row
    comes from the adapter that trains it; two that train the same token are refused when they
    run, as two adapters in one layer are, rather than one layer's rows hiding the other's."""
    configs = {"own": minipeft.TrainableTokensConfig(target_modules=["wte"], token_indices=[1, 5]),
               "lora": minipeft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[7, 60])}
    order = ["lora", "own"] if lora_first else ["own", "lora"]
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), configs[order[0]], adapter_name=order[0])
    model.add_adapter(order[1], configs[order[1]])
    randomize_rows(model)
    model.base_model.set_adapter(["own", "lora"])
    wte = model.get_base_model().transformer.wte
    ids = ids_with((1, 5, 7, 60))
    rows = {token: dict(model.named_parameters())[name][i] for name, tokens in [
        (next(n for n, _ in model.named_parameters() if n.endswith("trainable_tokens_delta.own")), [1, 5]),
        (next(n for n, _ in model.named_parameters() if n.endswith("trainable_tokens_delta.lora")), [7, 60])]
        for i, token in enumerate(tokens)}
    looked_up = wte(ids)
    for token, row in rows.items():
        torch.testing.assert_close(looked_up[ids == token], row.expand_as(looked_up[ids == token]), atol=0, rtol=0)

    overlapping = minipeft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[5, 9])
    model.add_adapter("overlap", overlapping)
    model.base_model.set_adapter(["own", "overlap"])
    with pytest.raises(ValueError, match="both train token 5"):
        model.get_base_model().transformer.wte(ids)  # (read again: "overlap" may have wrapped it anew)
    with pytest.raises(ValueError, match="both train token 5"):
        model.merge_adapter(["own", "overlap"])
    assert model.get_model_status().merged_adapters == []  # refused before anything was merged


def test_lora_on_the_tied_head_keeps_its_term_on_the_trained_tokens(gpt2, tmp_path):
    """LoRA on GPT-2's tied head plus trainable tokens: the trained tokens' logits are ``h R^T`` plus
    the head's LoRA term, as in peft (which nests LoRA around the token layer); replacing those
    columns by ``h R^T`` would drop the LoRA term there. Logits and gradients against peft, and
    merging gives the unmerged forward."""
    config = dict(r=4, target_modules=["lm_head", "c_attn"], trainable_token_indices=TOKENS)
    ids = ids_with()
    torch.manual_seed(0)  # LoRA's A: the same draw whichever tests ran before
    peft_model = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(**config))
    randomize_rows(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    mini_model = minipeft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "peft", is_trainable=True)

    expected = logits(peft_model, ids)
    assert (expected[..., TOKENS] - logits(gpt2, ids)[..., TOKENS]).abs().max() > 1e-2  # the adapter acts there
    torch.testing.assert_close(logits(mini_model, ids), expected, atol=2e-5, rtol=0)
    peft_grads, mini_grads = grads(peft_model, ids), grads(mini_model, ids)
    assert len(mini_grads) == len(peft_grads)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(mini_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    # Merging writes R into the shared table and then LoRA's update on top (which the input side
    # sees too: LoRA on a tied head cannot merge exactly, in peft neither); unmerging takes them
    # out newest first, so the table comes back.
    table = mini_model.get_base_model().transformer.wte.get_base_layer().weight
    original = table.detach().clone()
    unmerged = logits(mini_model, ids).detach()
    mini_model.merge_adapter()
    mini_model.unmerge_adapter()
    torch.testing.assert_close(table.detach(), original, atol=1e-6, rtol=0)  # W + dW - dW: rounding only
    torch.testing.assert_close(logits(mini_model, ids), unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("route", ["disable_adapter", "disable_adapter_layers"])
def test_disabling_merged_lora_on_the_tied_head_gives_the_base_model(gpt2, route):
    """LoRA on GPT-2's tied head and trainable tokens on its input embedding both write the one
    table when merged: the trained rows first, then LoRA's update on top of every row. Disabling
    must take them out in the reverse order, as unmerge_adapter does. (Each layer unmerging itself
    at its next forward would go in forward order, rows first, and leave the table wrong: the base
    model would not come back inside the block, nor the table after it.)"""
    config = minipeft.LoraConfig(r=4, target_modules=["lm_head", "c_attn"], trainable_token_indices=TOKENS)
    torch.manual_seed(0)
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), config)
    randomize_rows(model)  # rows away from the table's, and a nonzero LoRA term on the head
    ids = ids_with()
    table = model.get_base_model().transformer.wte.get_base_layer().weight
    original = table.detach().clone()
    unmerged = logits(model, ids).detach()
    base = logits(gpt2, ids)

    model.merge_adapter()
    if route == "disable_adapter":
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, ids), base, atol=1e-4, rtol=0)
    else:
        model.disable_adapter_layers()
        torch.testing.assert_close(logits(model, ids), base, atol=1e-4, rtol=0)
        model.enable_adapter_layers()
    torch.testing.assert_close(table.detach(), original, atol=1e-6, rtol=0)  # W + dW - dW: rounding only
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-4, rtol=0)  # enabled again, unmerged


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_adapters_merged_one_call_at_a_time_unmerge_newest_first(gpt2, order):
    """Adapter "a" is LoRA on GPT-2's tied head; "b" trains tokens of the input embedding, which is
    the same table. Merged in two calls, they must come out in the reverse of the order they went
    in, whatever the order of their layers in the model: the rows "b" writes back on unmerging are
    the ones it overwrote, which hold "a"'s update when "a" was merged first."""
    torch.manual_seed(0)
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.LoraConfig(r=4, target_modules=["lm_head"]), "a")
    model.add_adapter("b", minipeft.LoraConfig(r=4, target_modules=["c_attn"], trainable_token_indices=TOKENS))
    randomize_rows(model)
    table = model.get_base_model().transformer.wte.get_base_layer().weight
    original = table.detach().clone()
    ids = ids_with()
    unmerged = logits(model, ids).detach()  # adapter "a" active

    for name in order:
        model.merge_adapter([name])
    model.unmerge_adapter()
    torch.testing.assert_close(table.detach(), original, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-4, rtol=0)


def test_lora_with_trainable_tokens_merges(gpt2):
    model = minipeft.get_peft_model(copy.deepcopy(gpt2), minipeft.LoraConfig(r=4, **LORA_CASES["gpt2_list"][1]))
    inner = model.get_base_model()
    assert isinstance(inner.transformer.wte.token_adapter, TrainableTokensLayer)
    assert isinstance(inner.lm_head.token_adapter, TiedTokensLayer)
    randomize_rows(model)
    ids = ids_with()
    expected = logits(model, ids).detach()
    plain = model.merge_and_unload()
    assert_no_adapter(plain)
    torch.testing.assert_close(logits(plain, ids), expected, atol=2e-5, rtol=0)


def test_deleting_an_adapter_unwraps_a_tied_head_it_also_adapts(gpt2):
    """LoRA on GPT-2's tied head puts wrappers holding the adapter there (LoraLinear around the
    TrainableTokensWrapper of a TiedTokensLayer, as peft nests them); deleting the adapter must
    remove them all, not leave an empty LoraLinear (or a wrapper) behind."""
    model = minipeft.get_peft_model(
        copy.deepcopy(gpt2), minipeft.LoraConfig(target_modules=["lm_head", "c_attn"], trainable_token_indices=TOKENS)
    )
    model.add_adapter("other", minipeft.LoraConfig(target_modules=["c_attn"]))
    model.delete_adapter("default")
    assert type(model.get_base_model().lm_head) is nn.Linear
    assert type(model.get_base_model().transformer.wte) is nn.Embedding


# -- errors ---------------------------------------------------------------------------------------
def test_errors(gpt2):
    model = copy.deepcopy(gpt2)
    tokens = minipeft.TrainableTokensConfig
    with pytest.raises(ValueError, match=r"\[64, 70\] are out of range .* vocabulary has 64 tokens"):
        minipeft.get_peft_model(model, tokens(token_indices=[3, 64, 70]))
    with pytest.raises(TypeError, match="untied output head, an nn.Linear\); 'transformer.h.0.attn.c_attn' is a Conv1D"):
        minipeft.get_peft_model(model, tokens(token_indices=[3], target_modules=["h.0.attn.c_attn"]))
    with pytest.raises(ValueError, match=r"lists token ids \[1\] more than once"):
        minipeft.TrainableTokensConfig(token_indices=[1, 2, 1])
    with pytest.raises(ValueError, match=r"trainable_token_indices\['wte'\] lists token ids \[3\] more than once"):
        minipeft.LoraConfig(target_modules=["c_attn"], trainable_token_indices={"wte": [3, 3]})
    with pytest.raises(ValueError, match="negative"):
        minipeft.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[-1])
    def lora(**kwargs):
        return minipeft.LoraConfig(**{"target_modules": ["c_attn"], "trainable_token_indices": [3], **kwargs})

    with pytest.raises(ValueError, match="trained whole by modules_to_save"):
        minipeft.get_peft_model(model, lora(modules_to_save=["wte"]))
    with pytest.raises(ValueError, match="'lm_head' shares the weight of 'transformer.wte'"):
        minipeft.get_peft_model(model, lora(modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="adapted by LoRA"):
        minipeft.get_peft_model(model, lora(target_modules=["wte", "c_attn"]))
    with pytest.raises(ValueError, match="names 'embed_tokens', which no module of GPT2LMHeadModel ends with"):
        minipeft.get_peft_model(model, lora(trainable_token_indices={"embed_tokens": [3]}))
    # Every refusal left the model as it was.
    assert not any(isinstance(m, minipeft.tuners.AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("first", ["tokens", "plain"])
def test_add_weighted_adapter_refuses_trainable_tokens(llama, first):
    """A combined adapter has no token rows to give: the rows are trained values, not updates
    ``s B A``, and peft's add_weighted_adapter gives the new adapter fresh copies of the table's
    rows (its sources' rows dropped). minipeft refuses, also when the adapter with tokens is not
    the first (whose config the new one copies), and leaves the model as it was."""
    model = minipeft.get_peft_model(copy.deepcopy(llama), minipeft.LoraConfig(r=4, **LORA_CASES["llama_dict"][1]))
    model.add_adapter("plain", minipeft.LoraConfig(r=4, target_modules=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ["default", "plain"] if first == "tokens" else ["plain", "default"]
    message = r"cannot combine adapters \['default'\] trained with trainable_token_indices: .* merge_and_unload"
    with pytest.raises(ValueError, match=message):  # one type: the refusal comes before the type matters
        model.add_weighted_adapter(adapters, [0.5, 1.0], "both", combination_type="svd")
    assert list(model.peft_config) == ["default", "plain"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    # Why: peft's combination of one adapter (exact for its LoRA factors) drops its trained rows.
    peft_model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, **LORA_CASES["llama_dict"][1]))
    randomize_rows(peft_model)
    peft_model.add_weighted_adapter(["default"], [1.0], "single", combination_type="linear")
    rows = peft_model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    torch.testing.assert_close(rows["single"], llama.model.embed_tokens.weight[TOKENS], atol=0, rtol=0)
    assert not torch.allclose(rows["default"], rows["single"])

    # What still works: adapters without trainable tokens combine (and reload).
    model.add_adapter("plain2", minipeft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_weighted_adapter(["plain", "plain2"], [0.5, 1.0], "both", combination_type="cat")
    assert model.peft_config["both"].trainable_token_indices is None


def test_token_ids_as_a_tensor_an_array_or_numpy_ints_become_a_list():
    import numpy as np

    for given in (torch.tensor([3, 5]), np.array([3, 5]), [np.int64(3), np.int64(5)], range(3, 6, 2)):
        assert minipeft.TrainableTokensConfig(token_indices=given, target_modules=["embed"]).token_indices == [3, 5]
        assert minipeft.LoraConfig(target_modules=["q"], trainable_token_indices=given).trainable_token_indices == [3, 5]
    config = minipeft.LoraConfig(target_modules=["q"], trainable_token_indices={"embed_tokens": (1, 2)})
    assert config.trainable_token_indices == {"embed_tokens": [1, 2]}

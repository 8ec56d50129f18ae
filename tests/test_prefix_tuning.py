"""Prefix tuning: parity with peft on GPT-2 and LLaMA (GQA), BERT and a hand-written nanoGPT-style
model, KV-cached generation, checkpoints both ways, and the errors for bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minipeft
from tests.models import greedy_without_cache, tiny_transformers_model
from tests.models import padded_batch as batch
from minipeft import PrefixTuningConfig
from minipeft.tuners.prefix_tuning import sdpa_with_prefix

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny(kind: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=None, attn_implementation=attn)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, attn_implementation=attn)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    if kind != "bert":
        model.generation_config.eos_token_id = None  # generate every requested token
    return model.eval()


def pair(kind: str, **config):
    base = tiny(kind)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    p = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task, **config))
    m = minipeft.get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=task, **config))
    with torch.no_grad():
        for param in p.prompt_encoder["default"].parameters():
            param.normal_(0, 0.5)
    m.load_state_dict({k: v for k, v in p.state_dict().items() if k.startswith("prompt_encoder.")}, strict=False)
    return p, m


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("padded", [False, True])  # LLaMA: enable_gqa without a mask, repeated kv heads with one
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_loss_and_grads_match_peft(kind, padded, projection):
    p, m = pair(kind, num_virtual_tokens=3, prefix_projection=projection)
    config = m.peft_config["default"]
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (
        p.peft_config["default"].num_layers, p.peft_config["default"].token_dim,
        p.peft_config["default"].num_attention_heads)
    inputs = batch(padded=padded)
    out_p, out_m = p(**inputs, labels=inputs["input_ids"]), m(**inputs, labels=inputs["input_ids"])
    keep = inputs["attention_mask"].bool()  # padded positions are undefined in both libraries
    torch.testing.assert_close(out_m.logits[keep], out_p.logits[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(out_m.loss, out_p.loss, atol=1e-5, rtol=0)
    out_p.loss.backward()
    out_m.loss.backward()
    grads_p = {n: q.grad for n, q in p.prompt_encoder["default"].named_parameters()}
    for name, q in m.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(q.grad, grads_p[name], atol=1e-5, rtol=0)
    assert m.get_nb_trainable_parameters()[0] == p.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_with_kv_cache(kind):
    p, m = pair(kind, num_virtual_tokens=4)
    ids = batch(padded=False)["input_ids"]
    with torch.no_grad():
        cached = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        reference = greedy_without_cache(m, ids, 6)
        with m.disable_adapter():
            plain = greedy_without_cache(m, ids, 6)
    assert torch.equal(cached, reference)
    assert not torch.equal(plain, reference)


def test_bert_sequence_classification_trains():
    m = minipeft.get_peft_model(tiny("bert"), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    names = [n for n, q in m.named_parameters() if q.requires_grad]
    assert names == ["base_model.model.classifier.modules_to_save.default.weight",
                     "base_model.model.classifier.modules_to_save.default.bias",
                     "prompt_encoder.default.embedding.weight"]
    inputs, labels = batch(), torch.tensor([0, 1])
    with m.disable_adapter():
        plain = m(**inputs).logits
    assert not torch.allclose(m(**inputs).logits, plain)
    m.train()
    opt = torch.optim.Adam([q for q in m.parameters() if q.requires_grad], lr=0.05)
    losses = []
    for _ in range(10):
        loss = m(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NanoGPT(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(32, dim)
        self.attn = nn.ModuleList(NanoAttention(dim) for _ in range(layers))
        self.lm_head = nn.Linear(dim, VOCAB)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for attn in self.attn:
            x = x + attn(x)
        return self.lm_head(x)


def manual_prefix_attention(q, k, v, pk, pv):
    """Causal attention over [prefix; keys] written out by hand, every prefix position visible."""
    T, n = q.shape[-2], pk.shape[-2]
    keys, values = torch.cat([pk.expand(q.shape[0], -1, -1, -1), k], 2), torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.cat([torch.ones(T, n, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values


def test_causal_sdpa_with_prefix_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    pk, pv = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    expected = manual_prefix_attention(q, k, v, pk, pv)
    torch.testing.assert_close(sdpa_with_prefix(pk, pv, q, k, v, is_causal=True), expected)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(sdpa_with_prefix(pk, pv, q, k, v, attn_mask=bool_mask), expected)
    float_mask = torch.zeros(5, 5).masked_fill(~bool_mask, float("-inf"))
    torch.testing.assert_close(sdpa_with_prefix(pk, pv, q, k, v, float_mask), expected)


def test_nanogpt_style_model():
    model = NanoGPT()
    m = minipeft.get_peft_model(copy.deepcopy(model), PrefixTuningConfig(num_virtual_tokens=3))
    config = m.peft_config["default"]
    assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 16, 2)
    idx = batch(padded=False)["input_ids"]
    encoder = m.prompt_encoder["default"]
    # Hand-computed forward: each attention layer attends over [its prefix; causal keys].
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(6))
        for i, attn in enumerate(model.attn):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
            y = manual_prefix_attention(q, k, v, *encoder.layer_prefix(i))
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        expected = model.lm_head(x)
        torch.testing.assert_close(m(idx), expected, atol=1e-5, rtol=0)
    only_first = minipeft.get_peft_model(copy.deepcopy(model),
                                         PrefixTuningConfig(num_virtual_tokens=3, target_modules=["attn.0"]))
    assert only_first.peft_config["default"].num_layers == 1


@pytest.mark.parametrize("projection", [False, True])
def test_checkpoints_load_in_peft_and_back(projection, tmp_path):
    p, m = pair("llama", num_virtual_tokens=3, prefix_projection=projection)
    inputs = batch(padded=False)
    expected = p(**inputs).logits
    m.save_pretrained(tmp_path / "mini")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "mini" / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    p2 = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "mini")
    torch.testing.assert_close(p2(**inputs).logits, expected, atol=1e-5, rtol=0)

    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "peft")
    torch.testing.assert_close(m2(**inputs).logits, expected, atol=1e-5, rtol=0)
    # Loaded for inference: the MLP is folded away, one table of peft's shape remains.
    assert [n for n, _ in m2.prompt_encoder["default"].named_parameters()] == ["embedding.weight"]
    m3 = minipeft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "peft", is_trainable=True)
    torch.testing.assert_close(m3(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert m3.prompt_encoder["default"].embedding.weight.requires_grad


def test_a_layer_subset_reloads_and_a_full_prefix_keeps_peft_config_keys(tmp_path):
    """A prefix on some layers only (target_modules) saves them in adapter_config.json, so a reload
    selects the same layers; without target_modules the file has exactly peft's keys."""
    import json

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, target_modules=["h.0.attn"])
    m = minipeft.get_peft_model(tiny("gpt2"), config)
    with torch.no_grad():
        m.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    inputs = batch()
    expected = m(**inputs).logits
    m.save_pretrained(tmp_path / "subset")
    saved = json.loads((tmp_path / "subset" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["h.0.attn"] and saved["num_layers"] == 1

    back = minipeft.PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "subset")
    assert back.prompt_encoder["default"].layer_of == {"transformer.h.0.attn": 0}
    torch.testing.assert_close(back(**inputs).logits, expected, atol=1e-6, rtol=0)
    with back.disable_adapter():
        assert not torch.allclose(back(**inputs).logits, expected, atol=1e-4)

    p, full = pair("gpt2", num_virtual_tokens=2)
    full.save_pretrained(tmp_path / "ours")
    p.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "target_modules" not in ours and set(ours) <= set(theirs)


def test_target_modules_name_an_attention_module_inside_another_adapter():
    """A bottleneck around h.0.attn moves the SDPA caller to h.0.attn.base_layer; the name still matches."""
    base = tiny("gpt2")
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.BottleneckConfig(target_modules=["h.0.attn"],
                                                                               bottleneck_size=2))
    m.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=2, target_modules=["h.0.attn"]))
    assert list(m.prompt_encoder["prefix"].layer_of) == ["transformer.h.0.attn.base_layer"]


def test_fold_keeps_outputs():
    _, m = pair("gpt2", num_virtual_tokens=2, prefix_projection=True)
    inputs = batch()
    before = m(**inputs).logits
    m.prompt_encoder["default"].fold()
    assert m.prompt_encoder["default"].transform is None
    torch.testing.assert_close(m(**inputs).logits, before, atol=1e-6, rtol=0)


def test_unload_and_delete_remove_every_hook():
    base = tiny("llama")
    expected = base(**batch()).logits
    m = minipeft.get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=2))
    m.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=3))
    m.delete_adapter("other")
    assert not torch.allclose(m(**batch()).logits, expected)
    torch.testing.assert_close(m.unload()(**batch()).logits, expected)


# -- bad input ------------------------------------------------------------------------------------
def test_model_without_sdpa_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"attn_implementation='eager'.*attn_implementation='sdpa'"):
        minipeft.get_peft_model(tiny("llama", attn="eager"), PrefixTuningConfig(num_virtual_tokens=2))


def test_attention_switched_away_from_sdpa_after_adding_the_prefix_is_an_error_not_a_plain_model():
    # The prefix goes in at the SDPA call; eager attention makes none, which used to give the base
    # model's outputs without a word (and a training step an unrelated autograd error).
    model = minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids = torch.randint(0, VOCAB, (2, 5))
    model(input_ids=ids)
    model.get_base_model().set_attn_implementation("eager")
    with pytest.raises(RuntimeError, match=r"'model.layers.0.self_attn' ran without calling torch.nn.functional."
                                           r"scaled_dot_product_attention \(attn_implementation='eager'\), so its "
                                           r"prefix was not applied"):
        model(input_ids=ids)
    model.get_base_model().set_attn_implementation("sdpa")
    model(input_ids=ids)  # and back: the modes of the failed call were all closed


@pytest.mark.parametrize("n", [0, -1])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PrefixTuningConfig(num_virtual_tokens=n)


def test_a_grouped_query_models_sizes_over_all_heads_are_taken_as_peft_takes_them():
    # LLaMA here: 4 attention heads, 2 key/value heads of 8. peft accepts token_dim=32 and
    # num_attention_heads=4 (all heads) and stores the prefix per key/value head (16 and 2).
    p, m = pair("llama", num_virtual_tokens=3, token_dim=32, num_attention_heads=4)
    for model in (p, m):
        config = model.peft_config["default"]
        assert (config.token_dim, config.num_attention_heads) == (16, 2)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, p(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_dims_that_do_not_match_the_model_are_refused():
    with pytest.raises(ValueError, match="token_dim=24 does not match the model: it has 16"):
        minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=2, token_dim=24))
    with pytest.raises(ValueError, match="num_layers=5 does not match the model: it has 2"):
        minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=2, num_layers=5))
    with pytest.raises(ValueError, match="matched none of the attention modules"):
        minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=2, target_modules=["mlp"]))
    with pytest.raises(ValueError, match="init_weights must be None"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    _, m = pair("llama", num_virtual_tokens=3)
    m.save_pretrained(tmp_path)
    other = minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(3, 64\).*expects \(4, 64\)"):
        minipeft.set_peft_model_state_dict(other, minipeft.get_peft_model_state_dict(m))


def test_a_failed_attach_leaves_the_model_untouched():
    base = tiny("llama", attn="eager")
    expected = base(**batch()).logits
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        minipeft.get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2))
    assert not base._forward_pre_hooks and not base._forward_hooks
    torch.testing.assert_close(base(**batch()).logits, expected)


def test_the_projection_runs_once_per_forward():
    m = minipeft.get_peft_model(tiny("llama"), PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True))
    calls = []
    m.prompt_encoder["default"].transform.register_forward_hook(lambda *a: calls.append(1))
    m(**batch())
    assert len(calls) == 1 and m.prompt_encoder["default"]._table is None  # not kept past the forward


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_projection_gives_the_same_grads(reentrant):
    ids = batch()["input_ids"]
    grads = []
    for checkpointing in (False, True):
        base = tiny("llama").train()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            base.enable_input_require_grads()
        torch.manual_seed(2)
        m = minipeft.get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True))
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for with_checkpointing, without in zip(grads[1], grads[0]):
        torch.testing.assert_close(with_checkpointing, without, atol=1e-5, rtol=0)


def test_adding_prefix_tuning_keeps_the_modules_a_user_put_in_eval():
    # Prefix tuning runs the model once in eval mode to find its attentions; afterwards every
    # module is back in its own mode, not all in the model's (GPT-2's dropout kept off stays off).
    model = tiny_transformers_model("gpt2")
    model.train()
    model.transformer.drop.eval()
    minipeft.get_peft_model(model, minipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert model.training and not model.transformer.drop.training


def test_where_peft_computes_otherwise_a_warning_says_so():
    import types
    import warnings

    def said(model):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            minipeft.get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        return [str(w.message) for w in caught if str(w.message).startswith("prefix tuning on")]

    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, sliding_window=8, attn_implementation="sdpa")).eval()
    assert said(mistral) == [
        "prefix tuning on MistralForCausalLM, which attends within a sliding window of 8 tokens: here every query sees "
        "the prefix, in peft (a cached prefix) only those less than 5 tokens past it, so on longer sequences a "
        "checkpoint gives other logits in the two libraries"]
    gpt = NanoGPT()
    assert said(copy.deepcopy(gpt)) == []  # no transformers model: no peft route to differ from
    gpt.config = types.SimpleNamespace(model_type="nano")  # as a transformers model without position_ids
    assert said(gpt) == [
        "prefix tuning on NanoGPT, whose forward takes no position_ids: its real tokens are numbered from 0 here and "
        "from 3 in peft (after its cached prefix), so a checkpoint gives other logits in the two libraries"]
    assert said(tiny("llama")) == []

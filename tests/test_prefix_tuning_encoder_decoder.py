"""Prefix tuning on encoder-decoder models (T5, BART): the prefix goes into the decoder's
self-attention through its KV cache, as in peft. Checked against peft (config, logits, loss,
gradients, checkpoints both ways), against the model given a hand-filled cache, and, for
generation, against greedy decoding without a cache and against the scores of each beam.

peft 0.21's own ``generate`` on T5 under transformers 5 loses the prefix (it departs from peft's
own forward); minipeft's is compared with decoding by repeated full forwards instead."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from minipeft.tuners.prefix_tuning_seq2seq import table_layer
from tests.models import VOCAB
from tests.models import padded_batch as batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N_VIRTUAL = 3


def tiny(kind: str, layers: int = 2):
    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=layers, num_heads=4,
                                    decoder_start_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    if kind == "bart":  # eos 1, never drawn from these tiny models' first steps, so generations run their length
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                      decoder_ffn_dim=48, max_position_embeddings=64, eos_token_id=1,
                                      forced_eos_token_id=None, decoder_start_token_id=2)
        return transformers.BartForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def pair(kind: str, layers: int = 2, **config):
    """(peft model, minipeft model) on one base model, both holding the same random prefix."""
    base = tiny(kind, layers)
    config = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VIRTUAL) | config
    p = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**config))
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.PrefixTuningConfig(**config))
    with torch.no_grad():
        p.prompt_encoder["default"].embedding.weight.normal_()
        m.prompt_encoder["default"].embedding.weight.copy_(p.prompt_encoder["default"].embedding.weight)
    return base, p, m


def labels(length: int = 4) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind, layers", [("t5", 2), ("bart", 3)])
def test_config_logits_loss_and_gradients_match_peft(kind, layers):
    _, p, m = pair(kind, layers)
    ours, theirs = m.peft_config["default"].to_dict(), p.peft_config["default"].to_dict()
    for field in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules", "encoder_hidden_size"):
        assert ours[field] == theirs[field], field
    p.train(), m.train()  # dropout on: the same seed draws the same masks in both
    outputs = []
    for model in (p, m):
        torch.manual_seed(11)
        out = model(**batch(), labels=labels())
        out.loss.backward()
        outputs.append((out.logits, out.loss, model.prompt_encoder["default"].embedding.weight.grad))
    (logits_p, loss_p, grad_p), (logits_m, loss_m, grad_m) = outputs
    torch.testing.assert_close(logits_m, logits_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_m, loss_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_m, grad_p, atol=1e-6, rtol=0)
    # peft's layout: decoder layer j reads the table's layer 2j mod L; with even L the odd ones are never read.
    read = {table_layer(j, layers) for j in range(layers)}
    per_layer = grad_m.view(N_VIRTUAL, layers, -1).abs().sum(dim=(0, 2))
    assert [bool(g > 0) for g in per_layer] == [i in read for i in range(layers)]


def test_the_prefix_is_a_prefilled_self_attention_cache():
    """By hand: the base model given a cache whose self-attention part holds each decoder layer's
    rows of the table, and a decoder mask widened by n ones, computes what the adapter does."""
    base, _, m = pair("t5")
    table = m.prompt_encoder["default"].embedding.weight.detach()
    kv = table.view(N_VIRTUAL, 2, 2, 4, 8).permute(1, 2, 3, 0, 4)  # (layer, key/value, heads, n, head_dim)
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    for layer in range(2):
        source = kv[table_layer(layer, 2)]
        cache.self_attention_cache.update(source[0].expand(2, -1, -1, -1), source[1].expand(2, -1, -1, -1), layer)
    decoder_mask = torch.ones(2, 4, dtype=torch.long)
    decoder_mask[0, -1] = 0
    with torch.no_grad():
        want = base(**batch(), decoder_input_ids=labels(), cache=cache,
                    decoder_attention_mask=torch.cat([torch.ones(2, N_VIRTUAL, dtype=torch.long), decoder_mask], 1))
        got = m(**batch(), decoder_input_ids=labels(), decoder_attention_mask=decoder_mask)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=0)


def greedy_without_cache(model, steps: int, start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding that runs the whole decoder input through the model at every step: the
    tokens, and each step's logits."""
    decoded, step_logits = torch.full((2, 1), start), []
    for _ in range(steps):
        step_logits.append(model(**batch(), decoder_input_ids=decoded, use_cache=False).logits[:, -1])
        decoded = torch.cat([decoded, step_logits[-1].argmax(-1, keepdim=True)], dim=1)
    return decoded, step_logits


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_equals_decoding_without_a_cache(kind):
    _, p, m = pair(kind)
    start = m.get_base_model().config.decoder_start_token_id
    settings = dict(**batch(), max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        tokens, logits = greedy_without_cache(m, 6, start)
        torch.testing.assert_close(tokens, greedy_without_cache(p, 6, start)[0], atol=0, rtol=0)  # peft's forward agrees
        out = m.generate(**settings)
        with m.disable_adapter():
            plain = m.generate(**settings)
    torch.testing.assert_close(out.sequences, tokens, atol=0, rtol=0)
    for step, want in zip(out.logits, logits):
        torch.testing.assert_close(step, want, atol=1e-5, rtol=0)
    assert not torch.allclose(plain.logits[0], out.logits[0], atol=1e-3)  # the prefix does change them


def test_each_beam_scores_what_a_forward_without_cache_gives_it():
    """Beam search reorders and grows the cache; the score of each returned sequence (length
    penalty 0: the sum of its tokens' log-probabilities) must be what one plain forward gives it."""
    _, _, m = pair("t5")
    with torch.no_grad():
        out = m.generate(**batch(), max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
        sequences = out.sequences  # (4, 6): two per prompt, each starting with the start token
        inputs = {k: v.repeat_interleave(2, dim=0) for k, v in batch().items()}
        log_probs = m(**inputs, decoder_input_ids=sequences[:, :-1]).logits.log_softmax(-1)
        scores = log_probs.gather(-1, sequences[:, 1:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_checkpoints_load_in_peft_and_back(tmp_path, projection):
    base, p, m = pair("bart", 3, prefix_projection=projection)
    decoder_input_ids = labels()
    m.save_pretrained(tmp_path / "mini")
    p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    m2 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    with torch.no_grad():
        ours = m(**batch(), decoder_input_ids=decoder_input_ids).logits
        torch.testing.assert_close(p2(**batch(), decoder_input_ids=decoder_input_ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(m2(**batch(), decoder_input_ids=decoder_input_ids).logits, ours, atol=1e-5, rtol=0)
    p.save_pretrained(tmp_path / "peft")
    m3 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(m3(**batch(), decoder_input_ids=decoder_input_ids).logits,
                                   p(**batch(), decoder_input_ids=decoder_input_ids).logits, atol=1e-5, rtol=0)


def test_what_the_cache_route_refuses():
    with pytest.raises(ValueError, match="every decoder layer gets a prefix"):
        minipeft.get_peft_model(tiny("t5"), minipeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2,
                                                                        target_modules=["SelfAttention"]))
    torch.manual_seed(0)
    uneven = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0))
    with pytest.raises(ValueError, match="2 encoder and 3 decoder layers"):
        minipeft.get_peft_model(uneven, minipeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    _, _, m = pair("t5")
    m.get_base_model().gradient_checkpointing_enable()
    m.eval()
    m(**batch(), labels=labels()).loss.backward()  # no checkpointing in eval mode: it works
    m.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        m(**batch(), labels=labels())


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_without_a_cache_equals_generate_with_one(kind):
    """With use_cache=False the cache minipeft makes for a call is not handed back to generate, which
    would feed it in again with the whole decoder input (every token cached twice)."""
    _, _, m = pair(kind)
    settings = dict(**batch(), max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached, uncached = m.generate(**settings), m.generate(**settings, use_cache=False)
        assert m(**batch(), decoder_input_ids=labels(), use_cache=False).cache is None  # as the bare model
    assert torch.equal(uncached.sequences, cached.sequences)
    for a, b in zip(uncached.logits, cached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Beam search reorders any cache it finds in the output, even None: there is none, as from the bare model
    assert "past_key_values" not in m(**batch(), decoder_input_ids=labels(), use_cache=False)
    beams = dict(**batch(), max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(m.generate(**beams, use_cache=False), m.generate(**beams))


def test_a_decoder_mask_is_widened_when_bart_derives_its_decoder_input():
    """BART shifts input_ids into the decoder input when none is given; the decoder mask is of those
    tokens and gets the prefix's columns, as in peft."""
    _, p, m = pair("bart")
    inputs = batch()
    decoder_mask = inputs["attention_mask"].clone()
    with torch.no_grad():
        ours = m(**inputs, decoder_attention_mask=decoder_mask).logits
        theirs = p(**inputs, decoder_attention_mask=decoder_mask).logits
        explicit = m(**inputs, decoder_input_ids=transformers.models.bart.modeling_bart.shift_tokens_right(
            inputs["input_ids"], 1, 2), decoder_attention_mask=decoder_mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, explicit, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decoder_attention_mask has 5 columns"):
        m(**inputs, decoder_input_ids=labels(), decoder_attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_static_caches_and_decoders_that_refuse_a_prefilled_cache_are_refused():
    _, _, m = pair("t5")
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        m.generate(**batch(), max_new_tokens=3, cache_implementation="static")
    torch.manual_seed(0)
    prophetnet = transformers.ProphetNetForConditionalGeneration(transformers.ProphetNetConfig(
        vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=48, decoder_ffn_dim=48, num_encoder_layers=2,
        num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2))
    with pytest.raises(ValueError, match="with a prefilled cache, as prefix tuning runs it"):
        minipeft.get_peft_model(prophetnet, minipeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))

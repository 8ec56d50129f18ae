"""Prompt tuning on encoder-decoder models (T5, BART): the prompt goes in front of the encoder's
input only. Checked against peft (logits, loss, gradients, generation, checkpoints both ways)
and against the model run by hand with the prompt in its encoder's input."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from tests.models import VOCAB
from tests.models import padded_batch as batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N_VIRTUAL = 3


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    if kind == "bart":
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                                      decoder_ffn_dim=48, max_position_embeddings=64)
        return transformers.BartForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def pair(kind: str):
    """(peft model, minipeft model) on one base model, both holding the same random prompt."""
    base = tiny(kind)
    config = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VIRTUAL)
    p = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(**config))
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.PromptTuningConfig(**config))
    with torch.no_grad():
        p.prompt_encoder["default"].embedding.weight.normal_()
        m.prompt_encoder["default"].embedding.weight.copy_(p.prompt_encoder["default"].embedding.weight)
    return p, m


def labels(length: int = 4) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_logits_loss_and_gradients_match_peft(kind):
    p, m = pair(kind)
    # peft sizes the table for both stacks (2n rows) and uses the first n: so does minipeft.
    assert m.prompt_encoder["default"].embedding.weight.shape == (2 * N_VIRTUAL, 32)
    out_p, out_m = p(**batch(), labels=labels()), m(**batch(), labels=labels())
    torch.testing.assert_close(out_m.logits, out_p.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_m.loss, out_p.loss, atol=1e-5, rtol=0)
    out_p.loss.backward()
    out_m.loss.backward()
    grad_m = m.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(grad_m, p.prompt_encoder["default"].embedding.weight.grad, atol=1e-5, rtol=0)
    assert grad_m[:N_VIRTUAL].abs().sum() > 0 and not grad_m[N_VIRTUAL:].any()  # the decoder's rows stay unused
    assert [n for n, t in m.named_parameters() if t.requires_grad] == ["prompt_encoder.default.embedding.weight"]


def test_the_encoder_sees_the_prompt_in_front_and_the_decoder_attends_to_it():
    """Against the model run by hand: encoder on [P; E[x]] with the mask widened by n ones,
    decoder cross-attending to those n + T states under the same widened mask."""
    _, m = pair("t5")
    base = m.get_base_model()
    inputs = batch()
    decoder_ids = labels()
    with torch.no_grad():
        prompt = m.prompt_encoder["default"].embedding.weight[:N_VIRTUAL]
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(2, N_VIRTUAL, dtype=torch.long), inputs["attention_mask"]], dim=1)
        with m.disable_adapter():
            expected = base(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = m(**inputs, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_generate_matches_peft_step_by_step(kind):
    """generate() runs the encoder by itself before decoding; the hook on the encoder still adds
    the prompt, and the mask reaching cross-attention is widened at every step."""
    p, m = pair(kind)
    for model in (p, m):
        model.get_base_model().generation_config.eos_token_id = None  # always generate every token
    settings = dict(**batch(), max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out_p, out_m = p.generate(**settings), m.generate(**settings)
        through_base = m.get_base_model().generate(**settings)  # the hooks sit on the base model
        with m.disable_adapter():
            plain = m.generate(**settings)
    assert torch.equal(out_m.sequences, out_p.sequences)
    for step_m, step_p, step_base in zip(out_m.logits, out_p.logits, through_base.logits):
        torch.testing.assert_close(step_m, step_p, atol=1e-5, rtol=0)
        torch.testing.assert_close(step_base, step_m, atol=0, rtol=0)
    assert not torch.allclose(plain.logits[0], out_m.logits[0])  # and the prompt does change them


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_checkpoints_load_in_peft_and_back(kind, tmp_path):
    p, m = pair(kind)
    inputs = dict(**batch(), labels=labels())
    m.save_pretrained(tmp_path / "mini")
    p2 = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "mini")
    torch.testing.assert_close(p2(**inputs).logits, m(**inputs).logits, atol=1e-5, rtol=0)

    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(tiny(kind), tmp_path / "peft")
    torch.testing.assert_close(m2(**inputs).logits, p(**inputs).logits, atol=1e-5, rtol=0)


def test_disable_delete_and_unload_give_the_base_model_back():
    base = tiny("t5")
    inputs = dict(**batch(), labels=labels())
    with torch.no_grad():
        expected = base(**inputs).logits
    _, m = pair("t5")
    m.add_adapter("second", minipeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    with torch.no_grad(), m.disable_adapter():
        torch.testing.assert_close(m(**inputs).logits, expected, atol=0, rtol=0)
    m.set_adapter("second")
    with torch.no_grad():
        second = m(**inputs).logits
    m.delete_adapter("default")  # its encoder hook goes with it; the second prompt alone stays in
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs).logits, second, atol=0, rtol=0)
        torch.testing.assert_close(m.unload()(**inputs).logits, expected, atol=0, rtol=0)


def test_the_model_config_alone_makes_an_encoder_decoder_model():
    """Without a task type the model's own config says it is an encoder-decoder: the prompt still
    goes to the encoder, from a table of one row block (peft's size when no task names two stacks)."""
    m = minipeft.get_peft_model(tiny("t5"), minipeft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL))
    _, seq2seq = pair("t5")
    assert m.prompt_encoder["default"].embedding.weight.shape == (N_VIRTUAL, 32)
    with torch.no_grad():
        seq2seq.prompt_encoder["default"].embedding.weight[:N_VIRTUAL] = m.prompt_encoder["default"].embedding.weight
        inputs = dict(**batch(), labels=labels())
        torch.testing.assert_close(m(**inputs).logits, seq2seq(**inputs).logits, atol=0, rtol=0)


def test_seq2seq_task_on_a_model_without_an_encoder_is_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    config = minipeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no get_encoder\(\) that returns one"):
        minipeft.get_peft_model(gpt2, config)


def test_text_init_fills_both_row_blocks_and_warns_about_the_n_the_encoder_uses():
    """peft's rule: the text's ids, repeated or cut to the 2n rows of the table; only the first n
    reach the encoder, so a text longer than n is cut for the prompt, and the warning says so."""
    base = tiny("t5")
    ids = [5, 6, 7, 8, 9]
    config = minipeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N_VIRTUAL,
                                         prompt_tuning_init="TEXT", prompt_tuning_init_text="five words of text",
                                         tokenizer=lambda text: ids)
    with pytest.warns(UserWarning, match=r"has 5 tokens but num_virtual_tokens=3: only the first 3 are used"):
        m = minipeft.get_peft_model(base, config)
    table = base.get_input_embeddings().weight
    torch.testing.assert_close(m.prompt_encoder["default"].embedding.weight, table[[5, 6, 7, 8, 9, 5]])

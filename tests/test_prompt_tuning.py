"""Prompt tuning: parity with peft on tiny transformers models, generation with a KV cache,
checkpoints both ways, text initialisation, training, and the errors for bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import minipeft
from tests.models import greedy_without_cache
from tests.models import padded_batch as batch
from minipeft import PromptTuningConfig, PromptTuningInit

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, attn_implementation="sdpa")
        return transformers.BertForSequenceClassification(cfg).eval()
    raise ValueError(kind)


def pair(kind: str, **config):
    """(peft model, minipeft model) on one base model, minipeft holding peft's prompt (and head)."""
    base = tiny(kind)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    p = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task, **config))
    m = minipeft.get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type=task, **config))
    with torch.no_grad():
        p.prompt_encoder["default"].embedding.weight.normal_()
    # peft keeps the user's model at ``base_model`` for prompt learning (and aliases its word
    # embeddings); minipeft keeps it at ``base_model.model`` for every method. Past that prefix,
    # every name (prompt encoder, saved classifier copy, base weights) is peft's: strict load.
    state = {k.replace("base_model.", "base_model.model.", 1): v for k, v in p.state_dict().items()
             if k != "word_embeddings.weight"}
    m.load_state_dict(state, strict=True)
    return p, m


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_outputs_loss_and_grads_match_peft(kind):
    p, m = pair(kind, num_virtual_tokens=3)
    inputs = batch()
    labels = inputs["input_ids"] if kind != "bert" else torch.tensor([0, 1])
    if kind == "bert":
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    out_p, out_m = p(**inputs, labels=labels), m(**inputs, labels=labels)
    torch.testing.assert_close(out_m.logits, out_p.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_m.loss, out_p.loss, atol=1e-5, rtol=0)
    out_p.loss.backward()
    out_m.loss.backward()
    grad_p = p.prompt_encoder["default"].embedding.weight.grad
    grad_m = m.prompt_encoder["default"].embedding.weight.grad
    torch.testing.assert_close(grad_m, grad_p, atol=1e-5, rtol=0)
    assert m.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()


def test_bert_pools_the_first_virtual_token_like_peft():
    """BERT's pooler reads index 0, which after prepending is virtual token 0 (peft does the same)."""
    _, m = pair("bert", num_virtual_tokens=2)
    with torch.no_grad():
        out = m(**batch(), output_hidden_states=True)
        prompt0 = m.prompt_encoder["default"].embedding.weight[0]
        bert = m.get_base_model().bert
        first = out.hidden_states[0][:, 0]  # embeddings output at index 0
        expected = bert.embeddings.LayerNorm(prompt0 + bert.embeddings.position_embeddings.weight[0]
                                             + bert.embeddings.token_type_embeddings.weight[0])
    torch.testing.assert_close(first, expected.expand_as(first), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_kv_cache_adds_the_prompt_once(kind):
    _, m = pair(kind, num_virtual_tokens=4)
    m.get_base_model().generation_config.eos_token_id = None  # always generate every token
    ids = batch(padded=False)["input_ids"]
    with torch.no_grad():
        cached = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        reference = greedy_without_cache(m, ids, 6)
        base = m.get_base_model().generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        with m.disable_adapter():
            plain = greedy_without_cache(m, ids, 6)
    assert torch.equal(cached, reference)
    assert torch.equal(base, reference)  # the hook sits on the base model: its generate() uses the prompt too
    assert not torch.equal(plain, reference)  # and the prompt does change what is generated


def test_a_static_cache_is_refused_saying_why():
    # generate() builds the 4-D mask of a static cache itself, sized for the real tokens.
    _, m = pair("llama", num_virtual_tokens=3)
    ids = batch(padded=False)["input_ids"]
    with pytest.raises(ValueError, match=r"virtual tokens do not fit a static cache .* Use the default dynamic cache"):
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, cache_implementation="static")


def test_position_ids_are_shifted_behind_the_prompt():
    _, m = pair("llama", num_virtual_tokens=3)
    inputs = batch(padded=False)
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs, position_ids=positions).logits, m(**inputs).logits, atol=1e-6, rtol=0)


def test_disable_adapter_and_unload_give_the_base_model():
    base = tiny("llama")
    expected = base(**batch()).logits
    m = minipeft.get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with m.disable_adapter():
        torch.testing.assert_close(m(**batch()).logits, expected)
    assert m(**batch()).logits.shape[1] == 9  # the prompt is back (n + T positions)
    unloaded = m.unload()
    torch.testing.assert_close(unloaded(**batch()).logits, expected)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_checkpoints_load_in_peft_and_back(kind, tmp_path):
    p, m = pair(kind, num_virtual_tokens=3)
    inputs = batch()
    m.save_pretrained(tmp_path / "mini")
    config = json.loads((tmp_path / "mini" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 32
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "mini" / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (3, 32)
    p2 = peft.PeftModel.from_pretrained(tiny(kind), tmp_path / "mini")
    torch.testing.assert_close(p2(**inputs).logits, m(**inputs).logits, atol=1e-5, rtol=0)

    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(tiny(kind), tmp_path / "peft")
    torch.testing.assert_close(m2(**inputs).logits, p(**inputs).logits, atol=1e-5, rtol=0)
    assert not any(t.requires_grad for t in m2.parameters())  # loaded for inference


def test_training_prompt_tuning_lowers_the_loss():
    torch.manual_seed(0)
    # Wider initial weights than the default 0.02: a near-uniform random model ignores any prompt.
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    m = minipeft.get_peft_model(transformers.LlamaForCausalLM(cfg), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                        num_virtual_tokens=8))
    m.train()
    ids = torch.arange(16).repeat(4, 1) % VOCAB  # a pattern the prompt can steer the model towards
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert [t.shape for t in trainable] == [torch.Size([8, 32])]
    opt = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(20):
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# -- initialisation from text -----------------------------------------------------------------
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "great", "movie", "bad", "film", "the"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def text_model(n, **kwargs):
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="great movie bad", **kwargs)
    return minipeft.get_peft_model(tiny("llama"), config)


def test_text_init_with_token_ids_outside_the_model_is_refused():
    with pytest.raises(ValueError, match=r"the token id 999, outside the model's 64 input embeddings: tokenizer and "
                                         r"model differ"):
        text_model(3, tokenizer=lambda text: [1, 999])


def test_text_init_from_tokenizer_object_path_or_callable(tmp_path):
    tok = word_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    for kwargs in (dict(tokenizer=tok), dict(tokenizer_name_or_path=str(tmp_path)),
                   dict(tokenizer=lambda text: [1, 2, 3])):
        m = text_model(5, **kwargs)
        table = m.get_base_model().get_input_embeddings().weight
        # "great movie bad" = ids 1 2 3, repeated to fill five tokens.
        torch.testing.assert_close(m.prompt_encoder["default"].embedding.weight, table[[1, 2, 3, 1, 2]])
        assert m.peft_config["default"].prompt_tuning_init == PromptTuningInit.TEXT
        assert "tokenizer" not in m.peft_config["default"].to_dict()  # runtime only, never saved


def test_text_init_ignores_the_padding_and_truncation_a_tokenizer_json_carries(tmp_path):
    # A tokenizer.json may pad every input to a fixed length (all-MiniLM-L6-v2's pads to 128)
    # and truncate: the prompt starts from the text's own tokens, repeated, as in peft.
    tok = word_tokenizer()
    tok.enable_padding(length=8, pad_id=5, pad_token="the")
    tok.enable_truncation(max_length=2)
    tok.save(str(tmp_path / "tokenizer.json"))
    for kwargs in (dict(tokenizer=tok), dict(tokenizer_name_or_path=str(tmp_path))):
        m = text_model(5, **kwargs)
        table = m.get_base_model().get_input_embeddings().weight
        torch.testing.assert_close(m.prompt_encoder["default"].embedding.weight, table[[1, 2, 3, 1, 2]])
    assert tok.padding is not None and tok.truncation is not None  # the caller's object is left as it was
    # tokenizers' convenience classes (ByteLevelBPETokenizer, ...) wrap a Tokenizer: unwrapped.
    from tokenizers.implementations import BaseTokenizer

    m = text_model(5, tokenizer=BaseTokenizer(tok))
    table = m.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(m.prompt_encoder["default"].embedding.weight, table[[1, 2, 3, 1, 2]])


def test_text_longer_than_the_prompt_is_cut_with_a_warning():
    with pytest.warns(UserWarning, match="only the first 2 are used"):
        m = text_model(2, tokenizer=word_tokenizer())
    table = m.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(m.prompt_encoder["default"].embedding.weight, table[[1, 2]])


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -3, None, 2.5])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ValueError, match="num_virtual_tokens must be (a positive integer|an integer)"):
        PromptTuningConfig(num_virtual_tokens=n)


@pytest.mark.parametrize("dim", [0, True, 2.5])
def test_token_dim_must_be_a_positive_integer(dim):
    # True is an int to Python; as a width it would read as 1
    with pytest.raises(ValueError, match="token_dim must be (a positive integer|an integer or None)"):
        PromptTuningConfig(num_virtual_tokens=2, token_dim=dim)


def test_text_init_needs_text_and_tokenizer():
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.warns(UserWarning, match="prompt_tuning_init_text is ignored with prompt_tuning_init='RANDOM'"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init_text="great movie")  # TEXT forgotten
    with pytest.raises(ValueError, match="needs a tokenizer"):
        minipeft.get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                                                   prompt_tuning_init_text="hi"))
    with pytest.raises(ValueError, match="not one of: RANDOM, TEXT, SAMPLE_VOCAB"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        text_model(2, tokenizer_name_or_path="/nonexistent/tokenizer")


def test_token_dim_must_match_the_embeddings():
    with pytest.raises(ValueError, match="token_dim=16 does not match the model: the input embedding Embedding has width 32"):
        minipeft.get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=2, token_dim=16))


class NoEmbeddingGetter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        return self.head(h)


def test_model_without_input_embeddings_needs_a_name():
    with pytest.raises(ValueError, match=r"has no get_input_embeddings\(\).*input_embeddings_name.*'tok'"):
        minipeft.get_peft_model(NoEmbeddingGetter(), PromptTuningConfig(num_virtual_tokens=2))
    m = minipeft.get_peft_model(NoEmbeddingGetter(), PromptTuningConfig(num_virtual_tokens=2, input_embeddings_name="tok"))
    assert m(input_ids=torch.zeros(1, 5, dtype=torch.long)).shape == (1, 7, VOCAB)
    with pytest.raises(ValueError, match="input_embeddings_name='nope' is not a module"):
        minipeft.get_peft_model(NoEmbeddingGetter(), PromptTuningConfig(num_virtual_tokens=2, input_embeddings_name="nope"))


def test_model_without_inputs_embeds_argument_is_refused():
    class IdsOnly(NoEmbeddingGetter):
        def forward(self, input_ids):
            return self.head(self.tok(input_ids))

        def get_input_embeddings(self):
            return self.tok

    with pytest.raises(ValueError, match="has no inputs_embeds argument"):
        minipeft.get_peft_model(IdsOnly(), PromptTuningConfig(num_virtual_tokens=2))


def test_text_initialised_adapter_reloads_without_its_tokenizer(tmp_path):
    """The tokenizer is runtime-only: a saved TEXT-init adapter must load without one."""
    m = text_model(3, tokenizer=word_tokenizer())
    m.save_pretrained(tmp_path)
    reloaded = minipeft.PeftModel.from_pretrained(tiny("llama"), tmp_path)
    torch.testing.assert_close(reloaded(**batch()).logits, m(**batch()).logits)


def test_inject_adapter_in_model_refuses_virtual_token_methods():
    from minipeft import inject_adapter_in_model
    from tests.models import TinyNet

    with pytest.raises(ValueError, match="use get_peft_model"):
        inject_adapter_in_model(minipeft.PromptTuningConfig(num_virtual_tokens=4), TinyNet())


def test_deleting_the_last_prompt_adapter_lets_lora_merge():
    base = tiny("llama")
    expected = base(**batch()).logits
    m = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    m.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    lora_out = m(**batch()).logits
    m.delete_adapter("prompt")
    assert "prompt_encoder" not in m._modules and not m.get_base_model()._forward_pre_hooks
    torch.testing.assert_close(m(**batch()).logits, lora_out)
    merged = m.merge_and_unload()
    torch.testing.assert_close(merged(**batch()).logits, lora_out, atol=1e-5, rtol=0)
    assert not torch.allclose(lora_out, expected)


def test_merge_and_unload_merges_the_active_lora_beside_an_inactive_prompt_adapter():
    # The prompt adapter is dropped, as an unmerged adapter is; it used to refuse the whole merge and
    # advise unload(), which throws the LoRA adapter away too.
    base = tiny("llama")
    m = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    m.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    lora_out = m(**batch()).logits
    m.set_adapter("prompt")
    with pytest.raises(TypeError, match=r"adapter\(s\) \['prompt'\] add virtual tokens, which are not weights"):
        m.merge_and_unload()
    m.set_adapter("default")
    merged = m.merge_and_unload()
    assert not merged._forward_pre_hooks and not merged._forward_hooks  # the prompt's hooks went with it
    torch.testing.assert_close(merged(**batch()).logits, lora_out, atol=1e-5, rtol=0)


def test_model_without_attention_mask_argument():
    class NoMask(NoEmbeddingGetter):
        def forward(self, input_ids=None, inputs_embeds=None):
            return self.head(self.tok(input_ids) if inputs_embeds is None else inputs_embeds)

        def get_input_embeddings(self):
            return self.tok

    m = minipeft.get_peft_model(NoMask(), PromptTuningConfig(num_virtual_tokens=2))
    assert m(input_ids=torch.zeros(1, 5, dtype=torch.long)).shape == (1, 7, VOCAB)


@pytest.mark.parametrize("task, padded", [("CAUSAL_LM", True), ("TOKEN_CLS", True), ("SEQ_CLS", False), (None, True)])
def test_labels_are_padded_by_task_type(task, padded):
    """Labels as long as the input: token labels for CAUSAL_LM / TOKEN_CLS (and, by shape, with no
    task type); for SEQ_CLS they are per-sequence targets (e.g. multi-label) and stay as given."""
    seen = {}

    class Recorder(NoEmbeddingGetter):
        def forward(self, input_ids=None, inputs_embeds=None, labels=None):
            seen["labels"] = labels
            return self.head(inputs_embeds)

        def get_input_embeddings(self):
            return self.tok

    m = minipeft.get_peft_model(Recorder(), PromptTuningConfig(num_virtual_tokens=2, task_type=task))
    labels = torch.ones(2, 5, dtype=torch.long)
    m(input_ids=torch.zeros(2, 5, dtype=torch.long), labels=labels)
    want = torch.cat([torch.full((2, 2), -100), labels], dim=1) if padded else labels
    torch.testing.assert_close(seen["labels"], want)


@pytest.mark.parametrize("task_type", ["SEQ_2_SEQ_LM", None])
def test_prefix_tuning_takes_the_cache_route_on_an_encoder_decoder_whatever_the_task_type_says(task_type):
    # Without task_type the model's own config says it (tests/test_prefix_tuning_encoder_decoder.py
    # checks that route against peft).
    from minipeft.tuners.prefix_tuning_seq2seq import DecoderCachePrefix
    from tests.models import tiny_transformers_model

    config = minipeft.PrefixTuningConfig(num_virtual_tokens=4, task_type=task_type)
    model = minipeft.get_peft_model(tiny_transformers_model("t5"), config)
    assert isinstance(model.prompt_encoder["default"], DecoderCachePrefix)
    assert model.peft_config["default"].num_transformer_submodules == 2

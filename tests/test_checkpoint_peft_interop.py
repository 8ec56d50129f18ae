"""peft's checkpoint extras and state-dict functions, checked against peft itself.

1. Embedding layers in peft's files. peft's ``save_embedding_layers="auto"`` (its default) writes
   the frozen table of an embedding LoRA targets (``<layer>.base_layer.weight``), and every
   embedding layer when the vocabulary was resized; ``save_embedding_layers=True`` asks for them
   always. peft's loader puts those tensors back into the model (``load_state_dict(strict=False)``).
   minipeft must load such files, into the same places, with the same logits and base weights.
2. ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` take peft's arguments in peft's
   order, and set returns what peft returns (``missing_keys`` / ``unexpected_keys``).

Tiny Llama models come from configs (no hub). Adapter tensors are perturbed away from their
initial values, so a tensor loaded into the wrong place changes the logits.
"""

import copy
import inspect
import warnings

import peft
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import minipeft
from minipeft import checkpoint

VOCAB = 64
WEIGHTS = "adapter_model.safetensors"


def llama(tied=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def perturb(model, seed=0):
    """Move every adapter tensor (LoRA, trained copies, token rows) away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, ids=None):
    ids = torch.tensor([[1, 5, 9, 2, 63, 7], [3, 3, 8, 1, 0, 2]]) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_keys(folder):
    return set(safetensors.torch.load_file(f"{folder}/{WEIGHTS}"))


def peft_model(base, cls="LoraConfig", **kwargs):
    model = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs))
    perturb(model)
    return model.eval()


# -- 1. peft's files with embedding layers ----------------------------------------------------------
EMBEDDING_TARGETS = [
    (False, ["embed_tokens", "q_proj"], "base_model.model.model.embed_tokens.base_layer.weight"),
    (False, ["lm_head", "q_proj"], "base_model.model.lm_head.base_layer.weight"),
    (True, ["embed_tokens", "q_proj"], "base_model.model.model.embed_tokens.base_layer.weight"),
    (True, ["lm_head", "q_proj"], "base_model.model.lm_head.base_layer.weight"),
]


@pytest.mark.parametrize("tied,targets,base_key", EMBEDDING_TARGETS)
def test_loads_peft_lora_on_embedding_layers(tmp_path, tied, targets, base_key):
    """peft's default save writes the targeted embedding's frozen table; minipeft loads the file."""
    base = llama(tied)
    theirs = peft_model(base, r=4, lora_alpha=8, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it saves the embedding layer
        theirs.save_pretrained(tmp_path)
    assert base_key in saved_keys(tmp_path)  # the situation under test: peft wrote the base table

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved table equals the base's: nothing to warn about
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)

    # load_adapter (a second adapter on a model that holds one) reads the same file.
    holder = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=2, target_modules=["v_proj"]))
    holder.load_adapter(tmp_path, adapter_name="from_peft")
    holder.set_adapter("from_peft")
    torch.testing.assert_close(logits(holder), logits(theirs), rtol=0, atol=1e-6)

    # minipeft's own files stay adapter-only (peft loads them, tested in test_checkpoint_peft_parity).
    ours.save_pretrained(tmp_path / "ours")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path) - {base_key}


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_loads_peft_adapters_started_by_other_inits(tmp_path, init):
    """The init decides where training started; the file holds where it ended, and loads (an
    EVA adapter: its config and its eva_config too)."""
    base = llama()
    extra = {"eva_config": peft.EvaConfig()} if init == "eva" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: EVA's init needs initialize_lora_eva_weights
        theirs = peft_model(base, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **extra)
        theirs.save_pretrained(tmp_path)
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    assert ours.peft_config["default"].init_lora_weights == init
    if init == "eva":
        assert ours.peft_config["default"].eva_config == minipeft.EvaConfig()


def test_saved_base_table_replaces_the_models_as_in_peft(tmp_path):
    """A table saved with the adapter that differs from the base model's (an embedding changed
    during fine-tuning) goes into the base model in peft; minipeft does the same, and warns."""
    base = llama()
    theirs = peft_model(base, r=4, target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.base_layer.weight[3].add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
        peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)

    with pytest.warns(UserWarning, match=r"base-model embedding weights that differ .*embed_tokens.base_layer.weight"):
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    table = ours.base_model.model.model.embed_tokens.base_layer.weight
    assert torch.equal(table, peft_loaded.base_model.model.model.embed_tokens.base_layer.weight)
    assert not torch.equal(table, base.model.embed_tokens.weight)
    torch.testing.assert_close(logits(ours), logits(peft_loaded), rtol=0, atol=1e-6)


def resized_setup(tmp_path, tied, **lora):
    """peft's own "auto" case for a resized vocabulary: the base model is saved, loaded, resized
    by 4 tokens and fine-tuned; peft notices the resize (against base_model_name_or_path) and
    saves the embedding tables. Returns the peft model and a function giving fresh resized bases."""
    llama(tied).save_pretrained(tmp_path / "base")

    def fresh(resize=True):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        if resize:
            model.resize_token_embeddings(VOCAB + 4, mean_resizing=False)
        return model.eval()

    torch.manual_seed(1)
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, **lora))
    perturb(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "adapter")
    return theirs.eval(), fresh


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lora", [
    dict(target_modules=["embed_tokens", "q_proj"]),
    dict(target_modules=["q_proj"]),
    dict(target_modules=["q_proj"], trainable_token_indices=[64, 65]),
], ids=["lora-embedding", "lora", "trainable-tokens"])
def test_resized_vocabulary_loads_into_a_resized_base_like_peft(tmp_path, tied, lora):
    theirs, fresh = resized_setup(tmp_path, tied, **lora)
    keys = saved_keys(tmp_path / "adapter")
    assert any("embed_tokens" in k and "lora" not in k and "delta" not in k for k in keys), keys

    torch.manual_seed(2)  # new rows drawn differently from the ones trained: the file must supply them
    target = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "adapter")
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "adapter")
    ids = torch.tensor([[1, 64, 9, 65, 66, 7]])
    torch.testing.assert_close(logits(ours, ids), logits(peft_loaded, ids), rtol=0, atol=1e-5)
    # The base tables (new rows included) are the ones peft loads, under the same names.
    peft_sd = peft_loaded.state_dict()
    for key, value in ours.state_dict().items():
        if ("embed_tokens" in key or "lm_head" in key) and "lora_" not in key:
            assert torch.equal(value, peft_sd[key]), key


def test_resized_vocabulary_into_a_base_not_resized_is_refused(tmp_path):
    theirs, fresh = resized_setup(tmp_path, False, target_modules=["embed_tokens", "q_proj"])
    base = fresh(resize=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = (r"shape mismatch for 'base_model.model.model.embed_tokens.base_layer.weight': "
                r"checkpoint has \(68, 16\), the model expects \(64, 16\).*resize_token_embeddings")
    with pytest.raises(ValueError, match=expected):
        minipeft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert base.state_dict().keys() == before.keys()  # the failed load took its adapter out again
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("tied,cls,kwargs", [
    (False, "LoraConfig", dict(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    (False, "LoraConfig", dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    (True, "LoraConfig", dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2])),
    (False, "TrainableTokensConfig", dict(token_indices=[1, 2])),
    (True, "TrainableTokensConfig", dict(token_indices=[1, 2])),
    (True, "LoraConfig", dict(r=4, target_modules=["q_proj"])),
])
def test_loads_peft_files_saved_with_save_embedding_layers_true(tmp_path, tied, cls, kwargs):
    """Every spelling peft writes for the embedding layers (base tables, the trained copy of
    modules_to_save a second time, trainable tokens one level down as token_adapter)."""
    base = llama(tied)
    theirs = peft_model(base, cls, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
        with_tables = saved_keys(tmp_path)
        assert with_tables != set(peft.get_peft_model_state_dict(theirs, save_embedding_layers=False))
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)


def test_two_different_values_for_one_tensor_are_refused(tmp_path):
    """peft saves a trained copy twice (``embed_tokens.weight`` and ``embed_tokens.modules_to_save.weight``);
    a file where they differ was edited or damaged."""
    base = llama()
    theirs = peft_model(base, r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    tensors = safetensors.torch.load_file(tmp_path / WEIGHTS)
    tensors["base_model.model.model.embed_tokens.modules_to_save.weight"] += 1.0
    safetensors.torch.save_file(tensors, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=r"two different values .*embed_tokens"):
        minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_other_base_model_keys_stay_refused():
    """Only the embedding layers peft saves are read into the base model; any other base key is unexpected."""
    ours = minipeft.get_peft_model(llama(), minipeft.LoraConfig(r=4, target_modules=["q_proj"]))
    state = minipeft.get_peft_model_state_dict(ours)
    state["base_model.model.model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 16)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): 'base_model.model.model.layers.0.self_attn.k_proj"):
        minipeft.set_peft_model_state_dict(ours, state)


# -- 2. the state-dict functions ----------------------------------------------------------------
def test_signatures_take_peft_arguments_in_peft_order():
    for name in ("get_peft_model_state_dict", "set_peft_model_state_dict"):
        ours = list(inspect.signature(getattr(minipeft, name)).parameters)
        theirs = list(inspect.signature(getattr(peft, name)).parameters)
        assert ours == theirs, name


def pair(**kwargs):
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**kwargs))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    ours.add_adapter("b", minipeft.LoraConfig(r=2, target_modules=["v_proj"]))
    perturb(theirs)
    for name in ("default", "b"):
        minipeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), name)
    return theirs, ours


def test_get_takes_the_tensors_from_a_given_state_dict():
    """The ZeRO-3 / FSDP pattern: the gathered full state dict, not the model's (sharded) tensors."""
    theirs, ours = pair(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    gathered = {k: v + 1.0 if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    peft_gathered = {k: v + 1.0 if v.is_floating_point() else v for k, v in theirs.state_dict().items()}
    for args, kwargs in [((gathered,), {}), ((), {"state_dict": gathered}), ((gathered, "b"), {}),
                         ((), {"state_dict": gathered, "adapter_name": "b"})]:
        mine = minipeft.get_peft_model_state_dict(ours, *args, **kwargs)
        name = kwargs.get("adapter_name", args[1] if len(args) > 1 else "default")
        expected = peft.get_peft_model_state_dict(theirs, peft_gathered, adapter_name=name)
        assert mine.keys() == expected.keys()
        assert all(torch.equal(mine[k], expected[k]) for k in mine), (args, kwargs)
    with pytest.raises(KeyError, match=r"lacks 4 tensor\(s\) of adapter 'b'"):
        minipeft.get_peft_model_state_dict(ours, {}, adapter_name="b")


def test_get_takes_peft_keywords_and_refuses_a_name_in_the_state_dicts_place():
    theirs, ours = pair(r=4, target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"state_dict must be the model's full state dict .* 'b'; the adapter's name "
                                        r"goes to adapter_name="):
        minipeft.get_peft_model_state_dict(ours, "b")

    compiled = torch.compile(ours)  # compiles lazily, on the first call: never called here
    assert minipeft.get_peft_model_state_dict(compiled, unwrap_compiled=True).keys() == \
        peft.get_peft_model_state_dict(theirs).keys()
    assert minipeft.get_peft_model_state_dict(ours, save_embedding_layers=False).keys() == \
        peft.get_peft_model_state_dict(theirs, save_embedding_layers=False).keys()
    with pytest.raises(ValueError, match=r"save_embedding_layers=True: minipeft returns the adapter's tensors only"):
        minipeft.get_peft_model_state_dict(ours, save_embedding_layers=True)


def test_set_returns_what_peft_returns():
    theirs, ours = pair(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    state = peft.get_peft_model_state_dict(theirs, adapter_name="b")
    theirs_result = peft.set_peft_model_state_dict(theirs, state, "b")
    ours_result = minipeft.set_peft_model_state_dict(ours, state, "b")
    assert type(ours_result) is type(theirs_result)
    assert ours_result.unexpected_keys == theirs_result.unexpected_keys == []
    assert sorted(ours_result.missing_keys) == sorted(theirs_result.missing_keys)
    assert not any(".b." in k for k in ours_result.missing_keys)  # every tensor of adapter b was written


def test_set_ignore_mismatched_sizes_as_peft():
    theirs, ours = pair(r=4, target_modules=["q_proj"])
    bigger = peft.get_peft_model(llama(), peft.LoraConfig(r=8, target_modules=["q_proj"]))
    state = peft.get_peft_model_state_dict(bigger)
    with pytest.raises(ValueError, match="shape mismatch"):
        minipeft.set_peft_model_state_dict(ours, state)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        theirs_result = peft.set_peft_model_state_dict(theirs, state, ignore_mismatched_sizes=True)
    with pytest.warns(UserWarning, match=r"left out because ignore_mismatched_sizes=True"):
        ours_result = minipeft.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    assert sorted(ours_result.missing_keys) == sorted(theirs_result.missing_keys)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)


def test_set_refuses_tensors_on_the_meta_device():
    """A copy into a meta tensor does nothing; refused rather than silently lost."""
    ours = minipeft.get_peft_model(llama(), minipeft.LoraConfig(r=4, target_modules=["q_proj"]))
    state = minipeft.get_peft_model_state_dict(ours)
    ours.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        minipeft.set_peft_model_state_dict(ours, state, low_cpu_mem_usage=True)


def test_embedding_extras_name_peft_keys():
    """The key spellings of peft's save_embedding_layers, from the model's keys (unit view of the rule)."""
    ours = minipeft.get_peft_model(llama(True), minipeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                   trainable_token_indices=[1, 2]))
    extras, base = checkpoint.peft_embedding_extras(ours)
    assert base == {"base_model.model.model.embed_tokens.token_adapter.base_layer.weight",
                    "base_model.model.lm_head.token_adapter.base_layer.weight"}
    assert extras["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] == \
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"

"""LoRA's layer_replication (tuners/layer_replication.py): the deeper model, its outputs,
generation and checkpoints against peft's, the weights the copies share, and the refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minipeft
from minipeft import LoraConfig, get_peft_model
from tests.against_peft import assert_checkpoints_load_both_ways, seeded_pair
from tests.models import input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")
CONFIG = dict(r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids(batch=2, length=8)).logits


def test_the_replicated_model_computes_generates_and_saves_as_peft_does(tmp_path):
    base = tiny_transformers_model("llama")  # 2 layers -> 0 1 1
    theirs, ours = seeded_pair(base, "LoraConfig", CONFIG)
    for model in (theirs, ours):
        randomize_adapters(model)  # the same values in both (names in the same order)
    layers = ours.base_model.model.model.layers
    assert len(layers) == 3 and ours.base_model.model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]  # one KV-cache slot each
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=0)
    ids = input_ids(batch=1, length=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers: no attention mask given)
        generated = [m.generate(input_ids=ids, max_new_tokens=6, do_sample=False) for m in (theirs, ours)]
    assert torch.equal(generated[1], generated[0])
    assert_checkpoints_load_both_ways(base, theirs, ours, logits, tmp_path)


def test_copies_share_their_weights_and_train_their_own_adapters():
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(**CONFIG))
    layers = model.base_model.model.model.layers
    q1, q2 = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert q1.base_layer.weight is q2.base_layer.weight  # one frozen weight, two layers
    assert q1.lora_A["default"].weight is not q2.lora_A["default"].weight
    before = sum(p.numel() for p in tiny_transformers_model("llama").parameters())
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == before  # no weight copied
    randomize_adapters(model)
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert not torch.equal(q1.lora_B["default"].weight.grad, q2.lora_B["default"].weight.grad)


def test_merging_into_shared_weights_is_refused_and_unload_keeps_the_copies():
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(**CONFIG))
    randomize_adapters(model)
    before = logits(model)
    with pytest.raises(ValueError, match=r"shared by the copies of a replicated layer \(layer_replication\)"):
        model.merge_and_unload()
    copied = copy.deepcopy(model)  # the copy shares its weights as the model does: refused too
    with pytest.raises(ValueError, match="shared by the copies"):
        copied.merge_and_unload()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # nothing was merged
    # a layer that appears once (layer 0 here) is not refused, but the merge is all or nothing
    with pytest.raises(ValueError, match="so nothing was merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert len(unloaded.model.layers) == 3 and not any("lora" in n for n, _ in unloaded.named_parameters())


def test_replication_is_applied_once_undone_on_a_failed_injection_and_checked():
    base = tiny_transformers_model("llama")
    model = get_peft_model(base, LoraConfig(**CONFIG))
    model.add_adapter("second", LoraConfig(**{**CONFIG, "r": 2}))  # the same map: not replicated again
    assert len(model.base_model.model.model.layers) == 3
    with pytest.raises(ValueError, match=r"replicated by layer_replication=\[\[0, 2\], \[1, 2\]\] already"):
        model.add_adapter("third", LoraConfig(**{**CONFIG, "layer_replication": [[0, 2]]}))

    fresh = tiny_transformers_model("llama")
    with pytest.raises(ValueError, match="q_projj"):
        get_peft_model(fresh, LoraConfig(**{**CONFIG, "target_modules": ["q_projj"]}))
    assert len(fresh.model.layers) == 2 and fresh.config.num_hidden_layers == 2  # put back
    plain = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj"]))  # and nothing left marked
    randomize_adapters(plain)
    plain.merge_and_unload()
    with pytest.raises(ValueError, match=r"a range \[start, end\) of the model's 2 layers.*got \[1, 3\]"):
        get_peft_model(tiny_transformers_model("llama"), LoraConfig(**{**CONFIG, "layer_replication": [[1, 3]]}))
    with pytest.raises(ValueError, match=r"Sequential has no nn.ModuleList at model\(.model\)\*.layers"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))


def test_bert_layers_are_replicated_too(tmp_path):
    base = tiny_transformers_model("bert")
    config = dict(r=2, target_modules=["query", "value"], layer_replication=[[0, 2], [0, 1]])
    theirs, ours = seeded_pair(base, "LoraConfig", config)
    assert len(ours.base_model.model.bert.encoder.layer) == 3
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
    assert minipeft.LoraConfig.from_dict(ours.peft_config["default"].to_dict()).layer_replication == [[0, 2], [0, 1]]


def test_models_with_layer_types_and_gpt2_language_models_are_replicated():
    # transformers 5 reads config.layer_types[i] for layer i (sliding or full attention): it
    # follows the copies, so the forward and cached generation run on every copy.
    import transformers

    torch.manual_seed(0)
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=3,
        layer_types=["full_attention", "sliding_attention"])).eval()
    model = get_peft_model(qwen, LoraConfig(**CONFIG))
    assert model.base_model.model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = input_ids(batch=1, length=5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        uncached = ids
        for _ in range(4):  # the same tokens, each from a forward over the whole sequence
            uncached = torch.cat([uncached, model(input_ids=uncached).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, uncached)
    gpt2 = get_peft_model(tiny_transformers_model("gpt2"), LoraConfig(r=2, target_modules=["c_attn"],
                                                                      layer_replication=[[0, 2], [0, 2]]))
    assert len(gpt2.base_model.model.transformer.h) == 4  # (.transformer.h: peft finds no layers there)

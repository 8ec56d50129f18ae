"""Operations on a model with several adapters that could leave it in no consistent state, each
guarded: refused whole before anything changes, or made consistent first (as peft does). The
references are the same model before the call, a fresh model holding only the adapter that
should run, and peft doing the same sequence."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minipeft
from minipeft import LoraConfig, get_peft_model
from tests.models import input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def two_loras(library, base, **first):
    model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(r=2, target_modules=["q_proj"], **first),
                                   adapter_name="a")
    model.add_adapter("b", library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model


def test_a_refused_delete_of_a_merged_adapter_changes_nothing():
    # "a" also trains embed_tokens whole, a module met before the merged LoRA layers: the refusal
    # must come before that copy goes.
    model = two_loras(minipeft, tiny_transformers_model("llama"), modules_to_save=["embed_tokens"])
    model.merge_adapter()
    state, out = {k: v.clone() for k, v in model.state_dict().items()}, logits(model)
    with pytest.raises(ValueError, match=r"adapter 'a' is merged into the weights of .*; unmerge it before deleting"):
        model.delete_adapter("a")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)


def test_modules_to_save_over_another_adapters_wrapper_is_refused():
    # A copy of q_proj trained whole would copy adapter "a"'s LoRA with it (and save it as "b"'s).
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]), "a")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"modules_to_save names 'model.layers.0.self_attn.q_proj', where adapter\(s\) "
                                         r"\['a'\] already sit \(LoraLinear"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["q_proj"]))
    assert set(model.state_dict()) == keys and list(model.peft_config) == ["a"]


def test_set_adapter_unmerges_first_as_peft():
    base = tiny_transformers_model("llama")
    models = {library.__name__: two_loras(library, base) for library in (peft, minipeft)}
    models["minipeft"].load_state_dict(models["peft"].state_dict())
    for model in models.values():
        model.merge_adapter()
        with pytest.warns(UserWarning, match="merged"):
            model.set_adapter("b")
    alone = two_loras(minipeft, base)
    alone.load_state_dict(models["peft"].state_dict())
    alone.set_adapter("b")
    torch.testing.assert_close(logits(models["minipeft"]), logits(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(models["minipeft"]), logits(models["peft"]), atol=1e-5, rtol=0)


def test_what_set_requires_grad_chose_survives_adding_and_deleting_adapters_as_in_peft():
    base = tiny_transformers_model("llama")
    trains = {}
    for library in (peft, minipeft):
        model = two_loras(library, base)
        model.set_requires_grad("b")
        steps = [{n for n, p in model.named_parameters() if p.requires_grad}]
        model.add_adapter("c", library.LoraConfig(r=2, target_modules=["k_proj"]))
        steps.append({n for n, p in model.named_parameters() if p.requires_grad})
        model.delete_adapter("c")
        steps.append({n for n, p in model.named_parameters() if p.requires_grad})
        trains[library.__name__] = steps
    assert trains["minipeft"] == trains["peft"]
    assert any(".b." in n for n in trains["peft"][2])


def test_merging_while_adapter_layers_are_disabled_is_refused():
    # A disabled layer unmerges itself lazily, in forward order, which two layers sharing a
    # weight (trainable tokens on GPT-2's embedding and LoRA on its tied head) must not do.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_transformers_model("gpt2"),
                               LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[3, 5]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"adapter layers are disabled .*inside disable_adapter\(\)"):
            model.merge_adapter()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_status_judges_each_adapter_where_it_is_and_a_tied_head_by_its_embedding():
    base = tiny_transformers_model("llama")
    model = two_loras(minipeft, base)  # "b" on more layers than "a"
    model.merge_adapter(["b"])
    assert model.get_model_status().merged_adapters == ["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tied = get_peft_model(tiny_transformers_model("gpt2"), minipeft.TrainableTokensConfig(token_indices=[3, 5]))
    tied.merge_adapter()
    assert tied.get_model_status().merged_adapters == ["default"]
    prompt = get_peft_model(tiny_transformers_model("llama"), minipeft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="no layer status to report"):
        prompt.get_model_status()


def test_merging_into_a_tied_weight_warns_and_trainable_tokens_do_not():
    # LoRA on GPT-2's head writes the table the embedding shares: merged, the embedding changes
    # too (peft warns the same). Trainable tokens write their rows there by design.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(tiny_transformers_model("gpt2"), LoraConfig(r=2, target_modules=["lm_head"]))
        tokens = get_peft_model(tiny_transformers_model("gpt2"), minipeft.TrainableTokensConfig(token_indices=[3]))
    with pytest.warns(UserWarning, match=r"into 'lm_head' writes the weight it shares with \['transformer.wte'\]"):
        lora.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens.merge_adapter()


def test_a_refused_modules_to_save_comes_before_pissa_rewrites_the_base():
    # PiSSA takes its adapter out of fc1's weight as its wrapper is built; the refusal of head
    # (LoRA of "default" sits there) must come first, or fc1 would keep the residual.
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("fc1", torch.nn.Linear(16, 16))
    net.add_module("head", torch.nn.Linear(16, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["head"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save names 'head'"):
        model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="pissa",
                                          modules_to_save=["head"]))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

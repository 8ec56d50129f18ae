"""get_layer_status / get_model_status against peft's on the same model and the same history:
every field but the class names (peft's ``lora.Linear`` / ``LoraModel``, minipeft's
``LoraLinear`` / ``AdaptedModel``), in a consistent state and in an irregular one."""

from __future__ import annotations

import copy
import dataclasses

import pytest

import minipeft
from tests.models import tiny_transformers_model

peft = pytest.importorskip("peft")

CLASS_NAMES = ("module_type", "adapter_model_type")


def statuses(library, base, history):
    """(model status, layer statuses) as dicts, class names left out, after ``history(model)``."""
    model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", library.LoraConfig(r=2, target_modules=["v_proj"]))
    history(model)

    def plain(status):
        return {k: v for k, v in dataclasses.asdict(status).items() if k not in CLASS_NAMES}
    return plain(model.get_model_status()), [plain(s) for s in model.get_layer_status()]


def merge_default(model):
    model.merge_adapter()


def one_layer_switched_by_hand(model):
    # only the first layer runs "b": the model as a whole is in no single state
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.v_proj"))
    layer.set_adapter(["b"])


def one_adapter_half_frozen(model):
    model.set_requires_grad("b")
    next(p for n, p in model.named_parameters() if "lora_A.b" in n).requires_grad_(False)


@pytest.mark.parametrize("history", [merge_default, one_layer_switched_by_hand, one_adapter_half_frozen])
def test_the_same_status_as_peft(history):
    base = tiny_transformers_model("llama")
    ours, theirs = statuses(minipeft, base, history), statuses(peft, base, history)
    assert ours == theirs
    if history is not merge_default:  # the point of these two: peft's "irregular"
        assert "irregular" in repr(theirs[0])


def test_status_inside_disable_adapter():
    base = tiny_transformers_model("llama")
    model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
    assert minipeft.get_model_status(model).enabled is True


def test_layer_names_of_lora_s_trainable_tokens_are_peft_s():
    """peft holds LoRA's trainable tokens one module down (``<embedding>.token_adapter``), also on a
    head tied to the embedding."""
    base = tiny_transformers_model("gpt2")
    names = []
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(r=2, target_modules=["c_attn"],
                                                                               trainable_token_indices=[1, 2]))
        names.append([s.name for s in model.get_layer_status()])
    assert names[1] == names[0]
    assert "model.lm_head.token_adapter" in names[1]

"""Adding, switching and deleting adapters: which parameters train afterwards.

Trained biases (``bias="all"`` / ``"lora_only"``) are base-model parameters shared by every
adapter, so switching or deleting must stop them explicitly. The reference is peft on a fresh
model holding only the adapter that is left: peft itself keeps a switched-away adapter's biases
training, so it is no reference for the switch itself.
"""

from __future__ import annotations

import copy

import pytest

from minipeft import LoraConfig, PromptTuningConfig, get_peft_model
from tests.models import tiny_transformers_model

peft = pytest.importorskip("peft")


def trainable(model, rename: dict[str, str] | None = None) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    for old, new in (rename or {}).items():
        names = {n.replace(old, new) for n in names}
    return names


def peft_alone(base, config: dict, adapter_name: str):
    """peft with one LoRA adapter: the requires_grad set a model left with it should have."""
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name=adapter_name)


def test_switching_to_prompt_tuning_stops_lora_biases():
    base = tiny_transformers_model("bert")
    lora = dict(task_type="SEQ_CLS", r=2, target_modules=["query"], bias="all")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
    assert any(n.endswith(".bias") and "base_layer" in n for n in trainable(model))
    model.add_adapter("p", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    model.set_adapter("p")

    prompt = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    reference = peft.get_peft_model(copy.deepcopy(base), prompt)
    # peft holds a prompt-learning model at base_model (no .model) and names the adapter "default".
    assert trainable(model, {"base_model.model.": "base_model.", ".p.": ".default."}) == trainable(reference)

    model.set_adapter("default")  # and back: the LoRA adapter's biases train again
    assert trainable(model) == trainable(get_peft_model(copy.deepcopy(base), LoraConfig(**lora)))


# (first adapter's config, second's, the adapter active when deleting, the one deleted)
CASES = {
    "delete the active bias=all adapter": (dict(bias="all"), dict(bias="none"), "default", "default"),
    "delete the active lora_only adapter": (
        dict(bias="lora_only"), dict(target_modules=["value"]), "default", "default"
    ),
    "delete an inactive bias=all adapter": (dict(bias="none"), dict(bias="all"), "default", "b"),
    "delete the inactive one, both bias=all": (dict(bias="all"), dict(bias="all"), "default", "b"),
    "delete the active one, both bias=all": (dict(bias="all"), dict(bias="all"), "b", "b"),
}


@pytest.mark.parametrize("first, second, active, deleted", CASES.values(), ids=CASES.keys())
def test_delete_adapter_leaves_what_the_remaining_adapter_trains(first, second, active, deleted):
    base = tiny_transformers_model("bert")
    configs = {
        "default": dict(r=2, target_modules=["query"], **first),
        "b": {"r": 3, "target_modules": ["query"], **second},
    }
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**configs["default"]))
    model.add_adapter("b", LoraConfig(**configs["b"]))
    model.set_adapter(active)
    model.delete_adapter(deleted)

    survivor = "b" if deleted == "default" else "default"
    assert model.active_adapter == survivor
    assert trainable(model) == trainable(peft_alone(base, configs[survivor], survivor))


def test_deleting_the_last_adapter_stops_its_biases():
    model = get_peft_model(tiny_transformers_model("bert"), LoraConfig(r=2, target_modules=["query"], bias="all"))
    model.delete_adapter("default")
    assert trainable(model) == set()


def test_a_refused_delete_changes_nothing():
    """A merged adapter cannot be deleted; its biases keep training."""
    model = get_peft_model(tiny_transformers_model("bert"), LoraConfig(r=2, target_modules=["query"], bias="all"))
    before = trainable(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge it before deleting"):
        model.delete_adapter("default")
    assert trainable(model) == before and "default" in model.peft_config

"""LN tuning: peft's default targets, parameter counts and checkpoint keys on the models peft's
table knows; logits, loss and gradients equal to peft's; checkpoints both ways; merge, unload
and disable; mixed batches; only the norms' copies train; and the errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import minipeft
from minipeft import LNTuningConfig, LoraConfig, get_peft_model
from tests.models import input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS", "qwen3": "CAUSAL_LM"}


def pair(kind: str, **config):
    """(peft model, minipeft model): the same LN-tuning adapter, peft's random copies in both."""
    base = tiny_transformers_model(kind)
    models = [library.get_peft_model(copy.deepcopy(base), library.LNTuningConfig(task_type=TASKS[kind], **config))
              for library in (peft, minipeft)]
    randomize_adapters(models[0], names=("ln_tuning_layers", "modules_to_save"), std=0.3, mean=0.5)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models


def inputs(kind: str) -> dict:
    ids = input_ids(batch=2, length=5)
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if kind == "bert" else ids}
    return batch


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "qwen3"])
def test_default_targets_counts_and_checkpoint_keys_are_peft_s(kind, tmp_path):
    """Both take the targets from peft's table per architecture (on Qwen3 the norm after attention
    alone, not q_norm, k_norm or the others)."""
    theirs, ours = pair(kind)
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("theirs", "ours")]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.parametrize("kind, targets", [("llama", None), ("bert", ["LayerNorm"]), ("t5", None)])
def test_logits_loss_and_gradients_match_peft(kind, targets):
    theirs, ours = pair(kind, target_modules=targets)
    out_p, out_m = theirs(**inputs(kind)), ours(**inputs(kind))
    torch.testing.assert_close(out_m.logits, out_p.logits, atol=1e-5, rtol=0)
    out_p.loss.backward()
    out_m.loss.backward()
    grads_p = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    grads_m = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_m.keys() == grads_p.keys()
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_m[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoints_load_in_peft_and_back(tmp_path):
    theirs, ours = pair("llama")
    batch = {"input_ids": input_ids(batch=2, length=5)}
    with torch.no_grad():
        expected = ours(**batch).logits
        ours.save_pretrained(tmp_path / "ours")
        loaded_in_peft = peft.PeftModel.from_pretrained(tiny_transformers_model("llama"), tmp_path / "ours")
        torch.testing.assert_close(loaded_in_peft(**batch).logits, expected, atol=1e-6, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")
        loaded = minipeft.PeftModel.from_pretrained(tiny_transformers_model("llama"), tmp_path / "theirs")
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_training_step_changes_the_copies_and_nothing_else():
    _, ours = pair("llama")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(".ln_tuning_layers.default." in n for n in trained)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    ours(**inputs("llama")).loss.backward()
    optimizer.step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained


def test_merge_and_unload_unload_and_disable():
    """merge_and_unload keeps the trained copies, unload the originals (peft does the same;
    modules_to_save, which unload keeps trained, is another matter)."""
    theirs, ours = pair("llama")
    batch = {"input_ids": input_ids(batch=2, length=5)}
    base = tiny_transformers_model("llama")
    with torch.no_grad():
        adapted, plain = ours(**batch).logits, base(**batch).logits
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**batch).logits, plain, rtol=0, atol=0)
        merged = copy.deepcopy(ours).merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=0, atol=0)
        assert not any("ln_tuning" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(ours.unload()(**batch).logits, plain, rtol=0, atol=0)
        torch.testing.assert_close(theirs.unload()(**batch).logits, plain, rtol=0, atol=0)


def test_two_adapters_switch_mix_per_row_and_refuse_one_merge():
    model = get_peft_model(tiny_transformers_model("llama"), LNTuningConfig(task_type="CAUSAL_LM"))
    model.add_adapter("b", LNTuningConfig(task_type="CAUSAL_LM"))
    randomize_adapters(model, names=("ln_tuning_layers",), std=0.3, mean=1.0)
    model.eval()
    ids = input_ids(batch=3, length=5)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        rows = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=ids).logits[i])
            else:
                model.set_adapter(name)
                rows.append(model(input_ids=ids).logits[i])
    torch.testing.assert_close(mixed, torch.stack(rows), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rows[0], rows[2])  # the two adapters differ
    with pytest.raises(ValueError, match=r"each train their own copy of .*at most one"):
        model.merge_and_unload(adapter_names=["default", "b"])


def test_beside_lora_on_one_model():
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("ln", LNTuningConfig(task_type="CAUSAL_LM"))
    model.set_adapter("ln")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".ln_tuning_layers.ln." in n for n in trained)


def test_a_model_without_normalisation_layers_needs_named_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"found no normalisation layer in Sequential.*target_modules"):
        get_peft_model(copy.deepcopy(model), LNTuningConfig())
    with pytest.raises(ValueError, match="'1': this ReLU has no parameters to train"):
        get_peft_model(copy.deepcopy(model), LNTuningConfig(target_modules=["1"]))
    tuned = get_peft_model(copy.deepcopy(model), LNTuningConfig(target_modules=["0"]))  # any module may be tuned
    assert tuned.get_nb_trainable_parameters()[0] == 4 * 4 + 4


def test_merge_adapter_puts_one_copy_in_place_as_peft_does():
    """peft merges an LN adapter by swapping its copy in for the layer: the merged adapter runs
    whichever is active, one at a time, until unmerged."""
    base = tiny_transformers_model("llama")
    models = []
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LNTuningConfig(task_type="CAUSAL_LM"))
        model.add_adapter("b", library.LNTuningConfig(task_type="CAUSAL_LM"))
        models.append(model.eval())
    randomize_adapters(models[0], names=("ln_tuning_layers",), std=0.3, mean=1.0)
    models[1].load_state_dict(models[0].state_dict())
    theirs, ours = models
    batch = {"input_ids": input_ids(batch=2, length=5)}
    with torch.no_grad():
        active = ours(**batch).logits
        for model in models:
            model.merge_adapter(["b"])
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=0)
        assert not torch.equal(ours(**batch).logits, active)
        assert ours.get_model_status().merged_adapters == ["b"]
        with pytest.raises(ValueError, match="merged"):
            ours.merge_adapter(["default"])
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(**batch).logits, active, rtol=0, atol=0)


def test_targets_that_hold_other_adapters_or_each_other_are_refused():
    lora = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"],
                                                                        modules_to_save=["model.norm"]))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn': adapter\(s\) \['default'\] already sit inside"):
        lora.add_adapter("ln", LNTuningConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match=r"'model.norm': .*ModulesToSaveWrapper on the module itself"):
        lora.add_adapter("ln", LNTuningConfig())
    with pytest.raises(ValueError, match=r"targets 'model.layers.0.input_layernorm' inside 'model.layers.0'"):
        get_peft_model(tiny_transformers_model("llama"), LNTuningConfig(target_modules=["layers.0", "input_layernorm"]))


class NormInNorm(nn.Module):
    """A norm class with a gain of its own around an nn.LayerNorm, and a Linear named like a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Module()
        self.norm.__class__ = type("ScaledNorm", (nn.Module,), {"forward": lambda m, x: m.gain * m.inner(x)})
        self.norm.gain = nn.Parameter(torch.ones(4))
        self.norm.inner = nn.LayerNorm(4)
        self.proj = nn.Sequential()
        self.proj.norm = nn.Linear(4, 4)  # not a normalisation layer, though it is called "norm"

    def forward(self, x):
        return self.proj.norm(self.norm(x))


def test_default_targets_off_peft_s_table_are_the_outermost_norms_by_full_name_when_a_suffix_would_select_more():
    model = get_peft_model(NormInNorm(), LNTuningConfig())
    assert model.peft_config["default"].target_modules == "norm"  # a regex: the inner LayerNorm is in its copy
    assert model.get_nb_trainable_parameters()[0] == 4 + 4 + 4  # gain, and the inner weight and bias
    llama = get_peft_model(tiny_transformers_model("llama"), LNTuningConfig())
    assert sorted(llama.peft_config["default"].target_modules) == ["input_layernorm", "norm",
                                                                    "post_attention_layernorm"]


def test_train_restores_the_best_copies_with_their_running_statistics(tmp_path):
    """A batch norm's copy is its weights and its running statistics: restore_best puts back both,
    so the model after train() is the best one evaluated, as best/ holds it."""
    from minipeft.train import TrainConfig, train

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x, labels=None):
            return self.head(torch.relu(self.bn(self.fc(x))))

    torch.manual_seed(0)
    base = Net()
    g = torch.Generator().manual_seed(0)

    def batch(shift):
        x = torch.randn(16, 4, generator=g) * 3 + shift
        return {"x": x, "labels": (x[:, 0] > shift).long()}

    batches = [batch(s) for s in (0.0, 5.0, -5.0, 10.0, 20.0, 40.0)]  # drifting: the statistics keep moving
    model = get_peft_model(copy.deepcopy(base), LNTuningConfig())
    result = train(model, batches, [batch(0.0)], TrainConfig(output_dir=str(tmp_path), lr=0.3, eval_every=1,
                                                             log_every=100, checkpoint_every=0))
    assert result.best_step < result.step  # the best is not the last: restoring has something to do
    best = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "best").eval()
    model.eval()
    x = torch.randn(8, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x), best(x), rtol=0, atol=0)

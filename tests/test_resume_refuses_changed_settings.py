"""Resuming from output_dir/checkpoint.pt is refused when a setting that changes what the run
computes differs from the run that wrote it: the seed (dropout masks, shuffles), the optimizer's
hyper-parameters, the schedule, clipping, the length of the run, and what "best" means (the
task and metric the best value so far was measured in, and restore_best: a run without it kept
no best weights to restore). The list here is written out
by hand from what each field does, not read from train.RESUME_FIELDS, so a field dropped from
that tuple is noticed. Settings that change no math (logging, evaluation cadence) may differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minipeft.train import TrainConfig, train


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, labels=None):
        return self.lin(self.drop(x))


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 4, generator=g), "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(4)]


BASE = dict(epochs=1, lr=1e-2, log_every=100)


@pytest.mark.parametrize("field, value", [
    ("seed", 1),
    ("lr", 2e-2),
    ("weight_decay", 0.1),
    ("betas", (0.8, 0.99)),
    ("lr_by_prefix", {"lin.bias": 0.1}),
    ("schedule", "cosine"),
    ("warmup_steps", 1),
    ("warmup_ratio", 0.25),
    ("max_grad_norm", 0.5),
    ("grad_accum_steps", 2),
    ("epochs", 2),
    ("max_steps", 3),
    ("task", "classification"),
    ("metric", "loss"),
    ("restore_best", False),
])
def test_a_changed_setting_that_changes_the_math_is_refused(tmp_path, field, value):
    train(Classifier(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    with pytest.raises(ValueError, match=rf"cannot resume from .*other settings \(.*{field}: "):
        train(Classifier(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **{**BASE, field: value}))


def test_settings_that_change_no_math_may_differ(tmp_path):
    train(Classifier(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    result = train(Classifier(), batches(), batches(),
                   TrainConfig(output_dir=str(tmp_path), **{**BASE, "log_every": 1, "eval_every": 2, "patience": 2,
                                                            "checkpoint_every": 1, "save_best": False}))
    assert result.step == 4


@pytest.mark.parametrize("field, first, second", [("loraplus_lr_ratio", None, 16.0), ("loraplus_lr_ratio", 4.0, 16.0)])
def test_a_changed_loraplus_ratio_is_refused(tmp_path, field, first, second):
    from minipeft import LoraConfig, get_peft_model

    def lora():
        return get_peft_model(Classifier(), LoraConfig(r=2, target_modules=["lin"]))

    train(lora(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE, **{field: first}))
    with pytest.raises(ValueError, match=rf"cannot resume from .*other settings \(.*{field}: "):
        train(lora(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE, **{field: second}))


def test_other_training_data_of_the_same_size_is_refused(tmp_path):
    # Same settings, same step counts, but new data: resuming the finished run would train
    # nothing on it and hand back the old weights. The first batch's hash tells them apart.
    train(Classifier(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    other = [{**b, "x": b["x"] + 1.0} for b in batches()]
    with pytest.raises(ValueError, match=r"other settings \(the training data \(its first batch differs\)\)"):
        train(Classifier(), other, batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    # The same data, read again, resumes (nothing left to train), and resume=False starts over.
    train(Classifier(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    result = train(Classifier(), other, batches(), TrainConfig(output_dir=str(tmp_path), resume=False, **BASE))
    assert result.step == 4


def test_another_adapter_config_or_base_model_is_refused(tmp_path):
    # lora_alpha changes no shape, only the scale the saved factors were trained at; another base
    # model of the same architecture has the same shapes. Both resumed silently before.
    from minipeft import LoraConfig, get_peft_model

    def lora(alpha=8, base_seed=0):
        model = Classifier()
        if base_seed:
            torch.manual_seed(base_seed)
            model.lin.reset_parameters()
        return get_peft_model(model, LoraConfig(r=2, lora_alpha=alpha, target_modules=["lin"]))

    train(lora(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    with pytest.raises(ValueError, match=r"other settings \(the adapters' configs \('default': lora_alpha 8 -> 32\)\)"):
        train(lora(alpha=32), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    with pytest.raises(ValueError, match=r"other settings \(the frozen weights \(another base model, or other values "
                                         r"in it: base_model.model.lin.base_layer.weight, base_model.model.lin.base_layer.bias"):
        train(lora(base_seed=1), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    assert train(lora(), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE)).step == 4  # the same: resumes


class Headed(nn.Module):
    """A frozen "pretrained" layer and a classifier head new to it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        return self.head(self.lin(x))


def test_frozen_tensors_no_forward_reads_do_not_stop_a_resume(tmp_path):
    # The new head is random where it was not seeded; its trained copy is in the checkpoint and
    # the frozen original is never read. Nor are another adapter's tensors. And a number type a
    # config accepts (numpy's float) is stored as text, which a weights-only checkpoint holds.
    import numpy as np

    from minipeft import LoraConfig, get_peft_model

    def lora(head_seed):
        model = Headed()
        torch.manual_seed(head_seed)
        model.head.reset_parameters()
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=np.float64(8), target_modules=["lin"],
                                                      modules_to_save=["head"]))
        peft_model.add_adapter("spare", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
        return peft_model

    train(lora(head_seed=1), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE))
    assert train(lora(head_seed=2), batches(), batches(), TrainConfig(output_dir=str(tmp_path), **BASE)).step == 4


def test_the_data_fingerprint_reads_every_tensor_and_draws_no_random_number():
    from collections import UserDict

    from minipeft.train import _data_fingerprint, _first_batch

    big = torch.zeros(2000)
    changed = big.clone()
    changed[1000] = 1.0  # repr() would print both as "tensor([0., 0., ..., 0.])"
    # transformers' BatchEncoding is a UserDict; keys of mixed types; nested sequences; objects
    # whose repr holds an address count by type.
    first = [UserDict({"x": big, 3: [1, (2, None)], "obj": object()})]
    second = [UserDict({"x": changed, 3: [1, (2, None)], "obj": object()})]
    assert _data_fingerprint(first) != _data_fingerprint(second)
    assert _data_fingerprint(first) == _data_fingerprint([UserDict({"x": big.clone(), 3: [1, (2, None)],
                                                                      "obj": object()})])
    # The batch hashed is read as the run's first epoch reads it (from the streams seeded with the
    # run's seed), whatever the caller drew before, and reading it draws nothing from theirs.
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    first = _first_batch(loader, seed=5)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # the loader's shuffle drew from a forked stream
    torch.rand(100)  # another history before the call
    assert torch.equal(_first_batch(loader, seed=5), first)
    torch.manual_seed(5)
    assert torch.equal(next(iter(loader)), first)
    assert _data_fingerprint(first) != _data_fingerprint(_first_batch(loader, seed=6))

"""A deep copy (or a pickle round trip) of a virtual-token model is a model of its own: its hooks
read its own prompt or prefix and its own active adapter, never the original's."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import minipeft
from tests.models import padded_batch as batch
from tests.test_prompt_tuning import tiny
from tests.test_prompt_tuning_encoder_decoder import labels
from tests.test_prompt_tuning_encoder_decoder import tiny as tiny_seq2seq

pytest.importorskip("transformers")

CASES = {
    "prompt, T5": lambda: (tiny_seq2seq("t5"), minipeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
                           dict(**batch(), labels=labels())),
    "prompt, GPT-2": lambda: (tiny("gpt2"), minipeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                              batch()),
    "prefix, GPT-2": lambda: (tiny("gpt2"), minipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                              batch()),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_runs_on_its_own_virtual_tokens(case, how):
    base, config, inputs = CASES[case]()
    model = minipeft.get_peft_model(base, config)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    table, twin_table = (m.prompt_encoder["default"].embedding.weight for m in (model, twin))
    with torch.no_grad():
        table.normal_()
        twin_table.copy_(table)
        before = twin(**inputs).logits
        table.mul_(3.0)  # the original's tokens change: the copy's output does not
        torch.testing.assert_close(twin(**inputs).logits, before, atol=0, rtol=0)
        twin_table.copy_(table)  # the copy's own tokens change: its output follows, as the original's
        adapted = model(**inputs).logits
        torch.testing.assert_close(twin(**inputs).logits, adapted, atol=1e-6, rtol=0)
        with model.disable_adapter():  # disabling the original leaves the copy adapted
            torch.testing.assert_close(twin(**inputs).logits, adapted, atol=1e-6, rtol=0)
    twin.train()
    twin(**inputs).logits.square().mean().backward()
    assert twin_table.grad is not None and twin_table.grad.abs().sum() > 0
    assert table.grad is None

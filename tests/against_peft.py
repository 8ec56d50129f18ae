"""Helpers for the checks against peft: the same adapter built by both libraries from one seed,
and checkpoints saved by each and loaded by the other."""

from __future__ import annotations

import copy
import warnings

import torch

import minipeft


def seeded_pair(base, config_class: str, config: dict, seed: int = 3):
    """(peft model, minipeft model): ``config_class`` (a name both libraries export) with ``config``
    on copies of ``base``, each built right after ``torch.manual_seed(seed)``: one seed must give
    both the same adapter weights. Their warnings (e.g. a size moved to a divisor) are silenced."""
    import peft

    models = []
    for library in (peft, minipeft):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(library.get_peft_model(copy.deepcopy(base), getattr(library, config_class)(**config)))
    return models


def assert_checkpoints_load_both_ways(base, p, m, run, tmp_path, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """minipeft's file loads in peft to ``m``'s outputs, and peft's file (its trainable tensors
    changed first, so that nothing passes by default) loads in minipeft to ``p``'s. ``run(model)``
    returns the outputs compared."""
    import peft

    m.save_pretrained(tmp_path / "mini")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(run(theirs), run(m), atol=atol, rtol=rtol)
    with torch.no_grad():
        for t in p.parameters():
            if t.requires_grad:
                t.mul_(-1.5)
    p.save_pretrained(tmp_path / "peft")
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(ours), run(p), atol=atol, rtol=rtol)


def assert_same_outputs_and_gradients(p, m, ids: torch.Tensor) -> None:
    """One language-model loss of each (``labels = ids``), in training mode (the model's dropout
    drawing the same masks from one seed): the same logits, the same trainable tensors, and the
    same gradient for each."""
    logits, grads = [], []
    for model in (p, m):
        model.train()
        torch.manual_seed(11)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        logits.append(out.logits)
        grads.append({n: t.grad for n, t in model.named_parameters() if t.requires_grad})
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=1e-5)
    assert sorted(grads[1]) == sorted(grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4)

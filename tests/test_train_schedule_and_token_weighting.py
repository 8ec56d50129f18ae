"""train() against loops written out by hand, on the settings the other training tests leave at
their defaults: a warmup + linear-decay schedule with clipping (the lr of every step, the
first included), gradient accumulation for a causal LM whose micro-batches hold different
numbers of target tokens, evaluate()'s token-weighted causal-LM loss, and perplexity as the
metric that picks the best evaluation (lower is better).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from minipeft.data import IGNORE_INDEX, BatchLoader
from minipeft.train import TrainConfig, evaluate, train


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        return self.lin(x)


# by hand: warmup (t+1)/(w+1) for t < w, then 1 - (t-w)/(total-w), with total = 6 steps
@pytest.mark.parametrize("warmup, multipliers", [
    (dict(warmup_steps=2), [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    (dict(warmup_ratio=0.5), [1 / 4, 2 / 4, 3 / 4, 1.0, 2 / 3, 1 / 3]),  # w = int(0.5 * 6) = 3
])
def test_warmup_then_linear_decay_with_clipping_matches_a_hand_written_loop(tmp_path, warmup, multipliers):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": 3 * torch.randn(8, 4, generator=g), "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(6)]
    torch.manual_seed(0)
    model, reference = Regressor(), Regressor()
    reference.load_state_dict(model.state_dict())
    train(model, batches, None, TrainConfig(output_dir=str(tmp_path), lr=0.05, **warmup, schedule="linear",
                                            max_grad_norm=0.05, log_every=1))
    # each progress line gives the lr its step trained with
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([0.05 * m for m in multipliers])

    opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.0)
    for b, m in zip(batches, multipliers):
        nn.functional.cross_entropy(reference(b["x"]), b["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        for group in opt.param_groups:
            group["lr"] = 0.05 * m
        opt.step()
        opt.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)


VOCAB, DIM = 16, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.head(self.embed(input_ids))  # position t predicts token t+1


def lm_examples(n: int, seed: int = 0) -> list[dict]:
    """Plain LM data, labels = input ids (the first label counts too, unlike a masked prompt),
    lengths 2..9 so micro-batches hold different numbers of target tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def test_accumulating_uneven_causal_lm_micro_batches_is_one_big_batch(tmp_path):
    examples = lm_examples(32)
    results = []
    for batch_size, accum in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        model = TinyLM()
        train(model, BatchLoader(examples, batch_size=batch_size), None,
              TrainConfig(output_dir=str(tmp_path / str(accum)), epochs=2, lr=1e-2, grad_accum_steps=accum,
                          max_grad_norm=None, log_every=100, task="causal_lm"))
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_causal_lm_eval_loss_is_the_mean_over_every_target_token():
    torch.manual_seed(0)
    model = TinyLM()
    loader = BatchLoader(lm_examples(20, seed=1), batch_size=3)  # batches of unequal token counts
    # the reference: all shifted targets of all batches in one cross-entropy
    logits, targets = [], []
    with torch.no_grad():
        for b in loader:
            logits.append(model(b["input_ids"])[:, :-1].flatten(0, 1))
            targets.append(b["labels"][:, 1:].flatten())
    expected = nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=IGNORE_INDEX)
    metrics = evaluate(model, loader, task="causal_lm")
    assert abs(metrics["loss"] - expected.item()) < 1e-5
    assert abs(metrics["perplexity"] - expected.exp().item()) < 1e-3


def test_perplexity_as_the_metric_keeps_the_lowest(tmp_path):
    torch.manual_seed(0)
    examples = lm_examples(32, seed=2)
    model = TinyLM()
    result = train(model, BatchLoader(examples, batch_size=8), BatchLoader(examples, batch_size=8),
                   TrainConfig(output_dir=str(tmp_path), epochs=3, lr=5e-2, eval_every=2, metric="perplexity",
                               schedule="constant", log_every=100))
    values = [h["eval_perplexity"] for h in result.history]
    assert values[-1] < values[0]  # it learns, so the first evaluation is not the best
    assert result.best_metric == min(values)
    assert result.best_step == result.history[values.index(min(values))]["step"]
    # restore_best: the model ends holding the weights of that evaluation
    assert abs(evaluate(model, BatchLoader(examples, batch_size=8))["perplexity"] - min(values)) < 1e-4 * min(values)


def test_the_last_step_is_evaluated_when_eval_every_does_not_divide_the_run(tmp_path):
    # 6 steps, eval every 4: evaluations at 4 and at the end (6); otherwise the last two steps
    # would never be compared, and restore_best would throw them away unseen
    torch.manual_seed(0)
    examples = lm_examples(48, seed=3)
    model = TinyLM()
    result = train(model, BatchLoader(examples, batch_size=8), BatchLoader(examples, batch_size=8),
                   TrainConfig(output_dir=str(tmp_path), epochs=1, lr=5e-2, eval_every=4, schedule="constant",
                               log_every=100))
    assert [h["step"] for h in result.history] == [4, 6]
    assert result.step == 6

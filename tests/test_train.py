"""The training loop on tiny models: learning, early stopping, resume, accumulation, DDP.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 tests/test_train.py OUT`)
this file is also the worker of the two-process DDP test.
"""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft import LoraConfig, get_peft_model  # noqa: E402
from minipeft.data import BatchLoader  # noqa: E402
from minipeft.train import OUTPUT_NAMES, TrainConfig, evaluate, lr_lambda, make_optimizer, train  # noqa: E402
from tests.two_processes import run_two_processes  # noqa: E402

VOCAB, DIM = 32, 16


class TinyClassifier(nn.Module):
    """Frozen embedding + trainable "adapter" and head: the shape of a PEFT model."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # frozen "pretrained" weights: the same in every instance
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB, DIM)
        self.embed.weight.requires_grad_(False)
        self.adapter = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(DIM, 2)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.embed(input_ids)  # [B, T, D]
        m = attention_mask.unsqueeze(-1).float()
        h = (h * m).sum(1) / m.sum(1)  # mean over real tokens
        return self.classifier(self.drop(torch.tanh(self.adapter(h))))  # logits [B, 2]


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.head(self.embed(input_ids))  # [B, T, V]; position t predicts t+1


def tiny_examples(n: int, seed: int = 0) -> list[dict]:
    """Label 1 for sequences of low token ids, 0 for high ones: separable after mean pooling."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        label = int(torch.rand(1, generator=g) < 0.5)
        low, high = (2, VOCAB // 2 + 2) if label else (VOCAB // 2 - 2, VOCAB)  # overlapping ranges
        out.append({"input_ids": torch.randint(low, high, (length,), generator=g).tolist(), "label": label})
    return out


def loaders(batch_size=8, n_train=256, shuffle=True):
    train_loader = BatchLoader(tiny_examples(n_train, 0), batch_size=batch_size, shuffle=shuffle, seed=0)
    eval_loader = BatchLoader(tiny_examples(64, 1), batch_size=32)
    return train_loader, eval_loader


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lr_schedule_warmup_then_decay():
    f = lr_lambda("linear", warmup=4, total=14)
    assert f(0) < f(1) < f(3) < f(4) == 1.0
    assert f(9) == pytest.approx(0.5) and f(14) == 0.0
    c = lr_lambda("cosine", warmup=0, total=10)
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0)
    k = lr_lambda("constant", warmup=2, total=10)
    assert k(0) < k(1) < k(2) == k(10) == 1.0
    with pytest.raises(ValueError, match="schedule 'step' is not valid; use one of 'linear', 'cosine', 'constant'"):
        lr_lambda("step", 0, 10)


def test_optimizer_holds_only_trainable_params():
    model = TinyClassifier()
    opt = make_optimizer(model, TrainConfig(output_dir="unused", weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.embed.weight) not in in_opt
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, TrainConfig(output_dir="unused"))


def test_lr_by_prefix_gives_those_parameters_their_own_learning_rate():
    # Adam's first step moves every weight by lr * |g| / (|g| + eps): by almost exactly lr, and
    # exactly so once eps is counted (a gradient near eps, drawn in one run of three, moves less)
    model = TinyClassifier()
    config = TrainConfig(output_dir="unused", lr=1e-3, lr_by_prefix={"classifier.": 0.5, "classifier.bias": 0.25})
    opt = make_optimizer(model, config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, VOCAB, (4, 6))
    nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    expected = {"adapter.weight": 1e-3, "adapter.bias": 1e-3, "classifier.weight": 0.5, "classifier.bias": 0.25}
    for name, p in model.named_parameters():
        if p.requires_grad:  # the longest matching prefix wins
            step = expected[name] * p.grad.abs() / (p.grad.abs() + 1e-8)
            torch.testing.assert_close((p - before[name]).abs(), step, rtol=1e-4, atol=1e-7)  # atol: float32 rounding of p
    with pytest.raises(ValueError, match=r"no trainable parameter starts with: \['head.'\]"):
        make_optimizer(model, TrainConfig(output_dir="unused", lr_by_prefix={"head.": 0.1}))
    with pytest.raises(ValueError, match="lr_by_prefix must map"):
        TrainConfig(output_dir="unused", lr_by_prefix={"classifier.": -1})


def test_loss_goes_down_and_frozen_weights_stay(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    frozen = model.embed.weight.detach().clone()
    train_loader, eval_loader = loaders()
    before = evaluate(model, eval_loader)
    result = train(model, train_loader, eval_loader,
                   TrainConfig(output_dir=str(tmp_path), epochs=4, lr=3e-2, log_every=8, warmup_steps=4))
    after = evaluate(model, eval_loader)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] >= 0.9 and 0 <= after["f1"] <= 1
    assert torch.equal(model.embed.weight, frozen)
    assert result.step == 4 * len(train_loader)
    # a plain module has no save_pretrained: its state_dict goes to safetensors
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "best" / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    (tmp_path / "plain").write_bytes(b"")  # readable as any file the user writes, not private as safetensors makes it
    assert (tmp_path / "best" / "model.safetensors").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in l and "lr" in l for l in lines)
    assert sum(1 for l in lines if l.get("eval")) == 4  # once per epoch
    # what the run wrote is what train.OUTPUT_NAMES says it writes (callers clean up by those names)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "metrics.jsonl", "best"}
    assert {"checkpoint.pt", "metrics.jsonl", "best"} <= set(OUTPUT_NAMES)


class PlainRegressor(nn.Module):
    """A module whose batches hold features, not token ids: {"x", "labels"}."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        return self.lin(x)  # logits [B, 2]


def test_batches_without_token_ids_train_like_a_hand_written_loop(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 4, generator=g), "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(6)]
    torch.manual_seed(0)
    model = PlainRegressor()
    reference = PlainRegressor()
    reference.load_state_dict(model.state_dict())

    train(model, batches, batches, TrainConfig(output_dir=str(tmp_path), lr=1e-2, schedule="constant",
                                               max_grad_norm=None, log_every=2))
    # the reference: plain AdamW, one step a batch, on the mean cross-entropy
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for b in batches:
        nn.functional.cross_entropy(reference(b["x"]), b["labels"]).backward()
        opt.step()
        opt.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all("tokens_per_s" not in r for r in steps)  # no token ids: no throughput, and no crash
    assert "eval_accuracy" in records[-1]


def test_full_finetuning_runs_through_the_same_loop(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    model.embed.weight.requires_grad_(True)
    frozen_before = model.embed.weight.detach().clone()
    train_loader, eval_loader = loaders()
    train(model, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=1, lr=1e-2, log_every=100))
    assert not torch.equal(model.embed.weight, frozen_before)


def test_causal_lm_loss_and_perplexity(tmp_path):
    torch.manual_seed(0)
    # a cyclic sequence: token t+1 follows t; prompt tokens are masked out of the loss
    examples = []
    for start in range(VOCAB):
        ids = [(start + i) % VOCAB for i in range(8)]
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    loader = BatchLoader(examples, batch_size=8, shuffle=True)
    model = TinyLM()
    before = evaluate(model, loader)
    assert set(before) == {"loss", "perplexity"}
    train(model, loader, loader, TrainConfig(output_dir=str(tmp_path), epochs=20, lr=5e-2, log_every=100,
                                             schedule="constant"))
    after = evaluate(model, loader)
    assert after["perplexity"] < 0.2 * before["perplexity"]


class TinyTagger(nn.Module):
    """A label per token: logits [B, T, 3]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.head(self.embed(input_ids))


def test_token_classification_counts_each_labelled_token(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (3, 5, 8, 2, 6, 7):  # the first token of each is unlabelled, and padding is too
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] + [t % 3 for t in ids[1:]]})
    loader = BatchLoader(examples, batch_size=4)
    model = TinyTagger()

    # by hand, over the labelled tokens alone
    logits = torch.cat([model(**b).flatten(0, 1) for b in loader]).detach()
    labels = torch.cat([b["labels"].flatten() for b in loader])
    logits, labels = logits[labels != -100], labels[labels != -100]
    predicted = logits.argmax(-1).tolist()
    f1s = []
    for c in range(3):
        tp = sum(p == g == c for p, g in zip(predicted, labels.tolist()))
        f1s.append(2 * tp / max(1, predicted.count(c) + labels.tolist().count(c)))
    expected = {"loss": F.cross_entropy(logits, labels).item(),
                "accuracy": (logits.argmax(-1) == labels).float().mean().item(), "f1": sum(f1s) / 3}
    assert evaluate(model, loader, task="token_classification") == pytest.approx(expected, rel=1e-6)

    # "auto" knows a token classifier by its PeftModel's task_type; the wrong task is refused clearly
    tagger = get_peft_model(TinyTagger(), LoraConfig(task_type="TOKEN_CLS", target_modules=["head"]))
    assert set(evaluate(tagger, loader)) == {"loss", "accuracy", "f1"}
    with pytest.raises(ValueError, match=r"task 'classification' takes labels of shape \[B\], and this batch's "
                                         r"are \[4, 8\]: for a label per token use task='token_classification'"):
        evaluate(model, loader, task="classification")
    result = train(tagger, loader, loader, TrainConfig(output_dir=str(tmp_path), epochs=2, metric="accuracy",
                                                        log_every=100))
    assert set(result.history[-1]) >= {"eval_accuracy", "eval_f1"}


def test_early_stopping_triggers(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    train_loader, eval_loader = loaders()
    # lr 0: the metric never improves after the first evaluation
    result = train(model, train_loader, eval_loader,
                   TrainConfig(output_dir=str(tmp_path), epochs=10, lr=0.0, eval_every=2, patience=3,
                               metric="loss", log_every=100))
    assert result.stopped_early
    assert result.step == 2 * 4  # first eval sets the best, three more without improvement
    assert result.best_step == 2 and len(result.history) == 4


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    examples = tiny_examples(48)
    results = []
    for batch_size, accum in ((12, 1), (3, 4)):
        torch.manual_seed(0)
        model = TinyClassifier()
        loader = BatchLoader(examples, batch_size=batch_size)
        train(model, loader, None, TrainConfig(output_dir=str(tmp_path / str(accum)), epochs=2, lr=1e-2,
                                               grad_accum_steps=accum, log_every=100, max_grad_norm=0.5))
        results.append(trainable(model))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


class Crash(Exception):
    pass


class CrashingLoader:
    """Yields a loader's batches but raises after `after` batches in total (a killed job)."""

    def __init__(self, loader, after):
        self.loader, self.after, self.seen = loader, after, 0

    def set_epoch(self, e):
        self.loader.set_epoch(e)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            if self.seen == self.after:
                raise Crash
            self.seen += 1
            yield b


def test_resume_reproduces_uninterrupted_run(tmp_path):
    train_loader, eval_loader = loaders(n_train=96)  # 12 batches an epoch, shuffled per epoch

    def config(out):
        # dropout on: resume must restore the RNG too, not only weights and optimizer
        # progress lines every 4 steps: the checkpoint at step 10 falls between two of them
        return TrainConfig(output_dir=str(out), epochs=3, lr=1e-2, eval_every=5, checkpoint_every=3,
                           grad_accum_steps=2, log_every=4, schedule="cosine", warmup_steps=2)

    torch.manual_seed(0)
    reference = TinyClassifier(dropout=0.3)
    ref_result = train(reference, train_loader, eval_loader, config(tmp_path / "a"))

    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.3)
    with pytest.raises(Crash):  # dies in epoch 2, after the checkpoint at step 10
        train(model, CrashingLoader(train_loader, after=12 + 8 + 1), eval_loader, config(tmp_path / "b"))
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10  # saved after the eval at step 10

    torch.manual_seed(0)  # a fresh process: the same frozen base (pretrained weights) ...
    resumed = TinyClassifier(dropout=0.3)
    torch.manual_seed(123)  # ... but another RNG state and other adapter weights, which resume replaces
    with torch.no_grad():
        resumed.adapter.weight.normal_()
    result = train(resumed, train_loader, eval_loader, config(tmp_path / "b"))
    assert result.step == ref_result.step == 18
    assert result.best_step == ref_result.best_step
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)

    # The log reads as the uninterrupted run's: no step twice (the crashed run logged none past
    # its checkpoint here, but an eval or a line after it would be), and the line at step 12
    # averages steps 9 to 12, two of them trained before the crash. Throughput is this process's.
    def records(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]
    assert records(tmp_path / "b") == records(tmp_path / "a")


class CrashingDataLoader(torch.utils.data.DataLoader):
    """A torch DataLoader (no set_epoch) that raises after `after` batches in total."""

    def __init__(self, *args, after, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.seen = after, 0

    def __iter__(self):
        for b in super().__iter__():
            if self.seen == self.after:
                raise Crash
            self.seen += 1
            yield b


def test_resume_mid_epoch_with_a_shuffling_torch_dataloader_reads_the_epoch_in_its_order(tmp_path):
    # A DataLoader(shuffle=True) draws each epoch's order from torch's generator when the epoch
    # starts; a resumed run re-reading the epoch used to draw another, training some examples
    # twice and others never, without a word.
    from minipeft.data import collate

    seen = []

    def run(out, after=None):
        torch.manual_seed(0)
        model = TinyClassifier(dropout=0.3)
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].clone())
                                        if m.training else None, with_kwargs=True)
        batches = CrashingDataLoader(tiny_examples(96, 0), batch_size=8, shuffle=True, collate_fn=collate,
                                     after=after if after is not None else -1)
        train(model, batches, None, TrainConfig(output_dir=str(out), epochs=2, lr=1e-2, checkpoint_every=3,
                                                log_every=100, save_best=False))
        return model

    reference = run(tmp_path / "a")
    uninterrupted, seen[:] = list(seen), []
    with pytest.raises(Crash):  # dies in epoch 2 (12 batches an epoch) after its checkpoint at step 15
        run(tmp_path / "b", after=1 + 12 + 5)  # (1: the batch read for the data fingerprint)
    before_checkpoint, seen[:] = seen[:15], []
    resumed = run(tmp_path / "b")
    assert [t.tolist() for t in before_checkpoint + seen] == [t.tolist() for t in uninterrupted]
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)


def test_a_shuffling_dataloader_resumes_whatever_the_caller_drew_before(tmp_path):
    # The data fingerprint hashes epoch 0's first batch as the run reads it (from the run's seed),
    # not as the caller's random state would draw it: a notebook's second call resumes.
    from minipeft.data import collate

    loader = torch.utils.data.DataLoader(tiny_examples(32, 0), batch_size=8, shuffle=True, collate_fn=collate)
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100, save_best=False)
    train(TinyClassifier(), loader, None, config)
    torch.rand(50)  # the caller's random state moves on
    with pytest.warns(UserWarning, match="holds a finished run"):
        assert train(TinyClassifier(), loader, None, config).step == 4


def test_a_batch_may_carry_a_column_of_text_beside_its_tensors(tmp_path):
    class KeepsText(TinyClassifier):
        def forward(self, input_ids, attention_mask, labels=None, text=None):
            assert text is not None and len(text) == len(input_ids)
            return super().forward(input_ids, attention_mask)

    batches = [{**b, "text": [f"row {i}" for i in range(len(b["labels"]))]} for b in loaders(n_train=16)[0]]
    assert train(KeepsText(), batches, None, TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)).step == 2


def test_resuming_mid_epoch_from_a_checkpoint_without_the_epochs_random_state_warns(tmp_path):
    from minipeft.data import collate

    def loader(after=-1):
        return CrashingDataLoader(tiny_examples(96, 0), batch_size=8, shuffle=True, collate_fn=collate, after=after)

    config = TrainConfig(output_dir=str(tmp_path), epochs=1, checkpoint_every=3, log_every=100, save_best=False)
    with pytest.raises(Crash):
        train(TinyClassifier(), loader(after=1 + 5), None, config)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["epoch_rng"]  # as an older minipeft wrote it
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="holds no RNG state of the epoch's start .* another order"):
        train(TinyClassifier(), loader(), None, config)


class FrozenNormClassifier(TinyClassifier):
    """TinyClassifier with a frozen batch norm before its adapter: its running statistics change
    in training mode although none of its parameters train."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(DIM, momentum=0.5)
        self.norm.requires_grad_(False)

    def forward(self, input_ids, attention_mask, labels=None):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.embed(input_ids) * m).sum(1) / m.sum(1)  # [B, D]
        return self.classifier(torch.tanh(self.adapter(self.norm(h * 3 + 1))))


def test_resume_and_restore_best_bring_back_a_frozen_batch_norms_statistics(tmp_path):
    train_loader, eval_loader = loaders(n_train=96)

    def config(out, **more):
        return TrainConfig(output_dir=str(out), epochs=2, lr=1e-2, eval_every=4, checkpoint_every=4, log_every=100,
                           **more)

    torch.manual_seed(0)
    reference = FrozenNormClassifier()
    ref_result = train(reference, train_loader, eval_loader, config(tmp_path / "a", restore_best=False))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(FrozenNormClassifier(), CrashingLoader(train_loader, after=14), eval_loader,
              config(tmp_path / "b", restore_best=False))
    torch.manual_seed(0)
    resumed = FrozenNormClassifier()
    result = train(resumed, train_loader, eval_loader, config(tmp_path / "b", restore_best=False))
    assert result.history == ref_result.history
    torch.testing.assert_close(resumed.norm.running_mean, reference.norm.running_mean, rtol=0, atol=0)

    # the weights restored as the best give the best evaluation's loss, statistics included
    torch.manual_seed(0)
    best = FrozenNormClassifier()
    result = train(best, train_loader, eval_loader, config(tmp_path / "c", metric="loss", restore_best=True))
    assert result.best_step != result.step
    assert evaluate(best, eval_loader)["loss"] == pytest.approx(result.best_metric, rel=1e-6)


def test_a_checkpoint_keeps_the_buffers_training_updates_and_no_others(tmp_path):
    train_loader, eval_loader = loaders(n_train=16)
    model = FrozenNormClassifier()
    model.embed.register_buffer("packed", torch.zeros(4096, dtype=torch.int32))  # a quantized layer's weights
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)
    train(model, train_loader, eval_loader, config)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainable"]
    assert {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"} <= set(saved)
    assert "embed.packed" not in saved

    # checkpoints of earlier versions, without a frozen norm's statistics or with every buffer,
    # still resume, with a warning
    older = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    older["trainable"] = {k: v for k, v in older["trainable"].items() if not k.startswith("norm.")}
    older["trainable"]["embed.packed"] = torch.ones(4096, dtype=torch.int32)
    torch.save(older, tmp_path / "checkpoint.pt")
    model = FrozenNormClassifier()
    model.embed.register_buffer("packed", torch.zeros(4096, dtype=torch.int32))
    with pytest.warns(UserWarning, match=r"holds no values for the buffers norm.running_mean"), \
            pytest.warns(UserWarning, match=r"holds the buffers embed.packed, which training does not update"):
        train(model, train_loader, eval_loader, config)
    assert not model.embed.packed.any()  # the model's own


def test_an_adapter_run_warns_that_best_cannot_hold_a_frozen_batch_norms_statistics(tmp_path):
    # best/ is save_pretrained's adapter; the norm's statistics drift in training and are not in it.
    import warnings

    train_loader, _ = loaders(n_train=16)

    def warned(model, out, modules_to_save=None):
        model.requires_grad_(False)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["adapter"], modules_to_save=modules_to_save))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(peft_model, train_loader, None, TrainConfig(output_dir=str(tmp_path / out), epochs=1, log_every=100))
        return [str(w.message) for w in caught if "frozen batch norm" in str(w.message)]

    assert warned(FrozenNormClassifier(), "a") == [
        f"1 frozen batch norm(s) (base_model.model.norm) will update their running statistics in training, and "
        f"{tmp_path / 'a' / 'best'} holds the adapter only: loaded from there, the model evaluates with the base's "
        "statistics, not as reported. Put them in eval mode before training (their statistics then stay the "
        "pretrained ones), or add them to modules_to_save"]
    in_eval = FrozenNormClassifier()
    in_eval.norm.eval()
    assert warned(in_eval, "b") == []
    assert warned(FrozenNormClassifier(), "c", modules_to_save=["norm"]) == []  # a trained copy saves its own


def test_submodules_put_in_eval_stay_there_and_a_model_in_eval_trains_whole(tmp_path):
    train_loader, _ = loaders(n_train=16)
    model = FrozenNormClassifier()
    model.norm.eval()  # the user keeps the pretrained statistics
    before = model.norm.running_mean.clone()
    train(model, train_loader, None, TrainConfig(output_dir=str(tmp_path / "a"), epochs=1, log_every=100))
    assert not model.norm.training and torch.equal(model.norm.running_mean, before)
    assert model.training and model.drop.training

    model = FrozenNormClassifier().eval()  # as from_pretrained returns a model
    train(model, train_loader, None, TrainConfig(output_dir=str(tmp_path / "b"), epochs=1, log_every=100))
    assert all(m.training for m in model.modules()) and not torch.equal(model.norm.running_mean, before)


def test_a_resumed_run_drops_the_records_logged_after_its_checkpoint(tmp_path):
    train_loader, eval_loader = loaders(n_train=32)  # 4 steps an epoch
    config = TrainConfig(output_dir=str(tmp_path), epochs=2, lr=1e-2, log_every=1)
    train(TinyClassifier(), train_loader, eval_loader, config)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    # As if the run had died after logging steps 5 and 6 but before its next checkpoint, at 4.
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "step": 4}, tmp_path / "checkpoint.pt")
    log.write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 6) + "\n")
    train(TinyClassifier(), train_loader, eval_loader, config)
    steps = [(json.loads(line)["step"], "eval" in json.loads(line)) for line in log.read_text().splitlines()]
    assert steps == [(1, False), (2, False), (3, False), (4, False), (4, True),
                     (5, False), (6, False), (7, False), (8, False), (8, True)]
    # A line a killed run left half-written goes too, and the run resumes.
    log.write_text(log.read_text() + '{"step": 9, "lo')
    train(TinyClassifier(), train_loader, eval_loader, config)
    assert all(json.loads(line) for line in log.read_text().splitlines())
    # Started over (resume=False), the run logs only its own records.
    train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**{**vars(config), "resume": False}))
    assert len(log.read_text().splitlines()) == 10


def test_ddp_two_processes_end_with_identical_adapters(tmp_path):
    run_two_processes(__file__, str(tmp_path))
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(w0) == {"adapter.weight", "adapter.bias", "classifier.weight", "classifier.bias"}
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert (tmp_path / "out" / "best" / "model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoint.pt").exists()
    evals = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert evals and evals[-1]["eval_accuracy"] > 0.6  # rank 0 alone logged, once per record
    # The logged loss is the ranks' mean, as the update is: one process taking both ranks'
    # batches in one window logs the same losses (it used to log rank 0's alone).
    torch.manual_seed(0)
    train(TinyClassifier(), loaders()[0], None, TrainConfig(output_dir=str(tmp_path / "one"), epochs=1,
                                                             lr=2e-2, log_every=1, grad_accum_steps=4))
    losses = {out: [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
              for out in ("one", "two", "two compiled")}
    assert len(losses["two"]) == 8
    torch.testing.assert_close(losses["two"], losses["one"], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["two compiled"], losses["one"], rtol=1e-5, atol=0)


def test_batches_that_do_not_split_evenly_over_the_processes_are_said_to_be_left_out():
    from minipeft.train import _step_counts

    with pytest.warns(UserWarning, match=r"9 training batches do not split evenly over 2 processes: each takes 4 an "
                                         r"epoch, so the last 1 of every epoch are not trained on"):
        assert _step_counts(9, 2, TrainConfig(output_dir="unused"))[:2] == (4, 4)


def _ddp_worker(out: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # different inits on purpose: DDP must broadcast rank 0's weights
    model = TinyClassifier(dropout=0.2)  # and different dropout masks: grads still averaged
    train_loader, eval_loader = loaders()
    train(model, train_loader, eval_loader,
          TrainConfig(output_dir=os.path.join(out, "out"), epochs=2, lr=2e-2, log_every=100, grad_accum_steps=2))
    torch.save(trainable(model), os.path.join(out, f"rank{rank}.pt"))
    for compiled in (False, True):  # (the second through torch.compile around DDP)
        torch.manual_seed(0)
        train(TinyClassifier(), train_loader, None,
              TrainConfig(output_dir=os.path.join(out, "two compiled" if compiled else "two"), epochs=1, lr=2e-2,
                          log_every=1, grad_accum_steps=2, torch_compile=compiled,
                          torch_compile_backend="aot_eager" if compiled else None))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])


def test_best_lora_adapter_is_saved_with_save_pretrained_and_reloads(tmp_path):
    import copy

    from minipeft import PeftModel

    torch.manual_seed(0)
    base = TinyClassifier()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["adapter"], modules_to_save=["classifier"]))
    train_loader, eval_loader = loaders()
    train(model, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=2, lr=3e-2, log_every=100))
    best = tmp_path / "best"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in best.iterdir()}
    reloaded = PeftModel.from_pretrained(fresh, best)
    model.eval()
    batch = next(iter(eval_loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    # The model ends holding its best weights, which are exactly what was saved.
    torch.testing.assert_close(reloaded(**inputs), model(**inputs))
    assert evaluate(reloaded, eval_loader)["accuracy"] >= 0.9


def test_weight_decay_skips_vectors_stored_as_matrices():
    model = TinyClassifier()
    model.ia3 = nn.Parameter(torch.ones(DIM, 1))  # an (IA)^3 scaling vector, shaped (out, 1)
    model.ia3_in = nn.Parameter(torch.ones(1, DIM))  # and (1, in)
    opt = make_optimizer(model, TrainConfig(output_dir="unused", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.adapter.weight), id(model.classifier.weight)}


def test_weight_decay_takes_lora_factors_at_rank_one():
    # At r = 1, LoRA's A (1, in) and B (out, 1) are shaped like (IA)^3 vectors, but they are the
    # factors of a matrix: they decay as they do at any other rank. DoRA's magnitude does not.
    from minipeft import LoraConfig, get_peft_model

    for r in (1, 2):
        model = get_peft_model(TinyClassifier(), LoraConfig(r=r, target_modules=["adapter"], use_dora=True))
        opt = make_optimizer(model, TrainConfig(output_dir="unused", weight_decay=0.1))
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        layer = model.base_model.model.adapter
        factors = {id(layer.lora_A["default"].weight), id(layer.lora_B["default"].weight)}
        assert decayed == factors, r
        assert id(layer.lora_magnitude_vector["default"].weight) not in decayed


@pytest.mark.parametrize("method", ["loha", "lokr", "adalora", "ia3", "vera", "bottleneck", "tokens", "prompt",
                                    "one_label_head"])
def test_weight_decay_takes_every_adapter_weight_whatever_its_shape_and_no_scale(method):
    """An adapter's weights decay even with a side of 1: LoHa's rank-1 factors, LoKr's convolution
    cores (r, r, k, 1), a one-unit bottleneck, one trainable token, a one-token prompt, a one-label
    head trained whole. Scales do not: (IA)^3's vectors (stored (out, 1)), VeRA's lambdas,
    AdaLoRA's singular values E."""
    import minipeft

    configs = {
        "loha": minipeft.LoHaConfig(r=1, target_modules=["adapter", "conv"], use_effective_conv2d=True),
        "lokr": minipeft.LoKrConfig(r=1, target_modules=["adapter", "conv"], use_effective_conv2d=True,
                                    decompose_both=True),
        "adalora": minipeft.AdaLoraConfig(init_r=1, target_r=1, total_step=4, target_modules=["adapter"]),
        "ia3": minipeft.IA3Config(target_modules=["adapter"], feedforward_modules=[]),
        "vera": minipeft.VeraConfig(r=4, target_modules=["adapter"]),
        "bottleneck": minipeft.BottleneckConfig(target_modules=["adapter"], bottleneck_size=1),
        "tokens": minipeft.TrainableTokensConfig(target_modules=["embed"], token_indices=[3]),
        "prompt": minipeft.PromptTuningConfig(num_virtual_tokens=1, input_embeddings_name="embed"),
        "one_label_head": minipeft.LoraConfig(r=1, target_modules=["adapter"], modules_to_save=["regressor"]),
    }

    class Prompted(TinyClassifier):  # takes inputs_embeds, as prompt tuning needs (the optimizer never runs it)
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
            raise NotImplementedError

    base = Prompted()
    base.conv = nn.Conv1d(32, 32, 3)  # 32 = 4 x 8 channels: LoKr's W2 a product, with a (1, 1, 3, 1) core
    base.regressor = nn.Linear(DIM, 1)  # a one-label head, (1, DIM)
    model = minipeft.get_peft_model(base, configs[method])
    opt = make_optimizer(model, TrainConfig(output_dir="unused", weight_decay=0.1))
    decayed = {n for n, p in model.named_parameters()
               if any(p is q for g in opt.param_groups if g["weight_decay"] > 0 for q in g["params"])}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scales = {n for n, p in trainable.items()
              if p.dim() < 2 or any(s in n for s in ("lora_E", "ia3_l", "vera_lambda", "bias"))}
    assert decayed == set(trainable) - scales and decayed | scales
    assert method in ("ia3", "vera") or any(min(trainable[n].shape) == 1 for n in decayed)


def test_lr_by_prefix_naming_only_frozen_parameters_is_refused():
    model = TinyClassifier()  # its embedding is frozen
    with pytest.raises(ValueError, match=r"no trainable parameter starts with: \['embed.'\] \(\['embed.'\] name only "
                                         r"frozen ones\)"):
        make_optimizer(model, TrainConfig(output_dir="unused", lr_by_prefix={"embed.": 0.1}))


class FixedLogits(nn.Module):
    """Logits looked up by the first input id: predictions chosen by the test."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float))

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.table[input_ids[:, 0]]


def test_f1_classes_come_from_the_logits_not_the_eval_labels():
    def batch(ids, labels):
        return {"input_ids": torch.tensor(ids).unsqueeze(1), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long),
                "labels": torch.tensor(labels)}

    # two classes, but this eval set holds only class 0, all predicted right: class-1 F1 is 0,
    # not a "macro" 1.0 over the one class that happens to appear
    binary = FixedLogits([[2.0, 0.0], [0.0, 2.0]])
    m = evaluate(binary, [batch([0, 0, 0], [0, 0, 0])])
    assert m["accuracy"] == 1.0 and m["f1"] == 0.0
    # three classes, class 2 absent from the labels and the predictions: macro over all three
    three = FixedLogits([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    m = evaluate(three, [batch([0, 1, 1], [0, 1, 0])])
    f1_0, f1_1 = 2 * 1 / (1 + 2), 2 * 1 / (2 + 1)
    assert m["f1"] == pytest.approx((f1_0 + f1_1 + 0.0) / 3)


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    train_loader, eval_loader = loaders(n_train=32)
    base = dict(output_dir=str(tmp_path), epochs=1, lr=1e-2, log_every=100)
    train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**base))
    with pytest.raises(ValueError, match=r"cannot resume.*lr: 0\.01 -> 0\.02.*warmup_steps: 0 -> 2.*new output_dir"):
        train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**{**base, "lr": 2e-2, "warmup_steps": 2}))
    # other data, same config: the schedule's length changed
    with pytest.raises(ValueError, match=r"steps_per_epoch: 4 -> 2.*total_steps: 4 -> 2"):
        train(TinyClassifier(), loaders(n_train=16)[0], eval_loader, TrainConfig(**base))
    # settings that change no math may differ; resume=False starts over
    train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**{**base, "log_every": 1, "patience": 3}))
    result = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**{**base, "lr": 2e-2, "resume": False}))
    assert result.step == 4


def test_resume_refuses_another_world_size(tmp_path):
    train_loader, eval_loader = loaders(n_train=32)
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)
    train(TinyClassifier(), train_loader, eval_loader, config)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["totals"]  # as an older checkpoint: only the RNG states tell the world size
    ckpt["rng"] = ckpt["rng"] * 2
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1"):
        train(TinyClassifier(), train_loader, eval_loader, config)


def test_best_weights_swap_recovers_from_a_crash_between_renames(tmp_path):
    from safetensors.torch import load_file

    from minipeft.train import save_weights

    model = TinyClassifier()
    save_weights(model, tmp_path / "best")
    first = load_file(tmp_path / "best" / "model.safetensors")
    (tmp_path / "best").rename(tmp_path / "best.old")  # the crash: old moved aside, new not yet in
    (tmp_path / "best.tmp").mkdir()  # and a half-written copy
    with torch.no_grad():
        model.adapter.weight.add_(1.0)
    save_weights(model, tmp_path / "best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert {"best.old", "best.tmp"} <= set(OUTPUT_NAMES)  # what such a crash leaves, for cleaning up a run
    assert not torch.equal(load_file(tmp_path / "best" / "model.safetensors")["adapter.weight"], first["adapter.weight"])
    assert {p.name for p in (tmp_path / "best").iterdir()} == {".saved_files", "model.safetensors"}


def test_distributed_on_gpus_pins_the_device_and_keeps_gloo_for_cpu_tensors(monkeypatch):
    import minipeft.train as train_module

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_module.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    train_module.setup_distributed()
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl")]


def test_resume_into_another_adapter_config_names_the_parameters_that_differ(tmp_path):
    import re

    from minipeft import LoraConfig, get_peft_model

    def lora(**kw):
        torch.manual_seed(0)
        return get_peft_model(TinyClassifier(), LoraConfig(lora_alpha=8, **kw))

    train_loader, eval_loader = loaders(n_train=32)
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)
    saved = lora(r=4, target_modules=["adapter", "classifier"])
    train(saved, train_loader, eval_loader, config)
    saved_shapes = {n: tuple(p.shape) for n, p in saved.named_parameters() if p.requires_grad}

    # another rank: every LoRA matrix has another shape; the message names one with both shapes
    wider = lora(r=8, target_modules=["adapter", "classifier"])
    before = trainable(wider)
    a = "base_model.model.adapter.lora_A.default.weight"
    expected = f"{a}: {saved_shapes[a]} in the checkpoint, {tuple(wider.get_parameter(a).shape)} in the model"
    assert saved_shapes[a] == (4, DIM) and expected.endswith(f"({8}, {DIM}) in the model")
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint\.pt.*shapes differ: .*" + re.escape(expected)
                                         + r".*new output_dir, or resume=False"):
        train(wider, train_loader, eval_loader, config)
    for name, value in before.items():  # nothing was loaded before the error
        assert torch.equal(trainable(wider)[name], value), name

    # fewer targets: the classifier's LoRA matrices are in the checkpoint only
    fewer = lora(r=4, target_modules=["adapter"])
    only_saved = sorted(set(saved_shapes) - {n for n, p in fewer.named_parameters() if p.requires_grad})
    assert only_saved and all(".classifier." in n for n in only_saved)
    with pytest.raises(ValueError, match=r"in the checkpoint but not trained in the model: "
                                         + re.escape(", ".join(only_saved))) as err:
        train(fewer, train_loader, eval_loader, config)
    assert "trained in the model but not in the checkpoint" not in str(err.value)
    # and the other way round: more targets than the checkpoint holds
    more = lora(r=4, target_modules=["adapter", "classifier"], modules_to_save=["embed"])
    with pytest.raises(ValueError, match=r"trained in the model but not in the checkpoint: .*modules_to_save"):
        train(more, train_loader, eval_loader, config)


class SavesLikeTransformers(TinyClassifier):
    """A model whose save_pretrained writes more than its weights (transformers: config.json, ...)."""

    def save_pretrained(self, folder):
        from safetensors.torch import save_model

        Path(folder, "config.json").write_text("{}")
        Path(folder, "README.md").write_text("a model card")
        save_model(self, str(Path(folder, "model.safetensors")))


def test_what_any_earlier_save_put_in_best_may_go_but_nothing_else(tmp_path):
    # best/ lists what save_weights filled it with: a run started over there (resume=False)
    # replaces all of it, whatever kind of model saved it, where a file of the user's is refused.
    train_loader, eval_loader = loaders(n_train=32)
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100, resume=False)
    train(SavesLikeTransformers(), train_loader, eval_loader, config)
    assert (tmp_path / "best" / ".saved_files").read_text().split() == ["README.md", "config.json", "model.safetensors"]
    train(SavesLikeTransformers(), train_loader, eval_loader, config)  # again: it used to be refused up front
    train(get_peft_model(TinyClassifier(), LoraConfig(r=2, target_modules=["adapter"])), train_loader, eval_loader,
          config)
    assert sorted(os.listdir(tmp_path / "best")) == [".saved_files", "adapter_config.json", "adapter_model.safetensors"]

    # A best/ saved before the folder listed its files: its weights may go all the same.
    (tmp_path / "best" / ".saved_files").unlink()
    train(SavesLikeTransformers(), train_loader, eval_loader, config)
    assert sorted(os.listdir(tmp_path / "best")) == [".saved_files", "README.md", "config.json", "model.safetensors"]


def test_a_second_run_into_a_finished_runs_output_dir_says_it_trains_nothing(tmp_path):
    train_loader, eval_loader = loaders(n_train=32)
    config = TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100)
    first = train(TinyClassifier(), train_loader, eval_loader, config)
    second_model = TinyClassifier(dropout=0.5)  # e.g. a sweep over what the checkpoint does not record
    with pytest.warns(UserWarning, match=r"checkpoint.pt holds a finished run \(step 4 of 4\): nothing is trained, "
                                         r"and that run's weights and results are returned"):
        second = train(second_model, train_loader, eval_loader, config)
    assert second.step == first.step and second.history == first.history


def test_started_over_in_the_same_output_dir_a_run_of_another_kind_replaces_the_best_weights(tmp_path):
    # An adapter's best/ (adapter files), then a plain module trained whole there with resume=False,
    # as the refusal advises: its best/ (model.safetensors) replaces the adapter's. It used to
    # fail at the first evaluation, after training, the earlier run's records already dropped.
    train_loader, eval_loader = loaders(n_train=32)
    torch.manual_seed(0)
    adapted = get_peft_model(TinyClassifier(), LoraConfig(r=2, target_modules=["adapter"], modules_to_save=["classifier"]))
    train(adapted, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100))
    assert sorted(os.listdir(tmp_path / "best")) == [".saved_files", "adapter_config.json", "adapter_model.safetensors"]
    plain = TinyClassifier()
    train(plain, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100,
                                                        resume=False, restore_best=False))
    assert sorted(os.listdir(tmp_path / "best")) == [".saved_files", "model.safetensors"]
    # A file of the user's in best/ is refused before the first step, the earlier run's files as they were.
    (tmp_path / "best" / "notes.txt").write_text("mine")
    records = (tmp_path / "metrics.jsonl").read_text()
    before = trainable(plain)
    with pytest.raises(FileExistsError, match=r"best holds \['notes.txt'\], which are no weights this loop saved"):
        train(plain, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=2, log_every=100,
                                                            resume=False))
    assert (tmp_path / "metrics.jsonl").read_text() == records
    assert all(torch.equal(trainable(plain)[name], value) for name, value in before.items())


@pytest.mark.parametrize("field, value, message", [
    ("grad_accum_steps", 0, r"grad_accum_steps must be an integer >= 1 \(1: no accumulation\), not 0"),
    ("log_every", 0, r"log_every must be an integer >= 1, not 0"),
    ("task", "clf", r"task 'clf' is not valid; use one of 'auto', 'classification', 'token_classification', 'causal_lm'"),
    ("metric", "acc", r"metric 'acc' is not valid; use one of 'auto', 'loss', 'accuracy', 'f1', 'perplexity'"),
    ("schedule", "step", r"schedule 'step' is not valid; use one of 'linear', 'cosine', 'constant'"),
    ("epochs", 0, r"epochs must be an integer >= 1 \(or set max_steps\), not 0"),
    ("max_steps", 0, r"max_steps must be an integer >= 1 or None"),
    ("lr", -1e-3, r"lr must be a number >= 0, not -0.001"),
    ("lr", float("nan"), r"lr must be a number >= 0, not nan"),
    ("warmup_ratio", 1.5, r"warmup_ratio must be in \[0, 1\)"),
    ("betas", (0.9,), r"betas must be two numbers in \[0, 1\)"),
    ("max_grad_norm", 0.0, r"max_grad_norm must be a number > 0, or None for no clipping, not 0.0"),
    ("patience", 0, r"patience must be an integer >= 1 or None"),
    ("eval_every", -1, r"eval_every must be an integer >= 0"),
    ("epochs", 1.5, r"epochs must be an integer >= 1"),
    ("device", "gpu", r"device 'gpu' is not a torch device; use e.g. 'cpu', 'cuda'"),
    ("resume", "False", r"resume must be True or False, not 'False'"),  # (a string would read as true)
    ("save_best", 0, r"save_best must be True or False, not 0"),
    ("seed", 2**70, r"seed must be an integer in \[-9223372036854775808, 9223372036854775807\], not"),
])
def test_config_refuses_bad_values_naming_the_valid_ones(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir=str(tmp_path), **{field: value})


def test_train_and_evaluate_refuse_what_they_would_misread(tmp_path):
    train_loader, eval_loader = loaders(n_train=32)
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict; e.g. TrainConfig\(\*\*your_dict\)"):
        train(TinyClassifier(), train_loader, eval_loader, {"output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"task 'classify' is not valid; use one of 'auto', 'classification'"):
        evaluate(TinyClassifier(), eval_loader, task="classify")


def test_config_metric_must_fit_the_task(tmp_path):
    with pytest.raises(ValueError, match=r"metric 'perplexity' is not valid for task 'classification'; "
                                         r"use one of 'auto', 'loss', 'accuracy', 'f1'"):
        TrainConfig(output_dir=str(tmp_path), task="classification", metric="perplexity")
    # the edges of the valid ranges are accepted
    TrainConfig(output_dir=str(tmp_path), lr=0.0, warmup_ratio=0.0, eval_every=0, max_grad_norm=None, patience=1,
                epochs=0, max_steps=3, task="causal_lm", metric="perplexity", device="cpu")


def test_metric_of_another_task_fails_before_the_first_step(tmp_path):
    # task "auto" learns from the first batch's labels that this is classification, which
    # reports no perplexity: the run stops there, not at the first evaluation after training
    torch.manual_seed(0)
    model = TinyClassifier()
    before = trainable(model)
    train_loader, eval_loader = loaders(n_train=32)
    with pytest.raises(ValueError, match=r"metric 'perplexity' is not reported for task 'classification'; "
                                         r"use one of 'auto', 'loss', 'accuracy', 'f1'"):
        train(model, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), metric="perplexity"))
    for name, value in before.items():
        assert torch.equal(trainable(model)[name], value), name
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_batch_without_target_tokens_adds_nothing_to_the_loss(tmp_path):
    # A causal-LM batch whose labels are all -100 after the shift (a one-token target at
    # position 0) has no mean loss; it must not turn the evaluation or the logged loss into NaN.
    torch.manual_seed(0)
    examples = [{"input_ids": [(s + i) % VOCAB for i in range(6)], "labels": [(s + i) % VOCAB for i in range(6)]}
                for s in range(8)]
    empty = {"input_ids": [5, 6], "labels": [5, -100]}
    model = TinyLM()
    with_empty = evaluate(model, [*BatchLoader(examples, batch_size=4), next(iter(BatchLoader([empty], batch_size=1)))])
    assert with_empty == evaluate(model, BatchLoader(examples, batch_size=4))
    train(model, BatchLoader([empty] * 4 + examples, batch_size=4), None,
          TrainConfig(output_dir=str(tmp_path), log_every=1, max_grad_norm=None))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == 0.0 and all(math.isfinite(x) and x > 0 for x in losses[1:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Regressor(TinyClassifier):
    """Computes its own loss, as transformers' models do for num_labels=1 (problem_type "regression")."""

    def forward(self, input_ids, attention_mask, labels=None):
        prediction = super().forward(input_ids, attention_mask)[:, 0]
        return {"loss": F.mse_loss(prediction, labels), "logits": prediction[:, None]}


def test_float_labels_train_a_model_that_computes_its_own_loss_and_evaluate_by_it(tmp_path):
    train_loader, eval_loader = ([{**b, "labels": b["labels"].float() * 2 - 1} for b in loader]
                                 for loader in loaders(n_train=32))
    model = Regressor()
    result = train(model, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=3, lr=3e-2,
                                                                  log_every=100))
    assert sorted(result.history[0]) == ["best", "eval", "eval_loss", "step"]
    with torch.no_grad():
        expected = sum(model(**b)["loss"].item() * len(b["labels"]) for b in eval_loader) / 64
    assert evaluate(model, eval_loader) == {"loss": pytest.approx(expected)}
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]


def test_an_adapter_loaded_for_inference_is_refused_saying_how_to_train_it_and_the_model_is_left_alone(tmp_path):
    from minipeft import PeftModel

    get_peft_model(TinyClassifier(), LoraConfig(r=2, target_modules=["adapter"])).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(TinyClassifier(), tmp_path / "a")  # in eval mode, frozen
    with pytest.raises(ValueError, match=r"no trainable parameters .* adapter\(s\) \['default'\] were loaded for "
                                         r"inference .* load them with is_trainable=True"):
        train(model, loaders(n_train=32)[0], None, TrainConfig(output_dir=str(tmp_path / "out")))
    assert not model.training and not (tmp_path / "out").exists()


class ScoresUnderAnotherName(TinyClassifier):
    def forward(self, input_ids, attention_mask, labels=None):
        scores = super().forward(input_ids, attention_mask)
        return {"loss": F.cross_entropy(scores, labels), "scores": scores}


@pytest.mark.parametrize("case, message", [
    ("no labels", r"a batch needs its targets under 'labels' .*; this one has \['input_ids', 'label'\]"),
    ("no eval labels", r"a batch needs its targets under 'labels' .*; this one has \['input_ids', 'label'\]"),
    ("empty eval", r"eval_batches is empty: pass some evaluation examples, or None"),
    ("generator eval", r"eval_batches must be a sized collection that can be iterated again each epoch"),
    ("patience without eval", r"patience=2 stops on evaluations without improvement, and there are none"),
    ("long warmup", r"warmup_steps=10 is longer than the run's 4 steps"),
    ("dropped", r"train_batches is empty: no training batches \(drop_last=True drops"),
    ("float labels", r"the labels are floats \(task 'regression'\), whose loss the model must compute itself"),
    ("float eval labels", r"task 'classification' takes integer labels, and this batch's are torch.float32: float "
                          r"labels are a regression"),
    ("examples as batches", r"train_batches: a batch holds \['input_ids'\] as Python lists; a batch is a dict of "
                            r"tensors"),
    ("one batch alone", r"train_batches yields strs, where each item is a batch: a dict of tensors .* \(one batch "
                        r"alone goes in a list"),
    ("config as eval_batches", r"the third argument of train\(\) is eval_batches; pass the TrainConfig as config="),
    ("no logits", r"the model's forward returned \['loss', 'scores'\], without 'logits'"),
])
def test_unusable_runs_are_refused_before_training(tmp_path, case, message):
    # Each found before the first step (the eval batches' keys used to fail after an epoch).
    train_loader, eval_loader = loaders(n_train=32)  # 4 steps an epoch
    config = TrainConfig(output_dir=str(tmp_path), warmup_steps=10 if case == "long warmup" else 0,
                         patience=2 if case == "patience without eval" else None)
    relabel = lambda batches: [{"input_ids": b["input_ids"], "label": b["labels"]} for b in batches]  # noqa: E731
    as_floats = lambda batches: [{**b, "labels": b["labels"].float()} for b in batches]  # noqa: E731
    if case in ("no labels", "float labels"):
        train_loader = (relabel if case == "no labels" else as_floats)(train_loader)
    eval_batches = {"no eval labels": relabel(eval_loader), "empty eval": [], "patience without eval": None,
                    "generator eval": (b for b in eval_loader), "float eval labels": as_floats(eval_loader),
                    "float labels": as_floats(eval_loader)}.get(case, eval_loader)
    if case == "dropped":
        train_loader = BatchLoader(tiny_examples(3), batch_size=4, drop_last=True)
    if case == "examples as batches":
        train_loader = tiny_examples(32)  # BatchLoader forgotten
    if case == "one batch alone":
        train_loader = next(iter(train_loader))
    if case == "config as eval_batches":
        eval_batches, config = config, None
    model = TinyClassifier()
    if case == "no logits":
        model = ScoresUnderAnotherName()
    with pytest.raises((ValueError, TypeError), match=message):
        train(model, train_loader, eval_batches, config)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "it is damaged or not a checkpoint"),  # cut short
    (lambda path: path.write_bytes(b""), "it is damaged or not a checkpoint"),
    (lambda path: torch.save({"step": 3}, path), r"it is not a checkpoint .*it lacks trainable, optimizer, scheduler, rng"),
])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, damage, message):
    train_loader, eval_loader = loaders(n_train=32)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2)
    train(TinyClassifier(), train_loader, eval_loader, config)
    damage(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=rf"cannot resume from .*checkpoint.pt: {message}.*Delete it to start over"):
        train(TinyClassifier(), train_loader, eval_loader, config)


def test_an_output_dir_given_as_a_path_resumes_and_a_file_is_refused(tmp_path):
    # The checkpoint records the config and loads only plain types: the path is kept as a str.
    train_loader, eval_loader = loaders(n_train=32)
    train(TinyClassifier(), train_loader, eval_loader, TrainConfig(output_dir=tmp_path / "run", max_steps=2))
    result = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(output_dir=tmp_path / "run", max_steps=2))
    assert result.step == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="output_dir=.*file' is a file; give a folder"):
        TrainConfig(output_dir=tmp_path / "file")


def test_a_plain_forward_without_labels_is_called_without_them(tmp_path):
    # forward(self, input_ids, attention_mask): the labels are the loop's, the loss computed here
    class NoLabels(TinyClassifier):
        def forward(self, input_ids, attention_mask):
            return super().forward(input_ids, attention_mask)

    train_loader, eval_loader = loaders(n_train=32)
    torch.manual_seed(0)
    plain = train(NoLabels(), train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "a"), max_steps=3))
    torch.manual_seed(0)
    usual = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "b"), max_steps=3))
    assert plain.best_metric == usual.best_metric and plain.step == usual.step == 3


def test_a_model_returning_a_tuple_gets_a_clear_error(tmp_path):
    class TupleClassifier(TinyClassifier):
        def forward(self, input_ids, attention_mask, labels=None):
            return (super().forward(input_ids, attention_mask),)
    train_loader, _ = loaders(n_train=8)
    with pytest.raises(TypeError, match=r"returned a tuple, whose entries have no names.*return_dict=True"):
        train(TupleClassifier(), train_loader, None, TrainConfig(output_dir=str(tmp_path)))


def test_a_run_stopped_early_goes_on_when_resumed_with_more_patience(tmp_path):
    # patience may change on resume: the evaluations without improvement so far are kept, and
    # with a larger patience (or none) the run continues from where it stopped.
    train_loader, eval_loader = loaders(n_train=64)
    config = dict(output_dir=str(tmp_path), epochs=3, eval_every=1, lr=0.0)  # lr 0: never improves after the first
    first = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**config, patience=1))
    assert first.stopped_early and first.step == 2
    again = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**config, patience=1))
    assert again.stopped_early and again.step == 2  # same patience: nothing more to do
    more = train(TinyClassifier(), train_loader, eval_loader, TrainConfig(**config, patience=3))
    assert more.stopped_early and more.step == 4


def test_the_throughput_counts_training_time_only(tmp_path, monkeypatch):
    # A fake clock: each training step takes 1 s, each evaluation 100 s. The logged tokens per
    # second are the tokens over the steps' seconds alone.
    import minipeft.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    real_step, real_evaluate = train_module._optimizer_step, train_module.evaluate

    def step(*args, **kwargs):
        clock[0] += 1.0
        return real_step(*args, **kwargs)

    def slow_evaluate(*args, **kwargs):
        clock[0] += 100.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", step)
    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    train_loader, eval_loader = loaders(n_train=32)  # 4 steps of 8 examples
    train(TinyClassifier(), train_loader, eval_loader,
          TrainConfig(output_dir=str(tmp_path), eval_every=1, log_every=2))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
    tokens = [sum(int(b["attention_mask"].sum()) for b in list(train_loader)[i:i + 2]) for i in (0, 2)]
    assert rates == pytest.approx([tokens[0] / 2.0, tokens[1] / 2.0])


def test_torch_compile_trains_as_the_eager_loop(tmp_path):
    # The run's forwards compiled (AOT autograd without code generation here), the rest as is: the
    # same losses, evaluations and weights, and files that name the model's own parameters
    # (never the compiled wrapper's "_orig_mod." prefix).
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(TinyClassifier(), LoraConfig(r=4, target_modules=["adapter"],
                                                            modules_to_save=["classifier"]))
        train_loader, eval_loader = loaders(n_train=48)
        config = TrainConfig(output_dir=str(tmp_path / str(compiled)), epochs=2, lr=3e-2, log_every=1,
                             torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        result = train(model, train_loader, eval_loader, config)
        assert bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]) == compiled  # (compiled, or not)
        runs[compiled] = (result.history, trainable(model), type(model), sorted(os.listdir(tmp_path / str(compiled) / "best")))
    (eager_history, eager_weights, eager_type, eager_files), (history, weights, model_type, files) = runs[False], runs[True]
    assert model_type is eager_type and files == eager_files
    assert [sorted(h) for h in history] == [sorted(h) for h in eager_history]
    for h, e in zip(history, eager_history, strict=True):
        assert all(math.isclose(h[k], e[k], rel_tol=1e-5, abs_tol=1e-6) for k in h if k not in ("tokens_per_s", "seconds"))
    for name, weight in weights.items():
        torch.testing.assert_close(weight, eager_weights[name], rtol=1e-5, atol=1e-6)


def test_torch_compile_settings_are_checked():
    with pytest.raises(ValueError, match="torch_compile is off"):
        TrainConfig(output_dir="out", torch_compile_backend="aot_eager")
    with pytest.raises(ValueError, match="torch_compile_mode"):
        TrainConfig(output_dir="out", torch_compile=True, torch_compile_mode="fast")
    with pytest.raises(ValueError, match="torch_compile must be True or False"):
        TrainConfig(output_dir="out", torch_compile="yes")
    with pytest.raises(ValueError, match=r"torch_compile_backend must be one of torch's backends \[.*'aot_eager'"):
        TrainConfig(output_dir="out", torch_compile=True, torch_compile_backend="inductr")
    with pytest.raises(ValueError, match="torch_compile_mode is inductor's"):
        TrainConfig(output_dir="out", torch_compile=True, torch_compile_backend="aot_eager",
                    torch_compile_mode="reduce-overhead")
    TrainConfig(output_dir="out", torch_compile=True, torch_compile_mode="reduce-overhead")  # (inductor's: fine)

"""AdaLoRA against peft (a training run with rank allocation, step for step; checkpoints both
ways at the allocated ranks) and against hand-derived math (the SVD-form update, the orthogonal
regulariser, the budget schedule); and the training loop driving the allocator, resume included."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import minipeft
from minipeft.train import TrainConfig, train
from minipeft.tuners.adalora_budget import RankAllocator
from tests.models import VOCAB
from minipeft.data import BatchLoader
from tests.test_train import Crash, CrashingLoader, TinyClassifier, loaders, tiny_examples, trainable

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SCHEDULE = dict(init_r=6, target_r=3, tinit=2, tfinal=3, deltaT=2, total_step=12)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def pair(**options):
    """(peft model, minipeft model) on one tiny LLaMA, minipeft holding peft's factors."""
    base = tiny_llama()
    config = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], lora_alpha=8, **SCHEDULE) | options
    p = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**config))
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.AdaLoraConfig(**config))
    # peft keeps R (ranknum) as a frozen parameter; minipeft as a number. All else is one to one.
    m.load_state_dict({k: v for k, v in p.state_dict().items() if ".ranknum." not in k}, strict=True)
    return base, p, m


def ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(seed))


def run_in_step(p, m, steps: int) -> None:
    """Train both for ``steps`` steps as peft documents: backward, step, update_and_allocate, zero_grad."""
    batch = ids()
    opt_p = torch.optim.Adam([t for t in p.parameters() if t.requires_grad], lr=0.02)
    opt_m = torch.optim.Adam([t for t in m.parameters() if t.requires_grad], lr=0.02)
    for step in range(1, steps + 1):
        loss_p, loss_m = p(input_ids=batch, labels=batch).loss, m(input_ids=batch, labels=batch).loss
        torch.testing.assert_close(loss_m, loss_p, atol=1e-6, rtol=0)
        loss_p.backward()
        loss_m.backward()
        opt_p.step()
        opt_m.step()
        p.base_model.update_and_allocate(step)
        m.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        opt_m.zero_grad()
        for name, t in p.named_parameters():
            if ".ranknum." not in name:
                torch.testing.assert_close(m.get_parameter(name), t, atol=1e-6, rtol=0, msg=f"{name} at step {step}")


def test_training_with_rank_allocation_matches_peft_step_by_step():
    _, p, m = pair()
    run_in_step(p, m, 14)  # warm-up, pruning every other step, the final budget, then fine-tuning
    theirs = {k.removesuffix(".default"): v for k, v in p.peft_config["default"].rank_pattern.items()}
    ours = m.peft_config["default"].rank_pattern
    assert ours == theirs
    assert sum(sum(mask) for mask in ours.values()) == 3 * 4  # the final budget: target_r per layer
    for mask_key, mask in ours.items():  # pruned singular values stay at zero
        E = m.get_base_model().get_submodule(mask_key.removesuffix(".lora_E")).lora_E["default"]
        assert not E[~torch.tensor(mask)].any()


def test_checkpoints_keep_the_allocated_ranks_both_ways(tmp_path):
    base, p, m = pair()
    run_in_step(p, m, 14)
    batch = ids()
    with torch.no_grad():
        adapted = m(input_ids=batch).logits
    m.save_pretrained(tmp_path / "mini")
    saved = json.loads((tmp_path / "mini" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == m.peft_config["default"].rank_pattern
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "mini" / "adapter_model.safetensors")
    for mask_key, mask in saved["rank_pattern"].items():  # each layer cut to the triplets it keeps
        layer = "base_model.model." + mask_key.removesuffix(".lora_E")
        assert tensors[f"{layer}.lora_A"].shape[0] == tensors[f"{layer}.lora_B"].shape[1] == sum(mask)
    p2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    with torch.no_grad():
        torch.testing.assert_close(p2(input_ids=batch).logits, adapted, atol=1e-6, rtol=0)

    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    layer = m2.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.r["default"] == sum(m.peft_config["default"].rank_pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert layer.ranknum["default"] == 6  # R stays the rank the budget started from
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=batch).logits, adapted, atol=1e-6, rtol=0)


def test_a_peft_checkpoint_with_lora_fields_peft_s_adalora_ignores_loads_with_a_warning(tmp_path):
    # peft's AdaLoraConfig inherits use_rslora, lora_bias and alpha_pattern from LoraConfig, and
    # its layers never read them: the same outputs either way. So minipeft loads such a file as
    # peft does, and says what it ignored; a field it lacks that peft does read stays refused.
    base = tiny_llama()
    ignored = dict(use_rslora=True, lora_bias=True, alpha_pattern={"q_proj": 64})
    config = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], lora_alpha=8, **SCHEDULE)
    torch.manual_seed(1)
    p = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**config, **ignored))
    torch.manual_seed(1)
    plain = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**config))
    with torch.no_grad():
        for t in p.parameters():
            if t.requires_grad:
                t.normal_()
    plain.load_state_dict(p.state_dict())
    batch = ids()
    with torch.no_grad():
        theirs = p.eval()(input_ids=batch).logits
        torch.testing.assert_close(plain.eval()(input_ids=batch).logits, theirs, atol=0, rtol=0)  # ignored by peft
    p.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="use_rslora=True is ignored, as peft's AdaLoraConfig ignores it") as seen:
        m = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert any("lora_bias=True is ignored" in str(w.message) for w in seen)
    assert any("alpha_pattern={'q_proj': 64} is ignored" in str(w.message) for w in seen)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(input_ids=batch).logits, theirs, atol=1e-6, rtol=0)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="use_dora=True asks for a peft feature"):
        minipeft.get_peft_config({**saved, "use_dora": True})


def test_the_update_is_p_diag_e_q_over_the_initial_rank():
    _, _, m = pair(init_lora_weights=False)
    layer = m.get_base_model().model.layers[0].self_attn.q_proj
    A, B, E = (getattr(layer, f)["default"] for f in ("lora_A", "lora_B", "lora_E"))
    x = torch.randn(3, 32)
    want = layer.base_layer(x) + x @ (B @ torch.diag(E.view(-1)) @ A).T * 8 / (6 + 1e-5)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        before = layer(x)
        m.merge_adapter()
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


def test_the_orthogonal_regulariser_joins_a_computed_loss():
    _, _, m = pair(init_lora_weights=False, orth_reg_weight=0.3)
    batch = ids()
    terms = []
    for module in m.get_base_model().modules():
        if isinstance(module, minipeft.tuners.adalora.SVDLinear):
            A, B = module.lora_A["default"], module.lora_B["default"]
            terms += [torch.linalg.norm(A @ A.T - torch.eye(6)), torch.linalg.norm(B.T @ B - torch.eye(6))]
    with torch.no_grad():
        with_loss = m(input_ids=batch, labels=batch).loss
        logits = m(input_ids=batch).logits
        plain = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(with_loss, plain + 0.3 * torch.stack(terms).mean(), atol=1e-5, rtol=0)


def test_the_budget_shrinks_on_a_cubic_schedule():
    _, _, m = pair(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    allocator = m.base_model.rank_allocators["default"]
    b0, bT = 6 * 4, 2 * 4
    assert [allocator.budget(t) for t in (1, 2)] == [(b0, False), (b0, False)]
    for t in range(3, 10):
        assert allocator.budget(t) == (int((b0 - bT) * (1 - (t - 2) / 7) ** 3 + bT), t % 2 == 0)
    assert allocator.budget(10) == allocator.budget(11) == (bT, True)  # past T - tfinal: the final budget


def test_update_and_allocate_needs_the_gradients_and_an_active_adapter():
    _, _, m = pair()
    with pytest.raises(RuntimeError, match=r"found no gradient on .*lora_A: call it after loss.backward\(\)"):
        m.base_model.update_and_allocate(3)
    m.add_adapter("lora", minipeft.LoraConfig(target_modules=["q_proj"]))
    m.set_adapter("lora")
    with pytest.raises(ValueError, match=r"none is active \(AdaLoRA adapters: \['default'\]; activate one"):
        m.base_model.update_and_allocate(3)


def test_bad_configs_are_refused_with_what_would_be_right():
    with pytest.raises(ValueError, match=r"give total_step, the number of steps"):
        minipeft.AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"tinit=5 and tfinal=5 leave no step to allocate ranks in"):
        minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match=r"target_r=16 is the average rank the budget shrinks to from init_r=12"):
        minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, target_r=16)
    with pytest.raises(ValueError, match=r"tfinal is a number of steps, >= 0; got -1"):
        minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, tfinal=-1)
    with pytest.raises(ValueError, match=r"the final pruning needs the importance of a step before it"):
        minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, tfinal=9)  # step 1 would be the final one
    with pytest.raises(ValueError, match=r"cannot apply AdaLoRA to 'embed': it is a Embedding"):
        model = nn.Module()
        model.embed = nn.Embedding(4, 4)
        minipeft.get_peft_model(model, minipeft.AdaLoraConfig(target_modules=["embed"], total_step=10))


# -- the training loop --------------------------------------------------------------------------
def adalora_classifier(total_step: int, init_lora_weights: bool = False, deltaT: int = 1) -> nn.Module:
    torch.manual_seed(0)
    config = minipeft.AdaLoraConfig(target_modules=["adapter", "classifier"], init_r=4, target_r=1, tinit=1, tfinal=2,
                                    total_step=total_step, init_lora_weights=init_lora_weights, lora_alpha=4,
                                    deltaT=deltaT)
    return minipeft.get_peft_model(TinyClassifier(), config)


def test_the_training_loop_allocates_ranks_and_resumes_the_allocator(tmp_path):
    train_loader, eval_loader = loaders(n_train=96)  # 12 steps an epoch

    def config(out):  # (the last weights, not the best: restore_best has a test of its own)
        return TrainConfig(output_dir=str(out), epochs=2, lr=1e-2, eval_every=6, checkpoint_every=3,
                           restore_best=False)

    reference = adalora_classifier(24)
    train(reference, train_loader, eval_loader, config(tmp_path / "a"))
    pattern = reference.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 2  # pruned to target_r per layer by the loop

    model = adalora_classifier(24)
    with pytest.raises(Crash):  # dies after the checkpoint at step 15, in the pruning phase
        train(model, CrashingLoader(train_loader, after=12 + 4), eval_loader, config(tmp_path / "b"))
    resumed = adalora_classifier(24)
    train(resumed, train_loader, eval_loader, config(tmp_path / "b"))
    assert resumed.peft_config["default"].rank_pattern == pattern
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)


def test_restore_best_restores_the_ranks_the_best_weights_were_evaluated_with(tmp_path):
    """The best evaluation falls before the final allocation here (the evaluation set has its labels
    flipped, so it only gets worse), between two pruning steps (deltaT = 3), where the optimizer has
    moved pruned singular values again: the model ends with that evaluation's weights and
    rank_pattern together, pruned values at zero, so it computes what its own checkpoint does."""
    train_loader, _ = loaders(n_train=96)
    eval_loader = BatchLoader([{**e, "label": 1 - e["label"]} for e in tiny_examples(64, 1)], batch_size=32)
    model = adalora_classifier(24, init_lora_weights=True, deltaT=3)  # starts as the base model: it can only get worse
    result = train(model, train_loader, eval_loader,
                   TrainConfig(output_dir=str(tmp_path / "run"), epochs=2, lr=5e-2, eval_every=4, metric="loss"))
    assert result.best_step < 24 - 2  # before the final allocation at T - tfinal
    batch = {k: v for k, v in next(iter(eval_loader)).items() if k != "labels"}
    model.save_pretrained(tmp_path / "saved")
    reloaded = minipeft.PeftModel.from_pretrained(TinyClassifier(), tmp_path / "saved")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch), model(**batch), atol=1e-6, rtol=0)


def test_the_training_loop_adds_the_regulariser_to_a_loss_it_computes():
    """TinyClassifier returns logits, so train() computes the loss: AdaLoRA's regulariser must join it."""
    from minipeft.train import _forward

    model = adalora_classifier(24)
    batch = next(iter(loaders()[0]))
    model.train()
    loss, logits = _forward(model, batch, "classification")
    plain = nn.functional.cross_entropy(logits.float(), batch["labels"])
    reg = minipeft.tuners.adalora.orthogonal_regularization(model.get_base_model(), "default")
    torch.testing.assert_close(loss, plain + 0.5 * reg)
    model.eval()  # evaluation losses leave it out
    torch.testing.assert_close(_forward(model, batch, "classification")[0], plain)


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "frozen dataclass"])
def test_the_regulariser_joins_a_loss_a_plain_model_returns(kind):
    # A hand-written model returns its loss in its own container; transformers' outputs are tested above.
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", "loss logits")

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        loss: torch.Tensor
        logits: torch.Tensor

    wrap = {"dict": lambda loss, logits: {"loss": loss, "logits": logits}, "namedtuple": Pair, "frozen dataclass": Frozen}[kind]

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            logits = self.fc(x)
            return wrap(logits.pow(2).mean(), logits)

    torch.manual_seed(0)
    model = minipeft.get_peft_model(WithLoss(), minipeft.AdaLoraConfig(target_modules=["fc"], total_step=10,
                                                                       init_lora_weights=False, orth_reg_weight=0.5))
    x = torch.randn(3, 6)
    out = model(x)
    loss = out["loss"] if kind == "dict" else out.loss
    logits = out["logits"] if kind == "dict" else out.logits
    reg = minipeft.tuners.adalora.orthogonal_regularization(model.get_base_model(), "default")
    assert float(reg) > 0
    torch.testing.assert_close(loss, logits.pow(2).mean() + 0.5 * reg)  # was the bare loss, or an error


def test_evaluating_leaves_the_training_as_it_would_be_without(tmp_path):
    """Evaluation looks at the adapter as its checkpoint holds it (pruned values at zero), then puts
    the values the optimizer moved back: with or without evaluations, the same weights at the end."""
    train_loader, eval_loader = loaders(n_train=96)
    models = {}
    for evals in (eval_loader, None):
        models[evals is None] = adalora_classifier(24, deltaT=3)
        train(models[evals is None], train_loader, evals, TrainConfig(output_dir=str(tmp_path / str(evals is None)),
                                                                      epochs=2, lr=1e-2, eval_every=4, restore_best=False))
    for name, value in trainable(models[True]).items():
        torch.testing.assert_close(trainable(models[False])[name], value, rtol=0, atol=0)


def test_the_training_loop_refuses_a_schedule_of_other_length(tmp_path):
    train_loader, eval_loader = loaders(n_train=96)
    with pytest.raises(ValueError, match=r"total_step=10 steps, but this run takes 12 optimizer steps; create the "
                                         r"adapter with AdaLoraConfig\(total_step=12\)"):
        train(adalora_classifier(10), train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path), epochs=1))


def test_an_adapter_loaded_with_its_ranks_allocated_fine_tunes_without_an_allocator(tmp_path):
    """Its layers are sum(mask) wide, not init_r: the allocator's masks and budget no longer fit."""
    base, p, m = pair()
    run_in_step(p, m, 14)
    m.save_pretrained(tmp_path)
    loaded = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert loaded.base_model.rank_allocators == {}
    assert any(t.requires_grad for t in loaded.parameters())
    with pytest.raises(ValueError, match=r"with its ranks allocated already \(rank_pattern\), has no allocator"):
        loaded.base_model.update_and_allocate(15)


def test_rank_allocator_is_built_only_for_a_training_adapter():
    base = tiny_llama()
    config = minipeft.AdaLoraConfig(target_modules=["q_proj"], inference_mode=True, **SCHEDULE)
    m = minipeft.get_peft_model(base, config)
    assert m.base_model.rank_allocators == {}


@pytest.mark.parametrize("restored", [True, False])
def test_an_allocator_restored_from_its_state_continues_as_the_original(restored):
    """What a resumed run relies on: the importance statistics carry the pruning decisions; an
    allocator started afresh midway decides otherwise."""
    _, _, m = pair()
    twin = copy.deepcopy(m)
    twin.base_model.rank_allocators["default"] = RankAllocator(twin.get_base_model(), twin.peft_config["default"],
                                                               "default")
    batch = ids()
    optimizers = [torch.optim.Adam([t for t in model.parameters() if t.requires_grad], lr=0.02) for model in (m, twin)]
    for step in range(1, 9):
        for model, optimizer in zip((m, twin), optimizers):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
        if step == 4:  # the twin "resumes" here with a fresh allocator, given the original's state or not
            allocator = RankAllocator(twin.get_base_model(), twin.peft_config["default"], "default")
            if restored:
                allocator.load_state_dict(copy.deepcopy(m.base_model.rank_allocators["default"].state_dict()))
            twin.base_model.rank_allocators["default"] = allocator
    same = twin.peft_config["default"].rank_pattern == m.peft_config["default"].rank_pattern and all(
        torch.equal(t, twin.get_parameter(n)) for n, t in m.named_parameters() if t.requires_grad)
    assert same == restored


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, labels=None):
        from types import SimpleNamespace

        logits = self.fc(self.conv2(torch.relu(self.conv(x))).mean((2, 3)))
        return SimpleNamespace(logits=logits, loss=None if labels is None else nn.functional.cross_entropy(logits, labels))


def test_conv2d_layers_train_allocate_and_save_as_peft_s(tmp_path):
    """nn.Conv2d, its kernel flattened to (out, in * kh * kw) as peft's SVDConv2d: the same
    training with allocation, step for step, and checkpoints both ways. (peft's generic PeftModel,
    with no task type, leaves the regulariser out: weight 0 here.)"""
    torch.manual_seed(0)
    base = ConvNet()
    config = dict(target_modules=["conv", "conv2", "fc"], lora_alpha=8, init_lora_weights=False, orth_reg_weight=0.0,
                  **SCHEDULE)
    p = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**config))
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.AdaLoraConfig(**config))
    m.load_state_dict({k: v for k, v in p.state_dict().items() if ".ranknum." not in k}, strict=True)
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    optimizers = [torch.optim.Adam([t for t in model.parameters() if t.requires_grad], lr=0.02) for model in (p, m)]
    for step in range(1, 15):
        for model, optimizer in zip((p, m), optimizers):
            model(x, labels=y).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
    for name, t in p.named_parameters():
        if ".ranknum." not in name:
            torch.testing.assert_close(m.get_parameter(name), t, atol=1e-5, rtol=1e-5)
    assert m.peft_config["default"].rank_pattern == {k.removesuffix(".default"): v
                                                     for k, v in p.peft_config["default"].rank_pattern.items()}
    m.save_pretrained(tmp_path / "mini")
    p.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")(x).logits,
                                   m(x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")(x).logits,
                                   p(x).logits, atol=1e-5, rtol=1e-5)

"""LoRA-FA (minipeft.optimizers.lorafa): the projected gradient against a least-squares solve,
training steps against peft's optimizer, and a resumed optimizer against one never stopped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from minipeft import LoraConfig, create_lorafa_optimizer, get_peft_model
from minipeft.optimizers.lorafa import LoraFAOptimizer, gram_inverse, projected_gradient
from tests.models import TinyNet, input_ids, tiny_transformers_model


def test_the_projected_gradient_is_the_step_of_b_closest_to_full_fine_tuning():
    # With A fixed, a step dB moves W by s dB A; the dB that comes closest to the full gradient
    # g_W solves min ||s dB A - g_W||_F, a least-squares problem solved here independently.
    torch.manual_seed(0)
    out, r, d, s = 7, 3, 11, 2.5
    a, g_w = torch.randn(r, d, dtype=torch.float64), torch.randn(out, d, dtype=torch.float64)
    g_b = s * g_w @ a.T  # dL/dB for W' = W + s B A
    closest = torch.linalg.lstsq(s * a.T, g_w.T).solution.T  # (out, r)
    torch.testing.assert_close(projected_gradient(g_b, gram_inverse(a), s), closest, rtol=1e-7, atol=1e-9)
    # a convolution's factors, as stored: A (r, in, k, k), B (out, r, 1, 1)
    a4 = a.reshape(r, 1, 1, d)
    torch.testing.assert_close(projected_gradient(g_b.reshape(out, r, 1, 1), gram_inverse(a4), s),
                               closest.reshape(out, r, 1, 1))
    # half-precision factors: computed in float32, returned in B's dtype
    half = projected_gradient(g_b.bfloat16(), gram_inverse(a.bfloat16()), s)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), closest, rtol=0.05, atol=0.05)


def lm_step(model, ids) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2},
         alpha_pattern={"q_proj": 3.0}, modules_to_save=["lm_head"]),
])
def test_lorafa_trains_as_peft_does(monkeypatch, config):
    peft = pytest.importorskip("peft")
    lorafa = pytest.importorskip("peft.optimizers.lorafa")
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # peft's projection in bf16 otherwise
    base = tiny_transformers_model("llama")
    models = {}
    for library in (peft, minipeft):
        torch.manual_seed(3)
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**config))
        a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        optimizer = library.optimizers.create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
        for step in range(4):
            lm_step(model, input_ids(batch=2, length=8, seed=step))
            optimizer.step()
        assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if "lora_A" in n)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
        models[library.__name__] = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert models["minipeft"].keys() == models["peft"].keys()
    for name, p in models["peft"].items():
        torch.testing.assert_close(models["minipeft"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in models["minipeft"].items())  # B moved


def test_the_first_step_moves_b_against_its_projected_gradient_and_the_rest_against_theirs():
    # The first step: m = (1 - b1) g, v = (1 - b2) g^2, and the step size lr sqrt(1 - b2) / (1 - b1)
    # times m / (sqrt(v) + eps) is lr g / (|g| + eps / sqrt(1 - b2)): B along its projected
    # gradient, B's own bias (lora_bias) and the head along their plain gradients.
    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], lora_bias=True,
                                                 modules_to_save=["head"]))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_B")}
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_()  # B = 0 would give the head no gradient
    optimizer = create_lorafa_optimizer(model, r=2, lora_alpha=4, lr=1e-3)
    model(input_ids()).square().sum().backward()

    def first_step(g):
        return -1e-3 * g / (g.abs() + 1e-6 / (1 - 0.999) ** 0.5)

    expected = {n: first_step(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in layers.items():
        b = layer.lora_B["default"].weight
        expected[f"{name}.lora_B.default.weight"] = first_step(
            projected_gradient(b.grad, gram_inverse(layer.lora_A["default"].weight), layer.scaling["default"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    assert len(layers) == 2 and any("lora_B.default.bias" in n for n in expected) and any("head" in n for n in expected)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p - before[name], expected[name], rtol=1e-4, atol=1e-9, msg=name)


def test_lorafa_on_a_bfloat16_model_steps_in_bfloat16():
    torch.manual_seed(0)
    model = get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"])).to(torch.bfloat16)
    optimizer = create_lorafa_optimizer(model, r=2, lora_alpha=4, lr=1e-2)
    model(input_ids()).float().square().sum().backward()
    optimizer.step()
    b = model.base_model.model.blocks[0]["fc1"].lora_B["default"].weight
    assert b.dtype == torch.bfloat16 and b.abs().max() > 0 and torch.isfinite(b).all()


def test_a_resumed_lorafa_optimizer_continues_as_if_never_stopped():
    def run(stop_after: int | None):
        torch.manual_seed(0)
        model = get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "conv1d"],
                                                     modules_to_save=["head"]))
        optimizer = create_lorafa_optimizer(model, r=2, lora_alpha=4, lr=1e-2)
        for step in range(4):
            if step == stop_after:  # a new model and optimizer from the saved states
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
                torch.manual_seed(1)
                model = get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "conv1d"],
                                                             modules_to_save=["head"]))
                model.load_state_dict(saved[0])
                optimizer = create_lorafa_optimizer(model, r=2, lora_alpha=4, lr=1e-2)
                optimizer.load_state_dict(saved[1])
            model.zero_grad()
            model(input_ids(seed=step)).square().sum().backward()
            optimizer.step()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    whole, resumed = run(None), run(2)
    for name, p in whole.items():
        torch.testing.assert_close(resumed[name], p, rtol=0, atol=0, msg=name)


def test_lorafa_refuses_what_its_projection_does_not_describe():
    def model(**kw):
        return get_peft_model(TinyNet(), LoraConfig(r=2, lora_alpha=4, **kw))

    with pytest.raises(ValueError, match=r"embedding 'base_model.model.embed' starts its A at zero"):
        create_lorafa_optimizer(model(target_modules=["embed", "fc1"]), r=2, lora_alpha=4, lr=1e-3)
    with pytest.raises(ValueError, match="uses DoRA"):
        create_lorafa_optimizer(model(target_modules=["fc1"], use_dora=True), r=2, lora_alpha=4, lr=1e-3)
    with pytest.raises(ValueError, match=r"got r=8 \(its config: 2\)"):
        create_lorafa_optimizer(model(target_modules=["fc1"]), r=8, lora_alpha=4, lr=1e-3)
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        create_lorafa_optimizer(model(target_modules=["fc1"]), r=2, lora_alpha=4, lr=-1.0)
    with pytest.raises(ValueError, match="has no active LoRA adapter"):
        create_lorafa_optimizer(nn.Linear(2, 2), r=2, lora_alpha=4, lr=1e-3)
    # nothing is frozen by a call that fails
    failed = model(target_modules=["fc1"])
    with pytest.raises(ValueError, match="got r=8"):
        create_lorafa_optimizer(failed, r=8, lora_alpha=4, lr=1e-3)
    assert all(p.requires_grad for n, p in failed.named_parameters() if "lora_A" in n)
    # two active adapters of other ranks: the layers' own scales, nothing to check r against
    two = model(target_modules=["fc1"])
    two.add_adapter("other", LoraConfig(r=3, lora_alpha=9, target_modules=["fc2"]))
    two.base_model.set_adapter(["default", "other"])
    assert len(create_lorafa_optimizer(two, r=2, lora_alpha=4, lr=1e-3).projections) == 4
    frozen = model(target_modules=["fc1"])
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"the active LoRA adapters are frozen .*is_trainable=True"):
        create_lorafa_optimizer(frozen, r=2, lora_alpha=4, lr=1e-3)
    with frozen.disable_adapter(), pytest.raises(ValueError, match="adapters are disabled"):
        create_lorafa_optimizer(frozen, r=2, lora_alpha=4, lr=1e-3)
    layer = failed.base_model.model.blocks[0]["fc1"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with pytest.raises(ValueError, match=r"holds A fixed, but A \(2, 16\) would train"):
        LoraFAOptimizer([a, b], {b: (a, 2.0)})
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="grouped convolution"):
        create_lorafa_optimizer(get_peft_model(grouped, LoraConfig(r=2, target_modules=["0"])), r=2, lora_alpha=8,
                                lr=1e-3)


# -- inside train() -------------------------------------------------------------------------------
def lora_classifier():
    from tests.test_train import TinyClassifier

    torch.manual_seed(0)
    return get_peft_model(TinyClassifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["adapter"],
                                                       modules_to_save=["classifier"]))


def test_train_with_lorafa_takes_the_steps_of_create_lorafa_optimizer(tmp_path):
    from minipeft.train import TrainConfig, train
    from tests.test_train import loaders, trainable

    train_loader, _ = loaders(n_train=32, shuffle=False)
    ran = lora_classifier()
    train(ran, train_loader, None, TrainConfig(output_dir=str(tmp_path), epochs=1, lr=1e-2, lorafa=True,
                                               schedule="constant", max_grad_norm=None, log_every=100))
    by_hand = lora_classifier()
    optimizer = create_lorafa_optimizer(by_hand, r=2, lora_alpha=4, lr=1e-2)
    by_hand.train()
    for batch in train_loader:
        by_hand.zero_grad()
        logits = by_hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()  # (train()'s loss for it)
        optimizer.step()
    assert not any(p.requires_grad for n, p in ran.named_parameters() if "lora_A" in n)
    expected = trainable(by_hand)
    assert trainable(ran).keys() == expected.keys()
    for name, p in trainable(ran).items():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_lorafa_run_resumes_where_it_stopped(tmp_path):
    from minipeft.train import TrainConfig, train
    from tests.test_train import Crash, CrashingLoader, loaders, trainable

    train_loader, eval_loader = loaders(n_train=64)
    config = dict(epochs=2, lr=1e-2, lorafa=True, checkpoint_every=3, log_every=100)
    whole = lora_classifier()
    train(whole, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "whole"), **config))
    with pytest.raises(Crash):
        train(lora_classifier(), CrashingLoader(train_loader, after=10), eval_loader,
              TrainConfig(output_dir=str(tmp_path / "resumed"), **config))
    resumed = lora_classifier()
    train(resumed, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "resumed"), **config))
    for name, p in trainable(whole).items():
        torch.testing.assert_close(trainable(resumed)[name], p, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="LoRA\\+'s ratio of B's lr to A's means nothing there"):
        TrainConfig(output_dir=str(tmp_path), lorafa=True, loraplus_lr_ratio=16)


def test_a_resumed_lorafa_run_restores_its_frozen_a_and_a_switch_of_lorafa_is_named(tmp_path):
    from minipeft.train import TrainConfig, train
    from tests.test_train import Crash, CrashingLoader, loaders

    train_loader, eval_loader = loaders(n_train=64)
    config = dict(epochs=1, lr=1e-2, lorafa=True, checkpoint_every=3, log_every=100)
    first = lora_classifier()
    with pytest.raises(Crash):
        train(first, CrashingLoader(train_loader, after=5), eval_loader,
              TrainConfig(output_dir=str(tmp_path / "run"), **config))
    a_name = "base_model.model.adapter.lora_A.default.weight"
    a_trained_with = first.get_parameter(a_name).detach().clone()
    other = lora_classifier()
    with torch.no_grad():
        other.get_parameter(a_name).normal_()  # another draw of A (another seed, another EVA)
    train(other, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "run"), **config))
    assert torch.equal(other.get_parameter(a_name), a_trained_with)  # B was trained with that A
    # resuming with lorafa switched names the setting, and leaves A as it found it
    with pytest.raises(ValueError, match="lorafa: True -> False"):
        train(lora_classifier(), train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "run"),
                                                                        **{**config, "lorafa": False}))
    plain = {**config, "lorafa": False}
    with pytest.raises(Crash):
        train(lora_classifier(), CrashingLoader(train_loader, after=5), eval_loader,
              TrainConfig(output_dir=str(tmp_path / "plain"), **plain))
    switched = lora_classifier()
    with pytest.raises(ValueError, match="lorafa: False -> True"):
        train(switched, train_loader, eval_loader, TrainConfig(output_dir=str(tmp_path / "plain"), **config))
    assert switched.get_parameter(a_name).requires_grad

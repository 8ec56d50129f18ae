"""LoRA+ (minipeft.optimizers): its groups against peft's, by hand, and inside train().

Adam's first step moves a weight by exactly ``lr * |g| / (|g| + eps)`` (both moments start from
g, and the bias corrections cancel), so one step reads a parameter's learning rate back.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import minipeft
from minipeft import IA3Config, LoraConfig, create_loraplus_optimizer, get_peft_model, inject_adapter_in_model
from minipeft.train import TrainConfig, make_optimizer, train
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model
from tests.test_train import Crash, CrashingLoader, TinyClassifier, loaders, trainable

peft = pytest.importorskip("peft")
pytest.importorskip("peft.optimizers")  # a submodule peft does not import itself: now peft.optimizers

ARGS = dict(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)
EPS = 1e-8  # AdamW's default


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[list[str], float, float]]:
    """Each group as (parameter names in order, lr, weight_decay)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def settings(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """Each parameter's (lr, weight_decay), by name."""
    return {n: (lr, wd) for names, lr, wd in by_name(model, optimizer) for n in names}


# Each case covers a kind of member: embedding LoRA, LayerNorm copies and lora_only biases
# (BERT); DoRA magnitudes and RMSNorm gains, which decay (LLaMA); GPT-2 Conv1D with every bias.
PEFT_CASES = {
    "bert": ("bert", dict(target_modules=["query", "value", "word_embeddings"],
                          modules_to_save=["classifier", "LayerNorm"], bias="lora_only")),
    "llama_dora": ("llama", dict(target_modules="all-linear", modules_to_save=["norm"], use_dora=True)),
    "gpt2_bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
}


def peft_pair(case: str) -> tuple[nn.Module, nn.Module]:
    kind, config = PEFT_CASES[case]
    base = tiny_transformers_model(kind)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **config))
    mini_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **config))
    randomize_adapters(peft_model)  # B != 0, so A gets gradients too
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    return peft_model, mini_model


@pytest.mark.parametrize("case", PEFT_CASES)
def test_groups_are_peft_groups(case):
    peft_model, mini_model = peft_pair(case)
    expected = by_name(peft_model, peft.optimizers.create_loraplus_optimizer(peft_model, torch.optim.AdamW, **ARGS))
    assert by_name(mini_model, create_loraplus_optimizer(mini_model, torch.optim.AdamW, **ARGS)) == expected
    assert sum(len(names) for names, _, _ in expected) == sum(p.requires_grad for p in mini_model.parameters())


def test_groups_are_peft_groups_on_a_plain_module_with_injected_adapters():
    targets = ["embed", "conv1d", "conv2d", "fc1", "fc2"]
    nets = {"peft": TinyNet(), "mini": TinyNet()}
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=targets), nets["peft"])
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), nets["mini"])
    for net in nets.values():  # a LayerNorm, a head with its bias, and a vector that is neither
        net.blocks[0]["norm"].requires_grad_(True)
        net.head.requires_grad_(True)
        net.gate = nn.Parameter(torch.ones(16))
    expected = by_name(nets["peft"], peft.optimizers.create_loraplus_optimizer(nets["peft"], torch.optim.AdamW, **ARGS))
    assert by_name(nets["mini"], create_loraplus_optimizer(nets["mini"], torch.optim.AdamW, **ARGS)) == expected


def test_adamw_steps_match_peft_and_the_optimizer_states_load_into_each_other():
    peft_model, mini_model = peft_pair("bert")
    optimizers = [peft.optimizers.create_loraplus_optimizer(peft_model, torch.optim.AdamW, **ARGS),
                  create_loraplus_optimizer(mini_model, torch.optim.AdamW, **ARGS)]
    ids, labels = input_ids(4, 7), torch.tensor([0, 1, 1, 0])
    for _ in range(3):  # the two forwards agree to the bit, so the steps must too
        for model, optimizer in zip((peft_model, mini_model), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(input_ids=ids).logits, labels).backward()
            optimizer.step()
    for name, value in trainable(peft_model).items():
        torch.testing.assert_close(trainable(mini_model)[name], value, rtol=0, atol=0, msg=name)
    # the same groups in the same order: a peft run's optimizer state carries over to minipeft
    fresh = create_loraplus_optimizer(mini_model, torch.optim.AdamW, **ARGS)
    fresh.load_state_dict(optimizers[0].state_dict())
    assert len(fresh.state) == len(optimizers[1].state) == sum(p.requires_grad for p in mini_model.parameters())


def test_each_kind_of_parameter_by_hand():
    net = TinyNet()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["embed", "conv2d", "fc1"], modules_to_save=["head"]), net)
    net.blocks[1]["norm"].requires_grad_(True)
    net.gate = nn.Parameter(torch.ones(16))  # a trainable vector that is neither a bias nor a norm's
    lr, ratio = 1e-3, 4
    got = settings(net, create_loraplus_optimizer(net, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                                  loraplus_weight_decay=0.1))
    wd, emb = 0.1, minipeft.optimizers.LORAPLUS_LR_EMBEDDING  # 1e-6 when not given, as in peft
    assert got == {
        "embed.lora_embedding_A.default": (emb, wd),  # an embedding's A and B: the embedding lr
        "embed.lora_embedding_B.default": (emb, wd),
        "conv2d.lora_A.default.weight": (lr, wd),
        "conv2d.lora_B.default.weight": (lr * ratio, wd),
        "blocks.0.fc1.lora_A.default.weight": (lr, wd),
        "blocks.0.fc1.lora_B.default.weight": (lr * ratio, wd),
        "blocks.1.fc1.lora_A.default.weight": (lr, wd),
        "blocks.1.fc1.lora_B.default.weight": (lr * ratio, wd),
        "blocks.1.norm.weight": (lr * ratio, 0.0),  # vectors take B's step; a LayerNorm's never decay
        "blocks.1.norm.bias": (lr * ratio, 0.0),
        "head.modules_to_save.default.weight": (lr, wd),  # any other matrix: A's
        "head.modules_to_save.default.bias": (lr * ratio, 0.0),  # nor do biases
        "gate": (lr * ratio, wd),
    }


def test_the_learning_rates_are_what_adam_steps_by():
    net = TinyNet()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["embed", "fc1"], init_lora_weights=False), net)
    optimizer = create_loraplus_optimizer(net, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=8,
                                          loraplus_lr_embedding=1e-2)
    before = trainable(net)
    net(input_ids()).pow(2).mean().backward()
    optimizer.step()
    for name, p in net.named_parameters():
        if p.requires_grad:
            lr = 1e-2 if "embedding" in name else 8e-3 if "lora_B" in name else 1e-3
            step = lr * p.grad.abs() / (p.grad.abs() + EPS)
            torch.testing.assert_close((before[name] - p).abs(), step, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------
# Bad input


def lora_net():
    return inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"]), TinyNet())


@pytest.mark.parametrize("ratio", [0, -2.0, float("nan"), float("inf"), True, "16", None])
def test_ratio_must_be_a_positive_number(ratio):
    with pytest.raises(ValueError, match=rf"loraplus_lr_ratio must be a number > 0 \(LoRA\+ means > 1, e\.g\. 16\), "
                                         rf"not {ratio!r}"):
        create_loraplus_optimizer(lora_net(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)


def test_other_bad_arguments_say_what_would_be_right():
    net = lora_net()
    with pytest.raises(ValueError, match="lr must be a number >= 0, not -0.001"):
        create_loraplus_optimizer(net, torch.optim.AdamW, lr=-1e-3, loraplus_lr_ratio=16)
    with pytest.raises(ValueError, match="loraplus_lr_embedding must be a number >= 0, not -1"):
        create_loraplus_optimizer(net, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=-1)
    # peft passes weight_decay to the optimizer, where every group's own value overrides it
    with pytest.raises(TypeError, match="weight_decay=0.1 would be ignored.*Pass loraplus_weight_decay instead"):
        create_loraplus_optimizer(net, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    instance = torch.optim.AdamW(net.parameters())
    with pytest.raises(TypeError, match="optimizer_cls must be an optimizer class such as torch.optim.AdamW"):
        create_loraplus_optimizer(net, instance, lr=1e-3, loraplus_lr_ratio=16)
    # other keywords reach the optimizer
    optimizer = create_loraplus_optimizer(net, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, betas=(0.8, 0.9))
    assert {g["betas"] for g in optimizer.param_groups} == {(0.8, 0.9)}


def test_a_model_without_trainable_lora_b_is_refused_naming_what_it_has():
    def make(net):
        return lambda: create_loraplus_optimizer(net, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)

    ia3 = get_peft_model(TinyNet(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    with pytest.raises(ValueError, match=r"trains none: it has no LoRA layer, and what trains is "
                                         r"base_model\.model\.blocks\.0\.fc1\.ia3_l\.default.*get_peft_model or "
                                         r"inject_adapter_in_model with a LoraConfig.*loraplus_lr_ratio=None"):
        make(ia3)()
    frozen = lora_net()  # the LoRA adapter frozen, only the head training
    frozen.requires_grad_(False)
    frozen.head.requires_grad_(True)
    with pytest.raises(ValueError, match=r"its LoRA layers \(blocks\.0\.fc1, blocks\.1\.fc1\) are frozen, and what "
                                         r"trains is head\.weight, head\.bias\. Make the adapter trainable"):
        make(frozen)()
    frozen.head.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters \(requires_grad=True\); nothing to optimize"):
        make(frozen)()
    by_peft = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1"]), TinyNet())
    with pytest.raises(ValueError, match=r"named like LoRA's \(blocks\.0\.fc1\.lora_A\.default\.weight.*no minipeft "
                                         r"LoRA layer; a model adapted by peft takes "
                                         r"peft\.optimizers\.create_loraplus_optimizer"):
        make(by_peft)()


# ---------------------------------------------------------------------------------------
# In train()


def lora_classifier():
    """TinyClassifier with LoRA on its adapter layer (A and B random) and its head trained whole."""
    torch.manual_seed(0)
    return get_peft_model(TinyClassifier(), LoraConfig(r=4, target_modules=["adapter"], modules_to_save=["classifier"],
                                                       init_lora_weights=False))


def test_make_optimizer_combines_lora_plus_with_lr_by_prefix_and_keeps_its_decay_rule():
    model = lora_classifier()
    head = "base_model.model.classifier.modules_to_save.default."
    config = TrainConfig(output_dir="unused", lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1,
                         lr_by_prefix={head: 0.05})
    got = settings(model, make_optimizer(model, config))
    assert got == {
        "base_model.model.adapter.lora_A.default.weight": (1e-3, 0.1),
        "base_model.model.adapter.lora_B.default.weight": (16e-3, 0.1),
        head + "weight": (0.05, 0.1),  # the prefix's lr stands in for lr ...
        head + "bias": (0.05 * 16, 0.0),  # ... and a vector's is scaled like B's; vectors never decay
    }

    net = TinyNet()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["embed", "fc1"]), net)
    net.gate = nn.Parameter(torch.ones(16))  # peft's LoRA+ would decay it; train()'s rule does not
    config = TrainConfig(output_dir="unused", lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    got = settings(net, make_optimizer(net, config))
    assert got["embed.lora_embedding_A.default"] == (1e-6, 0.1) and got["gate"] == (4e-3, 0.0)
    config = TrainConfig(output_dir="unused", lr=1e-3, loraplus_lr_ratio=4, loraplus_lr_embedding=1e-4)
    assert settings(net, make_optimizer(net, config))["embed.lora_embedding_B.default"] == (1e-4, 0.0)
    config = TrainConfig(output_dir="unused", lr=1e-3, loraplus_lr_ratio=4, lr_by_prefix={"embed.": 0.3})
    assert settings(net, make_optimizer(net, config))["embed.lora_embedding_B.default"] == (0.3, 0.0)


def test_train_steps_b_at_ratio_times_the_lr_and_logs_the_base_lr(tmp_path):
    model = lora_classifier()
    before = trainable(model)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, lr=1e-3, loraplus_lr_ratio=16, schedule="constant",
                         max_grad_norm=None, log_every=1)
    train(model, loaders(n_train=16)[0], None, config)
    for name, p in model.named_parameters():
        if p.requires_grad:  # most gradients dwarf eps: the typical step is the lr itself
            lr = 16e-3 if "lora_B" in name or p.dim() == 1 else 1e-3
            assert (p.detach() - before[name]).abs().median().item() == pytest.approx(lr, rel=1e-3), name
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["lr"] == 1e-3  # config.lr, not whichever group happens to come first


def test_resume_with_lora_plus_reproduces_the_uninterrupted_run(tmp_path):
    train_loader, eval_loader = loaders(n_train=48)  # 6 batches an epoch

    def config(out, **changes):
        return TrainConfig(**{**dict(output_dir=str(out), epochs=2, lr=1e-2, loraplus_lr_ratio=8, checkpoint_every=2,
                                     eval_every=100, log_every=100, schedule="cosine", warmup_steps=1), **changes})

    reference = lora_classifier()
    train(reference, train_loader, eval_loader, config(tmp_path / "a"))
    model = lora_classifier()
    with pytest.raises(Crash):  # dies in epoch 2, after the checkpoint at step 8
        train(model, CrashingLoader(train_loader, after=6 + 3), eval_loader, config(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"cannot resume.*loraplus_lr_ratio: 8 -> 4"):
        train(lora_classifier(), train_loader, eval_loader, config(tmp_path / "b", loraplus_lr_ratio=4))
    resumed = lora_classifier()
    result = train(resumed, train_loader, eval_loader, config(tmp_path / "b"))
    assert result.step == 12
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)


def test_resume_reads_a_field_a_checkpoint_predates_as_its_default(tmp_path):
    train_loader = loaders(n_train=16)[0]
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, log_every=100)
    train(lora_classifier(), train_loader, None, config)
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["loraplus_lr_ratio"], ckpt["config"]["loraplus_lr_embedding"]  # written before LoRA+
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"cannot resume.*loraplus_lr_ratio: None -> 16"):
        train(lora_classifier(), train_loader, None, TrainConfig(**{**vars(config), "loraplus_lr_ratio": 16}))
    assert train(lora_classifier(), train_loader, None, config).step == 1  # LoRA+ off then and now: resumes


@pytest.mark.parametrize("changes, message", [
    (dict(loraplus_lr_ratio=0), r"loraplus_lr_ratio must be a number > 0 \(LoRA\+ means > 1, e\.g\. 16\), or None "
                                r"for plain AdamW, not 0"),
    (dict(loraplus_lr_ratio=math.nan), "loraplus_lr_ratio must be a number > 0"),
    (dict(loraplus_lr_ratio=16, loraplus_lr_embedding=-1.0), "loraplus_lr_embedding must be a number >= 0, not -1.0"),
    (dict(loraplus_lr_embedding=1e-4), r"loraplus_lr_embedding=0\.0001 is a LoRA\+ setting and LoRA\+ is off; set "
                                       r"loraplus_lr_ratio too"),
])
def test_config_refuses_bad_lora_plus_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output_dir="unused", **changes)

"""Mixed batches: ``model(..., adapter_names=[...])``, each row with its own adapter.

References: the single-adapter path (row i of a mixed batch equals row i of the whole batch run
with adapter ``adapter_names[i]`` active, or with adapters disabled for ``"__base__"``), for every
method that takes part; and peft itself, for LoRA's logits and ``generate()`` with beams on a
decoder-only and an encoder-decoder model, and for a ``modules_to_save`` head.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import minipeft
from minipeft import (
    AdaLoraConfig,
    BOFTConfig,
    BottleneckConfig,
    C3AConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    PromptTuningConfig,
    RoadConfig,
    TrainableTokensConfig,
    VeraConfig,
    get_peft_model,
)
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

NAMES = ["b", "__base__", "default", "b", "default"]  # one per row of a batch of 5


@contextlib.contextmanager
def only(model, name):
    """Adapter ``name`` alone active inside the block; for "__base__", adapters disabled."""
    if name == "__base__":
        with model.disable_adapter():
            yield
        return
    active = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(active)


def per_row_reference(model, names, run):
    """Row i of ``run()`` run with adapter ``names[i]`` alone."""
    rows = []
    for i, name in enumerate(names):
        with only(model, name):
            rows.append(run()[i])
    return torch.stack(rows)


def two_adapters(base, first, second, randomized=("lora_", "modules_to_save")):
    model = get_peft_model(copy.deepcopy(base), first)
    model.add_adapter("b", second)
    randomize_adapters(model, names=randomized, std=0.3)
    return model.eval()


LORA_EVERYWHERE = dict(r=4, lora_alpha=8, init_lora_weights=False,
                       target_modules=["embed", "conv1d", "conv2d", "fc1", "fc2", "head"])

# (first adapter, second adapter, the tensors to randomise) on TinyNet: every layer type of every
# method that takes part, and two methods stacked on one module.
TINYNET_CASES = {
    "lora on linear, embedding, conv1d, conv2d; dora": (
        LoraConfig(**LORA_EVERYWHERE),
        LoraConfig(r=2, target_modules=["fc1", "head"], use_dora=True, init_lora_weights=False),
        ("lora_",),
    ),
    "lora with lora_bias, and modules_to_save": (
        LoraConfig(r=4, target_modules=["fc2"], lora_bias=True, modules_to_save=["head"], init_lora_weights=False),
        LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], init_lora_weights=False),
        ("lora_", "modules_to_save"),
    ),
    "ia3 on input and output sides, linear and conv": (
        IA3Config(target_modules=["fc1", "fc2", "conv2d"], feedforward_modules=["fc2"]),
        IA3Config(target_modules=["fc1", "conv2d"], feedforward_modules=["fc1", "conv2d"]),
        ("ia3_l",),
    ),
    "loha and lokr": (
        LoHaConfig(r=2, target_modules=["fc1", "conv2d"], init_weights=False),
        LoKrConfig(r=2, target_modules=["fc1", "conv1d"], init_weights=False),
        (),
    ),
    "oft on linear, embedding, conv1d, conv2d; and block_share": (
        OFTConfig(oft_block_size=4, target_modules=["embed", "conv1d", "fc1"], init_weights=False),
        OFTConfig(oft_block_size=3, target_modules=["conv2d", "fc1"], block_share=True, init_weights=False),
        (),
    ),
    "hra on linear and conv, and with gram-schmidt": (
        HRAConfig(r=4, target_modules=["conv1d", "conv2d", "fc1"], init_weights=False),
        HRAConfig(r=2, target_modules=["fc1", "fc2"], apply_GS=True, init_weights=False),
        (),
    ),
    "boft with two butterfly factors on linear and conv1d, one dense block on conv2d": (
        BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv1d", "fc1", "fc2"],
                   init_weights=False),
        BOFTConfig(boft_block_size=0, boft_block_num=1, target_modules=["conv2d", "fc1"], init_weights=False),
        (),
    ),
    "miss balance (padded shards) and mini": (
        MissConfig(r=5, init_weights=False, target_modules=["fc1", "fc2", "head"]),
        MissConfig(r=4, init_weights="mini", mini_r=4, target_modules=["fc1"]),
        ("miss_block",),
    ),
    "miss bat, two tile sizes": (
        MissConfig(r=4, init_weights="bat", target_modules=["fc1", "fc2"]),
        MissConfig(r=8, init_weights="bat", target_modules=["fc1"]),
        ("miss_block",),
    ),
    "road, two variants and group sizes": (
        RoadConfig(variant="road_4", group_size=8, target_modules=["fc1", "fc2"], init_weights=False),
        RoadConfig(variant="road_1", group_size=16, target_modules=["fc1"], init_weights=False),
        (),
    ),
    "c3a, two block sizes": (
        C3AConfig(block_size=8, init_weights="gaussian", target_modules=["fc1", "fc2"]),
        C3AConfig(block_size=4, init_weights="gaussian", target_modules=["fc1"]),
        (),
    ),
    "fourierft on linear layers, two sizes": (
        FourierFTConfig(n_frequency=40, scaling=30.0, target_modules=["fc1", "fc2", "head"]),
        FourierFTConfig(n_frequency=10, scaling=30.0, random_loc_seed=3, target_modules=["fc1"]),
        (),
    ),
    "adalora and lora stacked on one layer": (
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["fc1", "fc2"]),
        LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False),
        ("lora_",),
    ),
    "vera and ia3 stacked on one layer": (
        VeraConfig(r=4, target_modules=["fc1"], init_weights=False),
        IA3Config(target_modules=["fc1"], feedforward_modules=[]),
        ("vera_lambda", "ia3_l"),
    ),
}


@pytest.mark.parametrize("case", list(TINYNET_CASES))
def test_each_row_computes_what_its_adapter_alone_computes(case):
    first, second, randomized = TINYNET_CASES[case]
    model = two_adapters(TinyNet(), first, second, randomized)
    x = input_ids(batch=len(NAMES))
    with torch.no_grad():
        mixed = model(x, adapter_names=NAMES)
        expected = per_row_reference(model, NAMES, lambda: model(x))
        # Each adapter does change its rows: the check above could not pass by ignoring them.
        with model.disable_adapter():
            base = model(x)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[0], base[0]) and not torch.allclose(mixed[2], base[2])
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-6)


def test_trainable_tokens_on_a_tied_head_each_row_its_own_rows():
    base = tiny_transformers_model("gpt2")
    model = two_adapters(base, TrainableTokensConfig(token_indices=[3, 5]), TrainableTokensConfig(token_indices=[5, 7]),
                         ("trainable_tokens_delta",))
    ids = input_ids(batch=len(NAMES))
    ids[:, :3] = torch.tensor([3, 5, 7])  # every row holds every trained token
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        expected = per_row_reference(model, NAMES, lambda: model(input_ids=ids).logits)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_a_plain_model_takes_the_context_manager():
    model = minipeft.inject_adapter_in_model(LoraConfig(**LORA_EVERYWHERE), TinyNet())
    minipeft.inject_adapter_in_model(LoraConfig(**{**LORA_EVERYWHERE, "r": 2}), model, adapter_name="b")
    randomize_adapters(model, std=0.3)
    model.eval()
    x = input_ids(batch=2)
    with torch.no_grad(), minipeft.mixed_batch(model, ["b", "__base__"]):
        mixed = model(x)
    reference = get_peft_model(TinyNet(), LoraConfig(**LORA_EVERYWHERE)).eval()  # same base (seeded), "default"
    reference.add_adapter("b", LoraConfig(**{**LORA_EVERYWHERE, "r": 2}))
    reference.base_model.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = per_row_reference(reference, ["b", "__base__"], lambda: reference(x))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


# -- against peft -----------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def peft_and_minipeft(base, first: dict, second: dict):
    """The same two LoRA adapters ("default", "b") in peft and in minipeft, peft's random weights in both."""
    models = []
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**first))
        model.add_adapter("b", library.LoraConfig(**second))
        models.append(model.eval())
    randomize_adapters(models[0], std=0.3)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models


LLAMA_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  init_lora_weights=False)


def test_llama_logits_match_peft():
    theirs, ours = peft_and_minipeft(tiny_transformers_model("llama"), LLAMA_LORA, {**LLAMA_LORA, "r": 2})
    ids = input_ids(batch=len(NAMES))
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=NAMES).logits
        mixed = ours(input_ids=ids, adapter_names=NAMES).logits
        single = per_row_reference(ours, NAMES, lambda: ours(input_ids=ids).logits)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_with_beams_matches_peft_and_one_adapter_at_a_time(kind):
    """generate() repeats each prompt once per beam before decoding (and T5's encoder still sees
    each prompt once): each beam keeps its prompt's adapter."""
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["q", "v", "wo"]
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    theirs, ours = peft_and_minipeft(tiny_transformers_model(kind), config, {**config, "r": 2})
    ids = input_ids(batch=3, length=5)
    names = ["b", "default", "__base__"]
    options = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
                   attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, adapter_names=names, **options)
        mixed = ours.generate(input_ids=ids, adapter_names=names, **options)
        alone = []
        for i, name in enumerate(names):
            with only(ours, name):
                one = dict(options, attention_mask=options["attention_mask"][i:i + 1])
                alone.append(ours.generate(input_ids=ids[i:i + 1], **one))
    assert torch.equal(mixed, expected)
    assert torch.equal(mixed, torch.cat(alone))


def test_a_modules_to_save_head_matches_peft():
    config = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    theirs, ours = peft_and_minipeft(tiny_transformers_model("bert"), config, {**config, "r": 2})
    ids = input_ids(batch=len(NAMES))
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=NAMES).logits
        mixed = ours(input_ids=ids, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


# -- errors -----------------------------------------------------------------------------------
@pytest.fixture
def lora_model():
    return two_adapters(TinyNet(), LoraConfig(**LORA_EVERYWHERE), LoraConfig(**{**LORA_EVERYWHERE, "r": 2}))


def test_bad_adapter_names_are_refused_before_anything_runs(lora_model):
    x = input_ids(batch=2)
    with pytest.raises(ValueError, match=r"does not have: \['typo'\]; it has \['default', 'b'\]"):
        lora_model(x, adapter_names=["typo", "b"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        lora_model(x, adapter_names="b")
    with pytest.raises(ValueError, match="empty"):
        lora_model(x, adapter_names=[])
    with pytest.raises(ValueError, match=r"adapter_names has 3 names for a batch of 2 samples: give one per sample"):
        lora_model(x, adapter_names=["b", "b", "default"])
    with pytest.raises(ValueError, match="adapter_names has 2 names for a batch of 4 samples"):
        lora_model(input_ids(batch=4), adapter_names=["b", "default"])  # repeats are generate()'s alone
    # a model adapted in place has no batch to look at: its layers check the rows they get
    with pytest.raises(ValueError, match="input of 2 rows in a mixed batch of 3 samples"):
        with minipeft.mixed_batch(lora_model.get_base_model(), ["b", "b", "default"]):
            lora_model.get_base_model()(x)


def test_training_mode_and_merged_adapters_are_refused(lora_model):
    x = input_ids(batch=2)
    lora_model.train()
    with pytest.raises(ValueError, match=r"for inference.*model.eval\(\)"):
        lora_model(x, adapter_names=["b", "default"])
    lora_model.eval()
    lora_model.merge_adapter(["default"])
    with pytest.raises(ValueError, match=r"\['default'\] are merged.*unmerge_adapter"):
        lora_model(x, adapter_names=["b", "default"])


def test_layers_that_cannot_split_rows_are_named():
    model = two_adapters(TinyNet(), LoraConfig(**LORA_EVERYWHERE),
                         BottleneckConfig(target_modules=["blocks.0.fc2"], bottleneck_size=4))
    with pytest.raises(ValueError, match=r"'blocks.0.fc2' \(BottleneckLayer\).*batch of their own"):
        model(input_ids(batch=2), adapter_names=["b", "default"])
    # A layer that holds none of the named adapters takes part by running no adapter.
    with torch.no_grad():
        mixed = model(input_ids(batch=2), adapter_names=["default", "__base__"])
        expected = per_row_reference(model, ["default", "__base__"], lambda: model(input_ids(batch=2)))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)


def test_prompt_tuning_is_refused_named_or_active_through_the_peft_model_or_its_base_model():
    model = get_peft_model(tiny_transformers_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    model.eval()
    refused = r"\['default'\] put virtual tokens into every row"
    with pytest.raises(ValueError, match=refused):
        model(input_ids=input_ids(batch=1), adapter_names=["lora"])  # "default", prompt tuning, is active
    with pytest.raises(ValueError, match=refused), minipeft.mixed_batch(model.get_base_model(), ["lora"]):
        pass
    model.set_adapter("lora")
    with pytest.raises(ValueError, match=refused):
        model(input_ids=input_ids(batch=2), adapter_names=["lora", "default"])  # named


def test_an_adapter_cannot_be_named_like_the_base_model(lora_model):
    with pytest.raises(ValueError, match="'__base__'.*stands for the base model alone"):
        lora_model.add_adapter("__base__", LoraConfig(**LORA_EVERYWHERE))


def test_under_autocast_dora_returns_the_base_output_s_dtype_alone_and_mixed():
    """Under bf16 autocast DoRA's terms are fp32; its layer returns the base output's bf16, as
    peft's does, so a mixed batch computes each row exactly as that row's adapter alone."""
    model = two_adapters(TinyNet(), LoraConfig(**LORA_EVERYWHERE),
                         LoraConfig(r=2, target_modules=["fc1"], use_dora=True, init_lora_weights=False))
    seen = []

    def record_dtype(module, args, out):
        seen.append(out.dtype)

    model.base_model.model.blocks[0]["fc1"].register_forward_hook(record_dtype)
    x = input_ids(batch=len(NAMES))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x, adapter_names=NAMES)
        expected = per_row_reference(model, NAMES, lambda: model(x))
    assert set(seen) == {torch.bfloat16}
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)


def test_the_routing_ends_with_the_call_even_when_it_fails(lora_model):
    x = input_ids(batch=2)
    with pytest.raises(ValueError):
        lora_model(x, adapter_names=["b", "b", "b"])
    with torch.no_grad():
        assert torch.equal(lora_model(x), per_row_reference(lora_model, ["default"] * 2, lambda: lora_model(x)))
    layers = [m for m in lora_model.modules() if isinstance(m, minipeft.tuners.AdapterLayer)]
    assert layers and all(layer.row_routing is None for layer in layers)


def test_with_autograd_on_each_adapter_learns_from_its_own_rows_only(lora_model):
    """Eval mode with gradients on (attribution, say): the rows are put together out of place, the
    output is the same, and a row's gradient reaches its adapter and no other."""
    x = input_ids(batch=2)
    for name, p in lora_model.named_parameters():
        p.requires_grad_(".lora_" in name)  # both adapters, not only the active one
    out = lora_model(x, adapter_names=["b", "__base__"])
    with torch.no_grad():
        torch.testing.assert_close(out, lora_model(x, adapter_names=["b", "__base__"]), rtol=0, atol=0)
    out[0].sum().backward()
    grads = {n: p.grad for n, p in lora_model.named_parameters() if ".lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".b." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".default." in n)

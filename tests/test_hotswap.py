"""hotswap_adapter: a saved LoRA adapter's weights copied into one loaded under the same name. The
reference is peft's own hotswap_adapter on the same files; a compiled model must then run the new
adapter without compiling again (when lora_alpha is the same)."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from tests.models import TinyNet, input_ids, randomize_adapters

peft = pytest.importorskip("peft")
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter  # noqa: E402

LORA = dict(r=4, target_modules=["fc1", "fc2"])


def saved_adapter(folder, seed, **options):
    """A LoRA adapter with random factors, saved by peft; returns its folder."""
    torch.manual_seed(0)
    model = peft.get_peft_model(TinyNet(), peft.LoraConfig(**{**LORA, **options}))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(folder)
    return folder


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("alpha", [8, 20])  # the same lora_alpha, and another
def test_hotswap_gives_peft_outputs_and_keeps_the_compiled_graph(tmp_path, alpha):
    first = saved_adapter(tmp_path / "first", seed=1, lora_alpha=8)
    second = saved_adapter(tmp_path / "second", seed=2, lora_alpha=alpha)
    torch.manual_seed(0)
    base = TinyNet().eval()
    ids = input_ids()

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), first)
    peft_hotswap_adapter(theirs, str(second), adapter_name="default", torch_device="cpu")
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), first)
    direct = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), second)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    before = compiled(ids)
    parameters = {name: p for name, p in ours.named_parameters()}
    minipeft.hotswap_adapter(compiled, second, adapter_name="default")
    after = compiled(ids)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, theirs(ids))
    torch.testing.assert_close(after, direct(ids))
    assert all(p is parameters[name] for name, p in ours.named_parameters())  # the same tensors, new values
    assert compiled_graphs() == (1 if alpha == 8 else 2)  # a new alpha is a new constant: one recompile
    assert ours.peft_config["default"].lora_alpha == alpha
    assert ours.peft_config["default"].inference_mode  # (as loaded)


def test_hotswap_swaps_every_kind_of_lora_tensor(tmp_path):
    # An embedding's tables and the convolutions': all of them swapped, as loading the
    # saved adapter directly gives. (peft 0.21's hotswap handles Linear and Conv2d layers alone.)
    options = dict(target_modules=["fc1", "embed", "conv1d", "conv2d"], lora_alpha=6)
    first = saved_adapter(tmp_path / "first", seed=1, **options)
    second = saved_adapter(tmp_path / "second", seed=2, **{**options, "lora_alpha": 12})
    torch.manual_seed(0)
    base = TinyNet().eval()
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), first)
    minipeft.hotswap_adapter(ours, second, adapter_name="default")
    direct = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), second)
    torch.testing.assert_close(ours(input_ids()), direct(input_ids()))


@pytest.mark.parametrize("loaded, saved, message", [
    ({}, dict(use_dora=True), "differs from the adapter's in use_dora"),
    ({}, dict(use_rslora=True), "in use_rslora"),
    ({}, dict(lora_dropout=0.1), "in lora_dropout"),
    # the same number of tokens, other tokens: same shapes, so only the config can tell
    (dict(trainable_token_indices={"embed": [1, 2, 3]}), dict(trainable_token_indices={"embed": [10, 20, 30]}),
     "in trainable_token_indices"),
    # a larger rank does not fit the tensors
    ({}, dict(r=8), r"its rank is above the model's at 'blocks.0.fc1' \(r=8, the model's 4\).*target_rank="),
    # a layer the loaded adapter does not have
    (dict(target_modules=["fc1"]), dict(target_modules=["fc1", "fc2"]), "unexpected"),
])
def test_a_saved_adapter_that_does_not_fit_is_refused_and_nothing_changes(tmp_path, loaded, saved, message):
    first = saved_adapter(tmp_path / "first", seed=1, **loaded)
    other = saved_adapter(tmp_path / "other", seed=2, **{**loaded, **saved})
    torch.manual_seed(0)
    ours = minipeft.PeftModel.from_pretrained(TinyNet().eval(), first)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=message):
        minipeft.hotswap_adapter(ours, other, adapter_name="default")
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert ours.peft_config["default"].use_dora is False


def test_a_merged_adapter_or_an_unknown_name_is_refused(tmp_path):
    first = saved_adapter(tmp_path / "first", seed=1)
    torch.manual_seed(0)
    ours = minipeft.PeftModel.from_pretrained(TinyNet().eval(), first)
    with pytest.raises(ValueError, match=r"no adapter 'other' to swap; the model holds \['default'\]"):
        minipeft.hotswap_adapter(ours, first, adapter_name="other")
    ours.merge_adapter()
    with pytest.raises(ValueError, match=r"it is merged into .* unmerge_adapter\(\) first"):
        minipeft.hotswap_adapter(ours, first, adapter_name="default")


# -- other ranks, other layers, and prepare_model_for_compiled_hotswap -------------------------

def loaded_pair(first):
    """(ours, peft's) PeftModels loaded from ``first`` on the same base model."""
    torch.manual_seed(0)
    base = TinyNet().eval()
    return minipeft.PeftModel.from_pretrained(copy.deepcopy(base), first), \
        peft.PeftModel.from_pretrained(copy.deepcopy(base), first)


def loaded_directly(folder):
    torch.manual_seed(0)
    return minipeft.PeftModel.from_pretrained(TinyNet().eval(), folder)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_prepared_compiled_model_swaps_other_ranks_and_alphas_without_compiling_again(tmp_path, use_rslora):
    first = saved_adapter(tmp_path / "first", seed=1, r=4, lora_alpha=8, use_rslora=use_rslora)
    others = [saved_adapter(tmp_path / "second", seed=2, r=2, lora_alpha=3, use_rslora=use_rslora),
              saved_adapter(tmp_path / "third", seed=3, r=8, lora_alpha=16, use_rslora=use_rslora)]
    ours, theirs = loaded_pair(first)
    ids = input_ids()
    before = ours(ids)
    minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=8)
    peft.utils.hotswap.prepare_model_for_compiled_hotswap(theirs, target_rank=8)
    layer = ours.base_model.model.blocks[0]["fc1"]
    assert layer.lora_A["default"].weight.shape == (8, 16) and layer.r["default"] == 8
    torch.testing.assert_close(ours(ids), before)  # padded with zero terms: the same function

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), before)
    for folder in others:
        minipeft.hotswap_adapter(compiled, folder, adapter_name="default")
        peft_hotswap_adapter(theirs, str(folder), adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(compiled(ids), loaded_directly(folder)(ids))
        torch.testing.assert_close(compiled(ids), theirs(ids))
    assert compiled_graphs() == 1  # the scalings were kept, the new ones folded into B


def test_a_padded_or_swapped_adapter_saves_as_what_it_computes(tmp_path):
    # The config describes the adapter as the model holds it (rank 8, each layer's alpha), so
    # the checkpoint loads, here and in peft, to the same function.
    first = saved_adapter(tmp_path / "first", seed=1, r=4, lora_alpha=8, alpha_pattern={"blocks.0.fc1": 2})
    second = saved_adapter(tmp_path / "second", seed=2, r=2, lora_alpha=3, target_modules=["fc1"])
    ours, _ = loaded_pair(first)
    ids = input_ids()
    minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=8)
    for step, folder in enumerate([None, second]):
        if folder is not None:
            minipeft.hotswap_adapter(ours, folder, adapter_name="default")
        ours.save_pretrained(tmp_path / f"saved{step}")
        config = ours.peft_config["default"]
        assert (config.r, config.rank_pattern, sorted(config.target_modules)) == (8, {}, ["fc1", "fc2"])
        torch.manual_seed(0)
        theirs = peft.PeftModel.from_pretrained(TinyNet().eval(), tmp_path / f"saved{step}")
        torch.testing.assert_close(loaded_directly(tmp_path / f"saved{step}")(ids), ours(ids))
        torch.testing.assert_close(theirs(ids), ours(ids))
    torch.testing.assert_close(ours(ids), loaded_directly(second)(ids))


@pytest.mark.parametrize("options, second_targets", [
    (dict(target_modules=["fc1", "fc2", "embed", "conv1d"]), ["fc1", "embed"]),
    (dict(target_modules=["fc1", "fc2"], use_dora=True), ["fc1"]),
    (dict(target_modules=["fc1", "fc2"], lora_bias=True), ["fc1"]),
], ids=["layer kinds", "dora", "lora_bias"])
@pytest.mark.filterwarnings("ignore:.*invalid shape")  # (peft warns of lora_B's bias, 1-D, as if it were sharded)
def test_a_smaller_rank_and_fewer_layers_swap_in_unprepared(tmp_path, options, second_targets):
    # Without preparation the scalings follow the new adapter; its rank-2 factors are padded
    # into the rank-4 tensors, and the layers it leaves out add nothing (under DoRA: m = ||W||).
    first = saved_adapter(tmp_path / "first", seed=1, lora_alpha=8, **options)
    second = saved_adapter(tmp_path / "second", seed=2, **{**options, "r": 2, "lora_alpha": 5,
                                                           "target_modules": second_targets})
    ours, theirs = loaded_pair(first)
    minipeft.hotswap_adapter(ours, second, adapter_name="default")
    ids = input_ids()
    torch.testing.assert_close(ours(ids), loaded_directly(second)(ids))
    if options.get("lora_bias"):
        # peft 0.21's swap takes Linear and Conv2d layers alone (it finds no module for an
        # embedding's keys), and zeroes a left-out layer's DoRA magnitude, which zeroes its output.
        peft_hotswap_adapter(theirs, str(second), adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(ours(ids), theirs(ids))
    ours.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(loaded_directly(tmp_path / "saved")(ids), ours(ids))


def test_experts_and_grouped_convolutions_pad_as_their_layouts_need(tmp_path):
    from tests.test_lora_grouped_conv import ConvNet
    from tests.test_lora_target_parameters import IN, NET_TARGETS, Net

    # (the depthwise convolution has 8 groups: its ranks are multiples of 8)
    for base, config, ranks, x in [
        (ConvNet(), dict(target_modules=["depthwise", "grouped"]), (16, 8), torch.randn(2, 8, 5, 5)),
        (Net(transposed=False), dict(target_parameters=NET_TARGETS, target_modules=[]), (3, 2), torch.randn(3, IN)),
        (Net(transposed=True), dict(target_parameters=NET_TARGETS, target_modules=[]), (3, 2), torch.randn(3, IN)),
    ]:
        folders = []
        for seed, r in enumerate(ranks, start=1):
            torch.manual_seed(0)
            model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=r, lora_alpha=2 * r + seed, **config))
            randomize_adapters(model, seed=seed)
            model.save_pretrained(folders.append(tmp_path / f"{type(base).__name__}{seed}") or folders[-1])
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), folders[1])
        before = ours(x)
        minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=4 * ranks[0])
        torch.testing.assert_close(ours(x), before)
        for folder in folders:
            minipeft.hotswap_adapter(ours, folder, adapter_name="default")
            direct = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
            torch.testing.assert_close(ours(x), direct(x))


def test_preparing_refuses_what_it_cannot_do_and_changes_nothing(tmp_path):
    from tests.test_lora_grouped_conv import ConvNet

    first = saved_adapter(tmp_path / "first", seed=1, r=4)
    ours = loaded_directly(first)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"target_rank=2 is below the rank of 'blocks.0.fc1' \(adapter 'default', r=4\)"):
        minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=2)
    with pytest.raises(ValueError, match=r"target_rank is a rank, an int >= 1; got 0"):
        minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=0)
    with pytest.raises(ValueError, match="check_compiled is 'error', 'warn' or 'ignore', got 'never'"):
        minipeft.prepare_model_for_compiled_hotswap(ours, check_compiled="never")
    with pytest.raises(TypeError, match="takes a PeftModel, got TinyNet"):
        minipeft.prepare_model_for_compiled_hotswap(TinyNet())
    assert state.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert not getattr(ours, "_hotswap_keeps_scalings", False)

    compiled = torch.compile(ours, backend="aot_eager")
    with pytest.raises(ValueError, match="is called before torch.compile"):
        minipeft.prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="is called before torch.compile"):
        minipeft.prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    assert ours.peft_config["default"].r == 8

    ia3 = minipeft.get_peft_model(TinyNet(), minipeft.IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="holds no LoRA adapter to prepare"):
        minipeft.prepare_model_for_compiled_hotswap(ia3)

    # A grouped convolution's rank is a multiple of its groups: a dry run refuses before any layer pads.
    conv = minipeft.get_peft_model(ConvNet(), minipeft.LoraConfig(r=8, target_modules=["depthwise", "grouped"]))
    shapes = {k: v.shape for k, v in conv.state_dict().items()}
    with pytest.raises(ValueError, match="groups=8 is a multiple of 8; 12 is not"):
        minipeft.prepare_model_for_compiled_hotswap(conv, target_rank=12)
    assert shapes == {k: v.shape for k, v in conv.state_dict().items()}


class AttentionNet(torch.nn.Module):
    """An nn.MultiheadAttention, whose out_proj LoRA takes its rank and alpha by the attention's name."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("second", [dict(alpha_pattern={"attn": 32}), dict(rank_pattern={"attn": 4})])
def test_patterns_naming_an_attention_reach_its_out_proj(tmp_path, prepared, second):
    torch.manual_seed(0)
    base = AttentionNet().eval()
    x = torch.randn(5, 2, 16)
    folders = []
    for seed, options in enumerate([{}, second], start=1):
        torch.manual_seed(seed)
        model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(
            r=8, lora_alpha=8, target_modules=["attn"], **options))
        randomize_adapters(model, seed=seed)
        model.save_pretrained(folders.append(tmp_path / str(seed)) or folders[-1])
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0])
    if prepared:
        minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=8)
    minipeft.hotswap_adapter(ours, folders[1], adapter_name="default")
    direct = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), folders[1])
    torch.testing.assert_close(ours(x), direct(x), rtol=1e-4, atol=1e-5)
    ours.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved")(x), ours(x))


def test_a_padded_adapter_saves_as_plain_lora_and_a_decomposed_one_is_not_padded(tmp_path):
    # orthogonal init needs an even rank: the padded adapter is no init's, and its config says so.
    first = saved_adapter(tmp_path / "orthogonal", seed=1, init_lora_weights="orthogonal")
    ours = loaded_directly(first)
    minipeft.prepare_model_for_compiled_hotswap(ours, target_rank=5)
    ours.save_pretrained(tmp_path / "saved")
    assert ours.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(loaded_directly(tmp_path / "saved")(input_ids()), ours(input_ids()))
    # ... and takes the adapter it was loaded from again, and one of another init.
    minipeft.hotswap_adapter(ours, first, adapter_name="default")
    torch.testing.assert_close(ours(input_ids()), loaded_directly(first)(input_ids()))
    gaussian = saved_adapter(tmp_path / "gaussian", seed=2, init_lora_weights="gaussian")
    minipeft.hotswap_adapter(ours, gaussian, adapter_name="default")
    torch.testing.assert_close(ours(input_ids()), loaded_directly(gaussian)(input_ids()))
    # PiSSA left its rank-4 residual in the base weights, which a padded adapter would not match.
    torch.manual_seed(0)
    pissa = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] rewrote the base weights they adapt"):
        minipeft.prepare_model_for_compiled_hotswap(pissa, target_rank=8)
    assert pissa.peft_config["default"].r == 4
    pissa.save_pretrained(tmp_path / "pissa")
    with pytest.raises(ValueError, match="init_lora_weights='pissa' rewrote the base weights for its own factors"):
        minipeft.hotswap_adapter(pissa, tmp_path / "pissa", adapter_name="default")


def test_an_adapter_on_fewer_parameters_of_a_module_is_refused(tmp_path):
    # LoRA on two parameters of one module nests two wrappers, keyed by which parameters are
    # adapted: a checkpoint of one parameter alone would name the other's tensors.
    from tests.test_lora_target_parameters import NET_TARGETS, Net

    folders = []
    for seed, targets in enumerate([NET_TARGETS, NET_TARGETS[:1]], start=1):
        torch.manual_seed(seed)
        model = minipeft.get_peft_model(Net(transposed=False), minipeft.LoraConfig(
            r=2, target_modules=[], target_parameters=targets))
        model.save_pretrained(folders.append(tmp_path / str(seed)) or folders[-1])
    ours = minipeft.PeftModel.from_pretrained(Net(transposed=False), folders[0])
    with pytest.raises(ValueError, match="differs from the adapter's in target_parameters"):
        minipeft.hotswap_adapter(ours, folders[1], adapter_name="default")

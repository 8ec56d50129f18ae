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
    ({}, dict(r=8), "in r"),
    ({}, dict(target_modules=["fc1"]), "in target_modules"),
    # the same number of tokens, other tokens: same shapes, so only the config can tell
    (dict(trainable_token_indices={"embed": [1, 2, 3]}), dict(trainable_token_indices={"embed": [10, 20, 30]}),
     "in trainable_token_indices"),
    # with an alpha_pattern, lora_alpha may not change (which layers it reaches is the pattern's)
    (dict(alpha_pattern={"fc1": 3}), dict(alpha_pattern={"fc1": 3}, lora_alpha=5), "in lora_alpha"),
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

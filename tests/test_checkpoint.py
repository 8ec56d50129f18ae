"""Saving and loading adapters: the layout, freezing, atomic writes and every bad input.

A two-layer model keeps these fast; the cross-library round trips on transformers models live
in test_checkpoint_peft_parity.py.
"""

import json
import os
import warnings

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import minipeft
from minipeft import LoraConfig, PeftModel, checkpoint, get_peft_model


class Tiny(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.up = nn.Linear(8, hidden)
        self.down = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def base(hidden=16):
    torch.manual_seed(0)
    return Tiny(hidden)


def trained(r=4, **kwargs):
    """A PeftModel whose adapter moved away from its init, so a wrong load shows in the output."""
    model = get_peft_model(base(), LoraConfig(r=r, target_modules=["up", "down"], init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    return model


def saved(tmp_path, **kwargs):
    model = trained(**kwargs)
    model.save_pretrained(tmp_path)
    return model


def base_state():
    return {k: v.clone() for k, v in base().state_dict().items()}


# -- layout -------------------------------------------------------------------------------------------
def test_only_adapter_tensors_are_written_without_adapter_name(tmp_path):
    saved(tmp_path, modules_to_save=["down"], use_dora=True)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # "down" is trained whole (modules_to_save) and so takes no LoRA; its copy is saved under its own name.
    assert keys == {
        "base_model.model.up.lora_A.weight",
        "base_model.model.up.lora_B.weight",
        "base_model.model.up.lora_magnitude_vector",
        "base_model.model.down.weight",
        "base_model.model.down.bias",
    }
    assert meta["format"] == "pt"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    assert "use_fused_kernels" not in config  # runtime-only
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_selected_adapters_and_subfolders(tmp_path):
    model = trained()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["up"]))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path)) == ["other"]
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "other"} <= set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; the model has \['default', 'other'\]"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])


def test_state_dict_functions_round_trip_under_another_name():
    source = trained()
    state = minipeft.get_peft_model_state_dict(source)
    target = get_peft_model(base(), LoraConfig(r=4, target_modules=["up", "down"]), adapter_name="mine")
    minipeft.set_peft_model_state_dict(target, state, adapter_name="mine")
    torch.testing.assert_close(target(X), source(X))


def test_a_models_state_dict_given_for_an_adapters_is_named_as_such():
    source = trained()
    target = get_peft_model(base(), LoraConfig(r=4, target_modules=["up", "down"]))
    with pytest.raises(ValueError, match=r"The keys hold adapter names \(\['default'\]\): this is a model's "
                                         r"state_dict\(\).*get_peft_model_state_dict"):
        minipeft.set_peft_model_state_dict(target, source.state_dict())


def test_plain_injected_model_uses_keys_without_prefix():
    model = minipeft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["up"]), base())
    assert set(minipeft.get_peft_model_state_dict(model)) == {"up.lora_A.weight", "up.lora_B.weight"}


# -- loading: frozen, base untouched ------------------------------------------------------------------
@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_output_freezing_and_base(tmp_path, is_trainable):
    source = saved(tmp_path)
    before = base_state()
    loaded = PeftModel.from_pretrained(base(), tmp_path, is_trainable=is_trainable)
    torch.testing.assert_close(loaded(X), source(X))
    assert loaded.peft_config["default"].inference_mode is (not is_trainable)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.{m}.lora_{ab}.default.weight" for m in ("up", "down") for ab in "AB"}
    assert trainable == (expected if is_trainable else set())
    for key, value in loaded.get_base_model().state_dict().items():
        if ".lora_" not in key:
            torch.testing.assert_close(value, before[key.replace("base_layer.", "")], rtol=0, atol=0)


def test_load_adapter_adds_a_frozen_inactive_adapter(tmp_path):
    source = saved(tmp_path)
    model = get_peft_model(base(), LoraConfig(r=2, target_modules=["up"]))
    model.load_adapter(tmp_path, "loaded")
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".loaded." in n)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in eval mode, switching adapters is inference: nothing to warn of
        model.set_adapter("loaded")
    torch.testing.assert_close(model(X), source(X))
    # In training mode, say that it stays frozen (peft's set_adapter would make it trainable).
    model.train()
    with pytest.warns(UserWarning, match=r"\['loaded'\] were loaded for inference and stay frozen.*is_trainable=True"):
        model.set_adapter("loaded")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".loaded." in n)


def test_load_adapter_into_an_existing_adapter_loads_its_tensors_as_peft_does(tmp_path):
    # (e.g. going back to the best checkpoint after training went on); peft is the reference.
    peft = pytest.importorskip("peft")
    for library in (peft, minipeft):
        torch.manual_seed(0)
        model = library.get_peft_model(base(), library.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))
        best = model(X).detach()
        model.save_pretrained(tmp_path / library.__name__)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # training went on, and worse
        model.load_adapter(tmp_path / library.__name__, "default", is_trainable=True)
        torch.testing.assert_close(model(X), best, rtol=0, atol=0)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == \
            [n for n, p in model.named_parameters() if "lora_" in n]  # still training
    other = tmp_path / "other"
    minipeft.get_peft_model(base(), minipeft.LoraConfig(r=4, target_modules=["up"], init_lora_weights=False)
                            ).save_pretrained(other)
    with pytest.raises(ValueError, match=r"cannot load .*other' into adapter 'default', which exists already: the "
                                         r"checkpoint's config differs from the adapter's in r\. Load it under another"):
        model.load_adapter(other, "default")
    torch.testing.assert_close(model(X), best, rtol=0, atol=0)


def test_load_adapter_into_an_existing_adapter_refuses_a_merged_one_and_a_prompt_network(tmp_path):
    model = get_peft_model(base(), LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "lora")
    model.merge_adapter()
    merged = model(X).detach()
    with pytest.raises(ValueError, match=r"into adapter 'default', which exists already: it is merged into \['up'\] "
                                         r".*unmerge_adapter\(\) first"):
        model.load_adapter(tmp_path / "lora", "default")
    torch.testing.assert_close(model(X), merged, rtol=0, atol=0)
    # Prefix tuning with its MLP: the checkpoint holds the MLP's output, which would replace it.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="sdpa"))
    prefix = get_peft_model(llama, minipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                               prefix_projection=True))
    prefix.save_pretrained(tmp_path / "prefix")
    trained = [p for p in prefix.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"a network computes its virtual tokens, and the checkpoint holds their "
                                         r"value alone .* load it under another adapter_name"):
        prefix.load_adapter(tmp_path / "prefix", "default", is_trainable=True)
    assert [p for p in prefix.parameters() if p.requires_grad] == trained


# -- atomic saves -------------------------------------------------------------------------------------
def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = saved(tmp_path)
    before = _files(tmp_path)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trained(r=2).save_pretrained(tmp_path)
    assert _files(tmp_path) == before  # nothing replaced, no temporary file left behind
    torch.testing.assert_close(PeftModel.from_pretrained(base(), tmp_path)(X), first(X))


def test_a_save_of_several_adapters_that_fails_leaves_every_previous_one(tmp_path, monkeypatch):
    def two_adapters(r):
        model = trained(r=r)
        model.add_adapter("other", LoraConfig(r=r, target_modules=["up"], init_lora_weights=False))
        return model

    two_adapters(4).save_pretrained(tmp_path)
    files = lambda: {f"{folder}/{name}": (folder / name).read_bytes()  # noqa: E731
                     for folder in (tmp_path, tmp_path / "other") for name in sorted(os.listdir(folder)) if name != "other"}
    before = files()
    real_save, calls = safetensors.torch.save, []

    def fail_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # while writing the second adapter, the first written already
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save", fail_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        two_adapters(2).save_pretrained(tmp_path)
    assert files() == before  # not one adapter new and the other old


def test_selected_adapters_given_as_one_string_is_refused(tmp_path):
    with pytest.raises(TypeError, match=r"selected_adapters is a list of adapter names; write \['default'\]"):
        trained().save_pretrained(tmp_path, selected_adapters="default")
    assert not os.listdir(tmp_path)


def test_failure_after_bytes_written_leaves_previous_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path)
    before = _files(tmp_path)

    def broken_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        trained(r=2).save_pretrained(tmp_path)
    assert _files(tmp_path) == before


def test_crash_between_the_two_renames_is_detected(tmp_path, monkeypatch):
    saved(tmp_path)
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after the tensors moved, before the config did
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        trained(r=2, lora_alpha=3).save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    # The old config (r = 4) beside the new tensors (r = 2): the warning names the fields that
    # differ, and the tensors, which do not fit that config, are refused.
    with pytest.warns(UserWarning, match=r"differs from the config adapter_model.safetensors was saved with "
                                         r"\(lora_alpha: 8 in adapter_config.json, 3 at save time; r: 4 in .*, 2 at"):
        with pytest.raises(ValueError, match="shape"):
            PeftModel.from_pretrained(base(), tmp_path)


def test_a_config_edited_by_hand_is_loaded_as_edited_with_a_warning(tmp_path):
    # peft loads an adapter_config.json edited after saving (a new lora_alpha, say), and so
    # does minipeft: the edited config is the one used, and a warning names what changed.
    model = trained(r=2, lora_alpha=4)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"lora_alpha": 4', '"lora_alpha": 8'))
    with pytest.warns(UserWarning, match=r"lora_alpha: 8 in adapter_config.json, 4 at save time.*as edited"):
        reloaded = PeftModel.from_pretrained(base(), tmp_path)
    assert reloaded.peft_config["default"].lora_alpha == 8
    with torch.no_grad():  # twice the scaling: the update doubles
        ours, theirs = model.get_base_model().up, reloaded.get_base_model().up
        torch.testing.assert_close(theirs(X) - theirs.base_layer(X), 2 * (ours(X) - ours.base_layer(X)))


def test_save_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file; give a folder"):
        trained().save_pretrained(tmp_path / "f")


# -- bad input: nothing is half loaded ----------------------------------------------------------------
def assert_untouched(model):
    """A failed from_pretrained leaves the base model exactly as it was."""
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, base_state()[key], rtol=0, atol=0)


def test_pickle_checkpoint_is_refused(tmp_path):
    saved(tmp_path)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin, a pickle.*can run arbitrary code.*Convert it to safetensors"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_other_base_model_names_first_mismatching_key_with_shapes(tmp_path):
    saved(tmp_path)
    model = base(hidden=12)
    with pytest.raises(ValueError, match=r"shape mismatch for 'base_model.model.up.lora_B.weight': "
                                          r"checkpoint has \(16, 4\), the model expects \(12, 4\)"):
        PeftModel.from_pretrained(model, tmp_path)
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)
    assert all(p.requires_grad for p in model.parameters())


def test_other_rank_via_state_dict_names_shapes():
    state = minipeft.get_peft_model_state_dict(trained(r=4))
    target = trained(r=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"'base_model.model.up.lora_A.weight': checkpoint has \(4, 8\), "
                                          r"the model expects \(2, 8\)"):
        minipeft.set_peft_model_state_dict(target, state)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_missing_and_unexpected_keys_are_listed():
    state = minipeft.get_peft_model_state_dict(trained())
    del state["base_model.model.down.lora_B.weight"]
    state["base_model.model.side.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) the adapter needs: 'base_model.model.down.lora_B.weight'; "
                                          r"1 unexpected key\(s\): 'base_model.model.side.lora_A.weight'"):
        minipeft.set_peft_model_state_dict(trained(), state)


def test_load_adapter_rolls_back_on_a_bad_checkpoint(tmp_path):
    saved(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    del state["base_model.model.up.lora_A.weight"]
    safetensors.torch.save_file(state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = get_peft_model(base(), LoraConfig(r=2, target_modules=["up"]))
    keys, flags = set(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="missing 1 key"):
        model.load_adapter(tmp_path, "broken")
    assert set(model.peft_config) == {"default"}
    assert set(model.state_dict()) == keys  # the wrapper of "down" made for "broken" is gone again
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_unknown_peft_type(tmp_path):
    saved(tmp_path)
    _edit_config(tmp_path, peft_type="XLORA")
    model = base()
    with pytest.raises(ValueError, match=r"unknown peft_type 'XLORA'; minipeft supports: .*LORA"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_untouched(model)


def test_field_of_the_wrong_type(tmp_path):
    saved(tmp_path)
    _edit_config(tmp_path, r="8")
    with pytest.raises(TypeError, match=r"field 'r' of LoraConfig must be an integer, got '8' \(str\)"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_invalid_value_names_the_file(tmp_path):
    saved(tmp_path)
    _edit_config(tmp_path, r=0)
    with pytest.raises(ValueError, match=r"adapter_config.json: LoRA rank must be a positive integer, got r=0"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_peft_options_at_their_defaults_are_accepted(tmp_path):
    source = saved(tmp_path)
    _edit_config(tmp_path, peft_version="0.21.2", megatron_config=None, lora_bias=False, use_qalora=False,
                 qalora_group_size=16, megatron_core="megatron.core", loftq_config={})
    torch.testing.assert_close(PeftModel.from_pretrained(base(), tmp_path)(X), source(X))


@pytest.mark.parametrize("key,value", [("use_qalora", True), ("qalora_group_size", 32)])
def test_unimplemented_peft_feature_is_refused(tmp_path, key, value):
    saved(tmp_path)
    _edit_config(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"{key}={value!r} asks for a peft feature that minipeft does not implement"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_config_from_dict_picks_class_by_peft_type():
    config = minipeft.PeftConfig.from_dict({"peft_type": "LORA", "r": 2, "target_modules": ["up"]})
    assert isinstance(config, LoraConfig) and config.r == 2


@pytest.mark.parametrize("remove", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(tmp_path, remove):
    saved(tmp_path)
    os.remove(tmp_path / remove)
    with pytest.raises(FileNotFoundError, match=rf"adapter checkpoint .* is missing {remove}"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter checkpoint at .*nowhere.*not a folder"):
        PeftModel.from_pretrained(base(), tmp_path / "nowhere")


def test_corrupted_safetensors(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-20])  # truncated
    model = base()
    with pytest.raises(ValueError, match="not a readable safetensors file .*truncated or corrupted"):
        PeftModel.from_pretrained(model, tmp_path)
    assert_untouched(model)


def test_invalid_json(tmp_path):
    saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        PeftModel.from_pretrained(base(), tmp_path)


def test_key_rule_covers_modules_outside_adapter_layers():
    """Any module exposing adapter_layer_names takes part (e.g. a prompt encoder on the PeftModel)."""

    class Encoder(nn.Module):
        adapter_layer_names = ("prompts",)

        def __init__(self):
            super().__init__()
            self.prompts = nn.ParameterDict({"default": nn.Parameter(torch.ones(2, 3)), "b": nn.Parameter(torch.ones(1))})

    model = trained()
    model.encoder = Encoder()
    state = minipeft.get_peft_model_state_dict(model)
    assert "encoder.prompts" in state and not any(k.startswith("encoder.prompts.") for k in state)
    assert checkpoint.adapter_key_map(model, "b") == {"encoder.prompts": "encoder.prompts.b"}


def test_non_tensor_and_integer_values_are_refused():
    state = minipeft.get_peft_model_state_dict(trained())
    key = "base_model.model.up.lora_A.weight"
    with pytest.raises(TypeError, match=rf"state dict values must be tensors; '{key}' are not"):
        minipeft.set_peft_model_state_dict(trained(), {**state, key: [[0.0]]})
    with pytest.raises(TypeError, match=rf"dtype mismatch for '{key}': checkpoint has torch.int64"):
        minipeft.set_peft_model_state_dict(trained(), {**state, key: state[key].long()})


def test_loading_for_inference_switches_dropout_off(tmp_path):
    import copy

    from minipeft import LoraConfig, PeftModel, get_peft_model
    from tests.models import TinyNet, input_ids, randomize_adapters

    base = TinyNet()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.5, target_modules=["fc1"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(m.training for m in loaded.modules())
    torch.testing.assert_close(loaded(input_ids=input_ids()), loaded(input_ids=input_ids()))

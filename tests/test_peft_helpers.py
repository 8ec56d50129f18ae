"""peft's small helpers, as a peft user calls them: ``load_peft_weights`` (an adapter's tensors,
for ``set_peft_model_state_dict``), ``get_peft_config`` (a config from a dict) and
``cast_mixed_precision_params`` and ``prepare_model_for_kbit_training``. The reference is peft itself,
on the same files and models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minipeft
from tests.models import TinyNet, input_ids, randomize_adapters

peft = pytest.importorskip("peft")

LORA = dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "embed"], modules_to_save=["head"])


@pytest.fixture
def peft_checkpoint(tmp_path):
    """(folder, base model, peft model): a LoRA adapter with random factors that peft saved."""
    torch.manual_seed(0)
    base = TinyNet()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", base, model.eval()


def test_load_peft_weights_gives_peft_s_tensors_and_loads_with_set_peft_model_state_dict(peft_checkpoint):
    folder, base, peft_model = peft_checkpoint
    ours, theirs = minipeft.load_peft_weights(folder, device="cpu"), peft.load_peft_weights(str(folder), device="cpu")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    # The usual pairing: a fresh model with the same config, the saved tensors set into it.
    model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**LORA))
    result = minipeft.set_peft_model_state_dict(model, ours)
    assert not result.unexpected_keys
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), peft_model(ids))


def test_load_peft_weights_takes_a_subfolder_and_refuses_what_it_cannot_read(peft_checkpoint, tmp_path):
    folder, _, _ = peft_checkpoint
    assert minipeft.load_peft_weights(folder.parent, device="cpu", subfolder=folder.name).keys() == \
        minipeft.load_peft_weights(folder, device="cpu").keys()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        minipeft.load_peft_weights(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        minipeft.load_peft_weights(empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.ones(1)}, pickled / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        minipeft.load_peft_weights(pickled)
    # save_pretrained puts an adapter not named "default" in a subfolder: the error says so.
    with pytest.raises(FileNotFoundError, match="subfolder='adapter'"):
        minipeft.load_peft_weights(folder.parent)
    with pytest.raises(TypeError, match="downloads nothing"):
        minipeft.load_peft_weights(folder, token="hf_...")


def test_load_peft_weights_renames_keys_as_peft_s_key_mapping_does(peft_checkpoint):
    folder, _, _ = peft_checkpoint
    # The first pattern that matches renames a key; the others are not tried on it.
    mapping = {r"^blocks\.(\d+)\.fc1": r"layers.\1.up", r"fc": "dense"}
    ours = minipeft.load_peft_weights(folder, device="cpu", key_mapping=mapping)
    theirs = peft.load_peft_weights(str(folder), device="cpu", key_mapping=mapping)
    assert ours.keys() == theirs.keys()
    assert any(".layers.0.up." in key for key in ours) and any(".blocks.0.dense2." in key for key in ours)


@pytest.mark.parametrize("config", [
    peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["fc1"], use_rslora=True),
    peft.PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
])
def test_get_peft_config_builds_the_config_peft_builds_from_the_same_dict(config):
    ours, theirs = minipeft.get_peft_config(config.to_dict()), peft.get_peft_config(config.to_dict())
    assert type(ours).__name__ == type(theirs).__name__

    def fields(c):  # (peft keeps module names as a set, minipeft as a list: the same names)
        return {name: sorted(v) if isinstance(v, (set, list)) else v for name, v in c.to_dict().items()}

    shared = fields(ours).keys() & fields(theirs).keys()
    assert {n: fields(ours)[n] for n in shared} == {n: fields(theirs)[n] for n in shared}
    assert len(shared) >= 5


def test_get_peft_config_refuses_a_dict_without_a_method():
    with pytest.raises(ValueError, match="peft_type"):
        minipeft.get_peft_config({"r": 4})


def test_cast_mixed_precision_params_casts_as_peft_does():
    torch.manual_seed(0)
    ours = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(TinyNet(), peft.LoraConfig(**LORA))
    minipeft.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(theirs, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in ours.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(input_ids()).sum().backward()  # trains: bf16 base, fp32 adapters
    with pytest.raises(TypeError, match="floating-point"):
        minipeft.cast_mixed_precision_params(ours, torch.int8)


def _model_state(model):
    """What prepare_model_for_kbit_training changes: each parameter's dtype and requires_grad,
    whether checkpointing is on, and whether the input embeddings' output requires grad."""
    embedded = model.get_input_embeddings()(input_ids())
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # (transformers 5; before it:)
    checkpointing = model.is_gradient_checkpointing if checkpointing is None else checkpointing
    return ({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}, checkpointing,
            embedded.requires_grad)


@pytest.mark.parametrize("loaded", ["bf16", "fp16, as if 4-bit", "bf16, as if gptq", "as if 4-bit, not reentrant"])
def test_prepare_model_for_kbit_training_prepares_as_peft_does(loaded):
    from tests.models import tiny_transformers_model

    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if "not reentrant" in loaded else {}
    models = []
    for library in (minipeft, peft):
        model = tiny_transformers_model("llama").to(torch.float16 if "fp16" in loaded else torch.bfloat16)
        model.model.norm.weight.data = model.model.norm.weight.data.float()  # one already in fp32: left as is
        if "4-bit" in loaded:  # the attributes transformers sets on a model it quantized
            model.is_loaded_in_4bit = True
        if "gptq" in loaded:
            model.quantization_method = "gptq"
        with warnings.catch_warnings():
            if library is minipeft:  # (no deprecated transformers API: peft 0.21 calls one)
                warnings.simplefilter("error", FutureWarning)
            models.append(library.prepare_model_for_kbit_training(model, **kwargs))
    ours, theirs = models
    assert _model_state(ours) == _model_state(theirs)
    dtypes, checkpointing, embedded_needs_grad = _model_state(ours)
    assert not any(trains for _, trains in dtypes.values())
    assert {dtype for dtype, _ in dtypes.values()} == ({torch.bfloat16, torch.float32} if "gptq" in loaded
                                                       else {torch.float32})
    assert checkpointing == ("as if" in loaded)
    if checkpointing and "not reentrant" not in loaded:
        assert embedded_needs_grad
    if checkpointing:  # the kwargs reach torch's checkpoint (a partial that transformers gives each layer)
        partials = {m._gradient_checkpointing_func for m in ours.modules() if hasattr(m, "_gradient_checkpointing_func")}
        assert [p.keywords.get("use_reentrant", True) for p in partials] == ["not reentrant" not in loaded]

    # And LoRA then trains on it: every adapter gets a gradient through the checkpointed blocks.
    ours = minipeft.get_peft_model(ours, minipeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).train()
    ids = input_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="gptq" in loaded):
        ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


class QuantizedLookingNet(TinyNet):
    """A model outside transformers that says it was loaded in 4 bits and has no
    enable_input_require_grads: the input embeddings then get a forward hook."""

    is_loaded_in_4bit = True

    def get_input_embeddings(self):
        return self.embed

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.checkpointing_kwargs = gradient_checkpointing_kwargs


def test_prepare_model_for_kbit_training_outside_transformers():
    models = [library.prepare_model_for_kbit_training(QuantizedLookingNet().half(), gradient_checkpointing_kwargs={"x": 1})
              for library in (minipeft, peft)]
    for model in models:
        assert model.embed(input_ids()).requires_grad and model.checkpointing_kwargs == {"x": 1}
        assert {(p.dtype, p.requires_grad) for p in model.parameters()} == {(torch.float32, False)}

"""PeftModel's peft-compatible surface: save/load keywords and argument order, enabling and
disabling adapter layers, refusing a model that already holds adapters, and adapter names.
The reference is peft itself: its signatures, the files it writes and the outputs it gives."""

from __future__ import annotations

import copy
import functools
import inspect
import os
import re
import warnings

import pytest
import torch

import minipeft
from minipeft import (
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
)
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

LORA = dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "embed"])


def files_under(folder) -> set[str]:
    """Every file below ``folder``, relative to it; peft's model card README.md left out."""
    found = set()
    for root, _, names in os.walk(folder):
        found |= {os.path.relpath(os.path.join(root, n), folder) for n in names if n != "README.md"}
    return found


def both(base):
    """minipeft and peft, each with LoRA "default" and "other" holding the same random weights."""
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    ours.add_adapter("other", LoraConfig(**{**LORA, "r": 3}))
    randomize_adapters(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    theirs.add_adapter("other", peft.LoraConfig(**{**LORA, "r": 3}))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours, adapter_name=name), adapter_name=name)
    return ours, theirs


def positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "cls")]


# -- signatures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["save_pretrained", "load_adapter", "from_pretrained"])
def test_positional_arguments_are_peft_s(method):
    """Every positional argument minipeft takes sits where peft has it, so positional calls agree."""
    ours, theirs = positional(getattr(PeftModel, method)), positional(getattr(peft.PeftModel, method))
    assert ours == theirs[: len(ours)]


def test_get_peft_model_takes_peft_s_arguments(tmp_path):
    assert positional(get_peft_model) == positional(peft.get_peft_model)
    config = LoraConfig(**LORA)
    model = get_peft_model(TinyNet(), config, "default", True, True, "v1.0", True)
    assert model.peft_config["default"].revision == "v1.0" and config.revision is None
    model.save_pretrained(tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).revision == "v1.0"
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False would keep adapters in the base's torch.bfloat16"):
        get_peft_model(TinyNet().bfloat16(), config, autocast_adapter_dtype=False)
    get_peft_model(TinyNet(), config, autocast_adapter_dtype=False)  # a float32 base: nothing to keep or cast


# -- save_pretrained ---------------------------------------------------------------------------
def test_save_pretrained_positional_selected_adapters_writes_what_peft_writes(tmp_path):
    ours, theirs = both(TinyNet().eval())
    ours.save_pretrained(tmp_path / "ours", True, ["other"])
    theirs.save_pretrained(tmp_path / "theirs", True, ["other"])
    assert files_under(tmp_path / "ours") == files_under(tmp_path / "theirs") == {
        os.path.join("other", "adapter_config.json"), os.path.join("other", "adapter_model.safetensors")
    }


def test_save_pretrained_refuses_pickles_and_writes_nothing(tmp_path):
    model, _ = both(TinyNet().eval())
    with pytest.raises(ValueError, match="safetensors only.*leave safe_serialization=True"):
        model.save_pretrained(tmp_path / "out", safe_serialization=False)
    with pytest.raises(ValueError, match="never base-model layers"):
        model.save_pretrained(tmp_path / "out", save_embedding_layers=True)
    with pytest.raises(ValueError, match="PiSSA/OLoRA"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "init").exists()
    model.save_pretrained(tmp_path / "out", save_embedding_layers=False)
    assert files_under(tmp_path / "out")


def test_save_pretrained_off_the_main_process_writes_no_file(tmp_path):
    ours, theirs = both(TinyNet().eval())
    ours.save_pretrained(tmp_path / "ours", is_main_process=False)
    theirs.save_pretrained(tmp_path / "theirs", is_main_process=False)
    assert files_under(tmp_path / "theirs") == set()  # peft: no file (it leaves empty folders)
    assert not (tmp_path / "ours").exists()
    # The arguments are still checked, so every process of a run fails alike.
    with pytest.raises(ValueError, match=r"cannot save unknown adapter\(s\) \['nope'\]; the model has"):
        ours.save_pretrained(tmp_path / "ours", selected_adapters=["nope"], is_main_process=False)


# -- from_pretrained / load_adapter -----------------------------------------------------------
def test_subfolder_loads_the_adapter_saved_there_as_peft_does(tmp_path):
    base = TinyNet().eval()
    ours, _ = both(base)
    ours.save_pretrained(tmp_path)  # "default" at the top, "other" in other/
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="other")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="other")
    expected = theirs(input_ids=input_ids())
    torch.testing.assert_close(loaded(input_ids=input_ids()), expected)
    ours.set_adapter("other")
    torch.testing.assert_close(ours(input_ids=input_ids()), expected)

    loaded.load_adapter(tmp_path, "first", False, "cpu", subfolder=None)  # torch_device is peft's 4th argument
    loaded.set_adapter("first")
    ours.set_adapter("default")
    torch.testing.assert_close(loaded(input_ids=input_ids()), ours(input_ids=input_ids()))


def test_config_replaces_the_saved_one_as_in_peft(tmp_path):
    base = TinyNet().eval()
    ours, _ = both(base)
    ours.save_pretrained(tmp_path)
    doubled = dict(LORA, lora_alpha=8)  # same shapes, twice the scaling
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=peft.LoraConfig(**doubled))
    config = LoraConfig(**doubled)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=config, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(input_ids=input_ids()), theirs(input_ids=input_ids()))
    assert not torch.allclose(loaded(input_ids=input_ids()), ours(input_ids=input_ids()))
    assert config.inference_mode is False  # the caller's config is copied, not changed
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bad_loading_options_say_what_would_work(tmp_path):
    base = TinyNet().eval()
    get_peft_model(copy.deepcopy(base), LoraConfig(**LORA)).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"expected a minipeft config \(LoraConfig, IA3Config, ...\), got dict"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=dict(LORA))
    with pytest.raises(TypeError, match="got peft's LoraConfig"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=peft.LoraConfig(**LORA))
    with pytest.raises(ValueError, match="torch_device='gpu0' is not a device"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, torch_device="gpu0")
    with pytest.raises(ValueError, match="autocast_adapter_dtype=False.*Leave it True"):
        PeftModel.from_pretrained(copy.deepcopy(base).half(), tmp_path, autocast_adapter_dtype=False)
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=False, revision="main")  # as peft
    with pytest.raises(ValueError, match="is_trainable must be True or False, got 'no'"):  # "no" would train
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable="no")
    with pytest.raises(ValueError, match="autocast_adapter_dtype must be True or False, got 0"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="nowhere")


# -- enable / disable adapter layers ----------------------------------------------------------
@pytest.mark.parametrize("route", ["base_model", "peft_model"])
def test_disable_and_enable_adapter_layers_as_peft(route):
    base = TinyNet().eval()
    ours, theirs = both(base)
    ids = input_ids()
    adapted = theirs(input_ids=ids)
    torch.testing.assert_close(ours(input_ids=ids), adapted)
    owner = (lambda m: m.base_model) if route == "base_model" else (lambda m: m)

    for model in (ours, theirs):
        owner(model).disable_adapter_layers()
    torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))
    torch.testing.assert_close(ours(input_ids=ids), base(input_ids=ids))

    for model in (ours, theirs):  # a merged layer unmerges itself while disabled
        owner(model).enable_adapter_layers()
        model.merge_adapter()
        owner(model).disable_adapter_layers()
    torch.testing.assert_close(ours(input_ids=ids), base(input_ids=ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs(input_ids=ids), base(input_ids=ids), atol=1e-6, rtol=0)

    for model in (ours, theirs):
        owner(model).enable_adapter_layers()
    torch.testing.assert_close(ours(input_ids=ids), adapted, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs(input_ids=ids), adapted, atol=1e-6, rtol=0)


# -- a model that already holds adapters -------------------------------------------------------
def test_get_peft_model_refuses_a_model_that_holds_adapters(tmp_path):
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    model.save_pretrained(tmp_path)
    in_place = inject_adapter_in_model(LoraConfig(**LORA), TinyNet(), "mine")
    for adapted, held in [(model, ["default"]), (model.get_base_model(), ["default"]), (in_place, ["mine"])]:
        before = copy.deepcopy(adapted.state_dict())
        message = re.escape(f"already holds minipeft adapter(s) {held}") + ".*add_adapter.*load_adapter"
        with pytest.raises(ValueError, match=message):
            get_peft_model(adapted, LoraConfig(**LORA), adapter_name="second")
        with pytest.raises(ValueError, match="already holds minipeft adapter"):
            PeftModel.from_pretrained(adapted, tmp_path, adapter_name="second")
        assert adapted.state_dict().keys() == before.keys()
    assert list(model.peft_config) == ["default"]


# -- adapter names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train", "to", "half", "forward", "keys", "training"])
def test_names_torch_cannot_use_as_keys_are_refused_clearly(name):
    """peft lets these through to nn.ModuleDict, which fails with "attribute ... already exists"."""
    with pytest.raises(KeyError, match="already exists"):
        peft.get_peft_model(TinyNet(), peft.LoraConfig(**LORA), adapter_name=name)
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match=rf"invalid adapter name '{name}': .*nn.ModuleDicts.*e.g. '{name}_adapter'"):
        model.add_adapter(name, LoraConfig(**LORA))
    with pytest.raises(ValueError, match=rf"invalid adapter name '{name}'"):
        get_peft_model(TinyNet(), LoraConfig(**LORA), adapter_name=name)
    with pytest.raises(ValueError, match=rf"invalid adapter name '{name}'"):
        inject_adapter_in_model(LoraConfig(**LORA), TinyNet(), name)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["copy", "setdefault", "fromkeys"])
def test_parameter_dict_methods_are_refused_too(name):
    """LoRA on an embedding and (IA)^3 keep their vectors in nn.ParameterDicts, whose dict methods
    cannot be keys either; the name is refused for every method, before any layer is touched."""
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match=rf"invalid adapter name '{name}'"):
        model.add_adapter(name, LoraConfig(**LORA))
    assert list(model.peft_config) == ["default"]


def test_prompt_encoder_attributes_are_refused_for_every_method():
    model = get_peft_model(tiny_transformers_model("bert"), LoraConfig(r=2, target_modules=["query"]))
    for name in ("active_adapter", "set_adapter"):
        with pytest.raises(ValueError, match=rf"invalid adapter name '{name}'"):
            model.add_adapter(name, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    assert "prompt_encoder" not in model._modules and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("name, why", [("", "empty"), ("a.b", "contains '.'"), ("a/b", "path separator")])
def test_add_adapter_uses_the_shared_name_check(name, why):
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    with pytest.raises(ValueError, match=rf"invalid adapter name .*{why}"):
        model.add_adapter(name, LoraConfig(**LORA))
    with pytest.raises(ValueError, match=rf"invalid adapter name .*{why}"):
        model.add_weighted_adapter(["default"], [1.0], name)
    assert list(model.peft_config) == ["default"]


def test_set_requires_grad_and_set_adapter_inference_mode_as_in_peft():
    # Gradients on for a second, inactive adapter (two adapters train at once), off for the
    # active one; then the other made active but frozen. peft decides which parameters train.
    base = tiny_transformers_model("llama")
    trains = {}
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base),
                                       library.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        model.add_adapter("b", library.LoraConfig(r=2, target_modules=["v_proj"]))
        steps = []
        model.set_requires_grad("b")
        steps.append({n for n, p in model.named_parameters() if p.requires_grad})
        model.set_requires_grad(["default"], requires_grad=False)
        steps.append({n for n, p in model.named_parameters() if p.requires_grad})
        model.set_adapter("b", inference_mode=True)
        steps.append({n for n, p in model.named_parameters() if p.requires_grad})
        trains[library.__name__] = steps
    assert trains["minipeft"] == trains["peft"]
    assert len(trains["peft"][0]) == 9 and trains["peft"][2] == set()


@pytest.mark.parametrize("task, head", [("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")])
@pytest.mark.parametrize("method", ["LoraConfig", "PromptTuningConfig"])
def test_a_task_s_new_head_trains_and_is_saved_as_in_peft(task, head, method, tmp_path):
    # A token classifier's or a question-answering model's head is new and untrained, like a
    # sequence classifier's: peft adds it to modules_to_save, so it trains and the adapter's
    # file holds it. Without that a reloaded adapter would meet a freshly drawn head.
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48)
    model_class = {"TOKEN_CLS": transformers.BertForTokenClassification,
                   "QUESTION_ANS": transformers.BertForQuestionAnswering}[task]
    torch.manual_seed(0)
    base = model_class(cfg).eval()
    options = dict(r=2, target_modules=["query", "value"]) if method == "LoraConfig" else dict(num_virtual_tokens=3)
    ours, theirs = (library.get_peft_model(copy.deepcopy(base), getattr(library, method)(task_type=task, **options))
                    for library in (minipeft, peft))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert head in ours.peft_config["default"].modules_to_save
    if method == "LoraConfig":
        with torch.no_grad():
            getattr(ours.get_base_model(), head).modules_to_save["default"].weight.add_(1.0)
        ours.save_pretrained(tmp_path)
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        ids = input_ids()
        key = "logits" if task == "TOKEN_CLS" else "start_logits"
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids)[key], ours(input_ids=ids)[key])


def test_deleting_the_last_adapter_leaves_none_active_and_nothing_to_save(tmp_path):
    ours = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    theirs = peft.get_peft_model(tiny_transformers_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (ours, theirs):
        model.delete_adapter("default")
    assert ours.active_adapters == theirs.active_adapters == []
    status = ours.get_model_status()  # (peft's raises a KeyError here)
    assert status.active_adapters == [] and status.available_adapters == [] and status.num_adapter_layers == 0
    with pytest.raises(ValueError, match="holds no adapter to save"):  # peft writes an empty folder
        ours.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    ours.add_adapter("next", LoraConfig(r=2, target_modules=["q_proj"]))
    assert ours.active_adapters == ["next"]


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_after_unloading_the_peft_model_holds_no_adapter(how):
    # The adapters left the model: the wrapper forgets them, and an adapter added next is a
    # first adapter again, injected into the same model (the one unloading returned).
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    plain = getattr(model, how)()
    assert dict(model.peft_config) == {} and model.active_adapters == []
    model.add_adapter("again", LoraConfig(r=2, target_modules=["v_proj"]))
    assert model.active_adapters == ["again"] and model.get_base_model() is plain
    assert [n for n, _ in model.named_parameters() if "lora_" in n][0].endswith("v_proj.lora_A.again.weight")
    model(input_ids=input_ids())


def test_saving_several_adapters_checks_every_folder_before_writing(tmp_path):
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    model.add_adapter("b", LoraConfig(**LORA))
    tmp_path.joinpath("b").write_text("in the way")
    with pytest.raises(NotADirectoryError, match="it is a file; give a folder"):
        model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["b"]  # default's files were not written either
    blocked = tmp_path / "other"
    (blocked / "adapter_model.safetensors").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="adapter_model.safetensors there is a folder"):
        model.save_pretrained(blocked, selected_adapters=["default"])


def test_several_adapters_active_at_once_as_peft_s_tuner_model_sets_them():
    # peft activates several adapters through its tuner model (model.base_model.set_adapter with
    # a list): each layer adds their terms in turn, all of them train, and merging folds all in.
    from tests.test_lora_peft_parity import assert_same_behaviour

    base = tiny_transformers_model("llama")
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    theirs.add_adapter("b", peft.LoraConfig(**config, use_rslora=True))
    ours.add_adapter("b", LoraConfig(**config, use_rslora=True))
    randomize_adapters(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ours.base_model.active_adapters == theirs.active_adapters == ["default", "b"]
    assert_same_behaviour(theirs, ours, input_ids())  # outputs, and gradients for both adapters
    with torch.no_grad():
        torch.testing.assert_close(ours.merge_and_unload()(input_ids=input_ids()).logits,
                                   theirs.merge_and_unload()(input_ids=input_ids()).logits)


def test_what_cannot_be_active_together_is_refused():
    model = get_peft_model(TinyNet(), LoraConfig(**LORA, modules_to_save=["head"]))
    model.add_adapter("b", LoraConfig(**LORA, modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"each train a whole copy of 'head' \(modules_to_save\)"):
        model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="name at least one adapter"):
        model.set_adapter([])
    with pytest.raises(ValueError, match=r"lists \[.default.\] more than once"):
        model.set_adapter(["default", "default"])
    ada = get_peft_model(tiny_transformers_model("llama"), minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    ada.add_adapter("b", minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(ValueError, match=r"AdaLoRA adapters \['default', 'b'\] would each allocate ranks"):
        ada.set_adapter(["default", "b"])
    prompt = get_peft_model(tiny_transformers_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    prompt.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['default'\] add virtual tokens.*activate them alone"):
        prompt.set_adapter(["default", "lora"])
    assert model.active_adapters == ["default"] and prompt.active_adapters == ["default"]


def test_config_from_pretrained_and_save_pretrained_as_peft_s(tmp_path):
    # peft's pattern: read an adapter's config first (its base model's path), then load.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], base_model_name_or_path="/models/base")
    config.save_pretrained(tmp_path / "mine")
    theirs = peft.PeftConfig.from_pretrained(tmp_path / "mine")
    assert (type(theirs).__name__, theirs.r, theirs.base_model_name_or_path) == ("LoraConfig", 4, "/models/base")
    peft.LoraConfig(r=3, target_modules=["fc2"]).save_pretrained(tmp_path / "peft")
    read = minipeft.PeftConfig.from_pretrained(tmp_path, subfolder="peft")
    assert isinstance(read, LoraConfig) and (read.r, read.target_modules) == (3, ["fc2"])
    # As in peft: keywords fill only fields the file lacks (its values win), and the hub's
    # download options change nothing.
    for library in (peft, minipeft):
        kept = library.PeftConfig.from_pretrained(tmp_path / "peft", r=16, cache_dir="/nowhere", token="x")
        assert kept.r == 3
    # What a model saves reads back too.
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    model.save_pretrained(tmp_path / "model")
    assert minipeft.PeftConfig.from_pretrained(tmp_path / "model").target_modules == LORA["target_modules"]
    with pytest.raises(TypeError, match="holds a LoraConfig, not a IA3Config"):
        minipeft.IA3Config.from_pretrained(tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*it does not download"):
        minipeft.PeftConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "revision": "\xe9"}')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):  # not UTF-8
        minipeft.PeftConfig.from_pretrained(tmp_path / "latin1")


def test_a_task_type_that_would_leave_the_models_new_head_untrained_is_refused():
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    classifier = transformers.BertForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"task_type='CAUSAL_LM', but BertForSequenceClassification has a new "
                                         r"SEQ_CLS head \('classifier'\).*use task_type='SEQ_CLS'"):
        get_peft_model(classifier, LoraConfig(task_type="CAUSAL_LM", target_modules=["query"]))
    with pytest.raises(ValueError, match=r"new QUESTION_ANS head \('qa_outputs'\)"):
        get_peft_model(transformers.BertForQuestionAnswering(config),
                       LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    # the head listed by hand trains whatever the task type says; features: no check; no task type
    # (peft's default, where peft says nothing): a warning
    for kwargs in (dict(task_type="TOKEN_CLS", modules_to_save=["classifier"]), {}, dict(task_type="FEATURE_EXTRACTION")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = get_peft_model(transformers.BertForSequenceClassification(config),
                                   LoraConfig(target_modules=["query"], **kwargs))
        trains_head = any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
        assert trains_head == ("modules_to_save" in kwargs)
        said = [str(w.message) for w in caught if "has a new SEQ_CLS head" in str(w.message)]
        assert said == ([] if kwargs else ["BertForSequenceClassification has a new SEQ_CLS head ('classifier') and the "
                                           "config no task_type: the head neither trains nor is saved with the "
                                           "adapter, and stays random. Pass task_type='SEQ_CLS' (or list 'classifier' "
                                           "in modules_to_save)"])


def test_no_task_type_is_not_warned_of_where_the_config_cannot_train_the_head():
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trainable tokens have no modules_to_save: task_type would change nothing
        get_peft_model(transformers.BertForSequenceClassification(config),
                       minipeft.TrainableTokensConfig(target_modules=["word_embeddings"], token_indices=[1, 2]))


def test_a_head_name_of_another_architecture_in_modules_to_save_is_refused_naming_the_models_head():
    import transformers

    llama = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0))
    with pytest.raises(ValueError, match=r"modules_to_save entry 'classifier' matched no module of "
                                         r"LlamaForSequenceClassification \(this model's head is 'score'\)"):
        get_peft_model(llama, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    # SEQ_CLS lists both names, of which the model has one: fine
    model = get_peft_model(llama, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
    assert any(p.requires_grad for n, p in model.named_parameters() if ".score." in n)


def test_an_exclusion_that_matches_nothing_is_warned_of_with_the_nearest_names():
    with pytest.warns(UserWarning, match=r"exclude_modules names \['fc_2'\], which match no module and exclude "
                                         r"nothing .*nearest names, nearest first: \['fc2'"):
        get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1", "fc2"], exclude_modules=["fc_2", "fc1"]))


def test_mistakes_a_peft_user_makes_get_errors_that_say_what_to_do(tmp_path):
    # peft's config handed to minipeft: which config to use instead, and how to convert it.
    with pytest.raises(TypeError, match=r"got peft's LoraConfig.*PeftConfig.from_dict\(config.to_dict\(\)\)"):
        get_peft_model(TinyNet(), peft.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(TypeError, match="got peft's LoraConfig"):
        inject_adapter_in_model(peft.LoraConfig(target_modules=["fc1"]), TinyNet())
    converted = minipeft.PeftConfig.from_dict(peft.LoraConfig(r=3, target_modules={"fc1"}).to_dict())
    assert isinstance(converted, LoraConfig) and (converted.r, converted.target_modules) == (3, ["fc1"])
    # An adapter saved under its own name sits in a subfolder: the error names it.
    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    model.add_adapter("mine", LoraConfig(**LORA))
    model.save_pretrained(tmp_path / "saved", selected_adapters=["mine"])
    with pytest.raises(FileNotFoundError, match=r"holds adapters in subfolder\(s\) \['mine'\].*subfolder='mine'"):
        PeftModel.from_pretrained(TinyNet(), tmp_path / "saved")
    # Saved on a model with a task head, loaded into the plain one (or the reverse): the keys
    # differ by the head model's leading module, and the error says so.
    import transformers

    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48)
    classifier = get_peft_model(transformers.BertForSequenceClassification(cfg),
                                LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    classifier.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match=r"but for a leading 'bert\.' in the checkpoint's.*class it was saved from"):
        PeftModel.from_pretrained(transformers.BertModel(cfg), tmp_path / "classifier")
    plain = get_peft_model(transformers.BertModel(cfg), LoraConfig(target_modules=["query"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"but for a leading 'bert\.' in this model's"):
        PeftModel.from_pretrained(transformers.BertForSequenceClassification(cfg), tmp_path / "plain")


def test_deleting_a_peft_model_frees_its_model_at_once_and_copies_answer_to_themselves():
    # base_model reaches its PeftModel (peft's tuner-level calls) by a weak reference: no cycle
    # keeps the weights alive until the garbage collector runs, and a copy's base model
    # answers to the copy.
    import gc
    import pickle
    import weakref

    model = get_peft_model(TinyNet(), LoraConfig(**LORA))
    twin = copy.deepcopy(model)
    assert twin.base_model.active_adapters == ["default"] and twin.base_model.peft_config is twin.peft_config
    thawed = pickle.loads(pickle.dumps(model))
    assert thawed.base_model.peft_config is thawed.peft_config
    weight = weakref.ref(model.get_base_model().head.weight)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        if was_enabled:
            gc.enable()


def test_every_active_adapter_adds_its_training_terms():
    # AdaLoRA's orthogonal regulariser joins the loss whether its adapter comes first or second
    # among the active ones.
    from types import SimpleNamespace

    losses = []
    for order in (["ada", "lora"], ["lora", "ada"]):
        model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["v_proj"]),
                               adapter_name="lora")
        model.add_adapter("ada", minipeft.AdaLoraConfig(target_modules=["q_proj"], total_step=10))
        model.set_adapter(order)
        model.train()
        losses.append(model.with_training_terms(SimpleNamespace(loss=torch.tensor(0.0))).loss.item())
    assert losses[0] == losses[1] > 0.0


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


@pytest.mark.parametrize(
    "make_base, config, second",
    [
        (TinyNet, dict(target_modules=["fc1", "conv1d"], modules_to_save=["head"]), minipeft.LoHaConfig),
        (lambda: tiny_transformers_model("gpt2"), dict(target_modules=["c_attn"], trainable_token_indices=[1, 2]),
         functools.partial(minipeft.IA3Config, feedforward_modules=[])),
        (Attention, dict(target_modules=["attn", "head"]), minipeft.LoHaConfig),
    ],
    ids=["modules_to_save", "trainable_tokens", "attention"],
)
def test_targeted_module_names_are_peft_s(make_base, config, second):
    mini = get_peft_model(make_base(), LoraConfig(r=2, **config))
    reference = peft.get_peft_model(make_base(), peft.LoraConfig(r=2, **config))
    assert mini.targeted_module_names == reference.targeted_module_names
    assert mini.base_model.targeted_parameter_names == reference.base_model.targeted_parameter_names == []
    # a second method on the same modules, in a wrapper of its own, adds no name
    mini.add_adapter("second", second(target_modules=[t for t in config["target_modules"] if t != "attn"]))
    assert mini.targeted_module_names == reference.targeted_module_names


@pytest.mark.parametrize("kind, embedding", [("gpt2", "wte"), ("t5", "shared")])
def test_trainable_tokens_target_the_embedding_alone_not_the_modules_tied_to_it(kind, embedding):
    config = dict(target_modules=[embedding], token_indices=[1, 2])
    mini = get_peft_model(tiny_transformers_model(kind), minipeft.TrainableTokensConfig(**config))
    reference = peft.get_peft_model(tiny_transformers_model(kind), peft.TrainableTokensConfig(**config))
    assert mini.targeted_module_names == reference.targeted_module_names  # (the tied lm_head was listed)


def test_an_adapter_loaded_to_train_is_trainable_at_once_as_in_peft(tmp_path):
    base = TinyNet()
    get_peft_model(copy.deepcopy(base), LoraConfig(**LORA)).save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for model in (ours, theirs):
        model.load_adapter(tmp_path, adapter_name="new", is_trainable=True)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs) != []
    assert ours.active_adapters == ["default"]


def test_inject_adapter_in_model_takes_peft_s_arguments_and_targets_from_a_state_dict():
    assert positional(inject_adapter_in_model) == positional(peft.inject_adapter_in_model)
    assert positional(PeftModel.add_adapter) == positional(peft.PeftModel.add_adapter)
    # peft's state_dict: the modules a checkpoint holds adapters for, whatever the config targets
    saved = get_peft_model_state_dict(get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc2", "conv1d"])))
    saved = {key.removeprefix("base_model.model."): tensor for key, tensor in saved.items()}  # as peft reads it
    config = LoraConfig(r=2, target_modules=["fc2"])
    ours = inject_adapter_in_model(config, TinyNet(), "default", False, saved)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc2"]), TinyNet(), state_dict=saved)
    adapted = lambda m: sorted(n for n, _ in m.named_modules() if n.endswith(".lora_A"))  # noqa: E731
    assert adapted(ours) == adapted(theirs) == ["blocks.0.fc2.lora_A", "blocks.1.fc2.lora_A", "conv1d.lora_A"]
    assert config.target_modules == ["fc2"]  # the caller's config is left as it was
    with pytest.raises(ValueError, match=r"state_dict holds no tensor of a LoraConfig adapter"):
        inject_adapter_in_model(config, TinyNet(), state_dict={"head.weight": torch.zeros(1)})


@pytest.mark.parametrize("config", [
    dict(peft_type="PROMPT_TUNING"), dict(peft_type="P_TUNING", encoder_hidden_size=16),
    dict(peft_type="PREFIX_TUNING", prefix_projection=True, encoder_hidden_size=16)], ids=lambda c: c["peft_type"])
def test_the_prompt_embedding_to_save_is_peft_s(config):
    options = {k: v for k, v in config.items() if k != "peft_type"}
    name = {"PROMPT_TUNING": "PromptTuningConfig", "P_TUNING": "PromptEncoderConfig",
            "PREFIX_TUNING": "PrefixTuningConfig"}[config["peft_type"]]
    theirs = peft.get_peft_model(tiny_transformers_model("llama"),
                                 getattr(peft, name)(task_type="CAUSAL_LM", num_virtual_tokens=3, **options))
    ours = get_peft_model(tiny_transformers_model("llama"),
                          getattr(minipeft, name)(task_type="CAUSAL_LM", num_virtual_tokens=3, **options))
    minipeft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    expected = theirs.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(ours.get_prompt_embedding_to_save("default"), expected)
    with pytest.raises(TypeError, match="adds no virtual tokens"):
        get_peft_model(TinyNet(), LoraConfig(**LORA)).get_prompt_embedding_to_save("default")


def test_peft_s_model_attributes():
    base = tiny_transformers_model("bert")
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert ours.peft_type == theirs.peft_type == "LORA"
    assert ours.modules_to_save == theirs.modules_to_save == {"classifier", "score"}
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    plain = get_peft_model(TinyNet(), LoraConfig(**LORA))
    assert plain.modules_to_save is None and plain.base_model_torch_dtype is None  # (TinyNet has no dtype)
    plain.add_adapter("ia3", minipeft.IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    plain.set_adapter("ia3")
    assert plain.peft_type == "IA3"


def test_swapped_arguments_and_a_whole_model_folder_are_named(tmp_path):
    config = LoraConfig(target_modules=["fc1"])
    with pytest.raises(TypeError, match=r"get_peft_model\(model, peft_config\) takes the base model .* first; the "
                                        r"config came first"):
        get_peft_model(config, TinyNet())
    with pytest.raises(TypeError, match=r"PeftModel.from_pretrained\(model, model_id\) takes the base model .* first; "
                                        r"a name or path came instead: load the base model first"):
        PeftModel.from_pretrained(str(tmp_path), TinyNet())
    (tmp_path / "config.json").write_text("{}")  # a model saved whole (transformers' save_pretrained)
    with pytest.raises(FileNotFoundError, match=r"missing adapter_config.json; it holds a whole model \(config.json\), "
                                                r"not an adapter"):
        PeftModel.from_pretrained(TinyNet(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a folder .*it downloads nothing from the Hub"):
        PeftModel.from_pretrained(TinyNet(), "meta-llama/Llama-3.2-1B")
    merged = get_peft_model(TinyNet(), config)
    merged.merge_and_unload()
    with pytest.raises(ValueError, match=r"holds no adapter to save: the last one was deleted, or the adapters were "
                                         r"merged or unloaded"):
        merged.save_pretrained(tmp_path / "out")


def test_training_a_copy_of_a_tied_embedding_says_it_unties_it():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.body = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    with pytest.warns(UserWarning, match=r"modules_to_save trains a copy of 'embed', which shares its weight with "
                                         r"\['head'\]: the copy is untied from them, and they keep the frozen original"):
        get_peft_model(TiedLM(), LoraConfig(target_modules=["body"], modules_to_save=["embed"]))
    with warnings.catch_warnings():  # both trained whole: each has a copy of its own, nothing keeps the original
        warnings.simplefilter("error")
        get_peft_model(TiedLM(), LoraConfig(target_modules=["body"], modules_to_save=["embed", "head"]))


def test_loading_the_top_adapter_under_a_name_saved_in_a_subfolder_is_warned_of(tmp_path):
    model = get_peft_model(TinyNet(), LoraConfig(target_modules=["fc1"]))
    model.add_adapter("other", LoraConfig(target_modules=["fc2"]))
    model.save_pretrained(tmp_path)  # default at the top, other in other/
    with pytest.warns(UserWarning, match=r"also holds one saved as 'other' in its subfolder: for that one, pass "
                                         r"subfolder='other'"):
        PeftModel.from_pretrained(TinyNet(), tmp_path, adapter_name="other")

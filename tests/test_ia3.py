"""(IA)^3: the math on a hand-sized layer, merging, errors, and parity with peft 0.21
(same outputs for the same vectors, same state-dict keys and shapes both ways)."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minipeft  # noqa: E402
from minipeft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from minipeft.tuners.ia3 import IA3Linear  # noqa: E402
from tests.models import first_output, fit, randomize_adapters, tiny_transformers_model  # noqa: E402
from tests.models import input_ids as ids  # noqa: E402

# Per architecture: (targets, feed-forward targets), the paper's placement on these models.
SETUPS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def tiny(kind: str) -> nn.Module:
    """The shared tiny models; BERT without a head, so outputs are hidden states."""
    return tiny_transformers_model("bert_model" if kind == "bert" else kind)


def randomize_ia3(model: nn.Module, seed: int) -> None:
    randomize_adapters(model, seed, names=("ia3_l",), std=0.3, mean=1.0)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(6, 5)
        self.ff = nn.Linear(5, 4)

    def forward(self, x):
        return self.ff(torch.relu(self.attn(x)))


# -- the math -------------------------------------------------------------------------------------
def test_output_side_and_input_side_vectors_match_hand_computation():
    torch.manual_seed(0)
    base = TwoLinear()
    x = torch.randn(3, 6)
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"]))
    attn, ff = model.base_model.model.attn, model.base_model.model.ff
    assert attn.ia3_l["default"].shape == (5, 1) and ff.ia3_l["default"].shape == (1, 5)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # vectors start at one
    randomize_ia3(model, seed=3)
    l_out, l_in = attn.ia3_l["default"].flatten(), ff.ia3_l["default"].flatten()
    h = torch.relu(l_out * base.attn(x))  # keys/values: scale the output
    expected = base.ff(l_in * h)  # feed-forward: scale the input
    torch.testing.assert_close(model(x), expected)
    # Only the vectors train: closed form is out(attn) + in(ff) = 5 + 5.
    assert model.get_nb_trainable_parameters()[0] == 10


def test_parameter_count_closed_form_on_llama():
    targets, ff = SETUPS["llama"]
    model = get_peft_model(tiny("llama"), IA3Config(target_modules=targets, feedforward_modules=ff))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    per_layer = 2 * kv + cfg.intermediate_size  # k and v outputs, down_proj input
    assert model.get_nb_trainable_parameters()[0] == cfg.num_hidden_layers * per_layer


def test_two_adapters_switch_and_multiply_when_both_active():
    torch.manual_seed(0)
    base = TwoLinear()
    x = torch.randn(3, 6)
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["attn"], feedforward_modules=[]), adapter_name="a")
    model.add_adapter("b", IA3Config(target_modules=["attn"], feedforward_modules=[], init_ia3_weights=False))
    layer = model.base_model.model.attn
    randomize_ia3(model, seed=5)
    la, lb = layer.ia3_l["a"].flatten(), layer.ia3_l["b"].flatten()
    torch.testing.assert_close(model(x), base.ff(torch.relu(la * base.attn(x))))
    model.set_adapter("b")
    torch.testing.assert_close(model(x), base.ff(torch.relu(lb * base.attn(x))))
    assert layer.ia3_l["b"].requires_grad and not layer.ia3_l["a"].requires_grad
    layer.set_adapter(["a", "b"])  # several active vectors multiply, as in peft
    torch.testing.assert_close(model(x), base.ff(torch.relu(la * lb * base.attn(x))))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base(x))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    base = TwoLinear()
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"]))
    x = torch.randn(64, 6)
    with torch.no_grad():  # a target that rescaling can reach: the attn output scaled by random gains
        y = base.ff(torch.relu((1 + torch.randn(5)) * base.attn(x)))
    losses = fit(model, x, y, lr=0.05, steps=30)
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


# -- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload(kind):
    targets, ff = SETUPS[kind]
    base = tiny(kind)
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=ff))
    randomize_ia3(model, seed=7)
    x = ids()
    adapted = first_output(model(x))
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert all(layer.merged for layer in model.modules() if isinstance(layer, IA3Linear))
    torch.testing.assert_close(first_output(model(x)), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(first_output(model(x)), adapted, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    torch.testing.assert_close(first_output(merged(x)), adapted, atol=1e-5, rtol=1e-5)


def test_a_float64_model_merges_and_unmerges_in_float64():
    model = get_peft_model(TwoLinear(), IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"])).double()
    randomize_ia3(model, seed=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    adapted = model(x)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    torch.testing.assert_close(model(x), adapted, atol=1e-13, rtol=1e-13)  # fp32 on the way: about 1e-7
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-14, rtol=1e-14)


def test_unmerge_refuses_a_vector_with_zeros():
    layer = get_peft_model(TwoLinear(), IA3Config(target_modules=["attn"], feedforward_modules=[])).base_model.model.attn
    with torch.no_grad():
        layer.ia3_l["default"][0] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="zero entries"):
        layer.unmerge()


# -- parity with peft -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_same_outputs_and_state_dict_as_peft(kind):
    peft = pytest.importorskip("peft")
    targets, ff = SETUPS[kind]
    base = tiny(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about fan_in_fan_out on GPT-2
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    ours = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=ff))
    x = ids()

    # Same keys, same shapes, same trainable set.
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }

    # peft's vectors into minipeft ...
    randomize_ia3(theirs, seed=11)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(first_output(ours(x)), first_output(theirs(x)), atol=1e-6, rtol=0)
    # ... and minipeft's into peft.
    randomize_ia3(ours, seed=12)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(first_output(theirs(x)), first_output(ours(x)), atol=1e-6, rtol=0)

    # Merged weights agree too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    for (n1, p1), (n2, p2) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)


def test_add_weighted_adapter_combines_vectors_as_peft():
    # Two adapters on overlapping modules: the new vectors are sum_i w_i l_i over the adapters
    # present in each layer (peft's rule), and the combined adapter computes what peft's does.
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    configs = [dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])]
    models = {}
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.IA3Config(**configs[0]))
        model.add_adapter("b", library.IA3Config(**configs[1]))
        models[library.__name__] = model
    randomize_ia3(models["peft"], seed=3)
    models["minipeft"].load_state_dict(models["peft"].state_dict(), strict=True)
    for model in models.values():
        model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix")
        model.set_adapter("mix")
    ours, theirs = models["minipeft"], models["peft"]
    assert ours.peft_config["mix"].target_modules == sorted(theirs.peft_config["mix"].target_modules)
    assert {k: v for k, v in ours.state_dict().items() if ".mix" in k}.keys() == \
        {k for k in theirs.state_dict() if ".mix" in k}
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-7, rtol=0, msg=key)
    torch.testing.assert_close(first_output(ours(ids())), first_output(theirs(ids())), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\(IA\)\^3 adapters combine linearly, .* combination_type='ties'"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "ties", combination_type="ties")


def test_add_weighted_adapter_takes_the_trained_head_of_its_one_source():
    # As with LoRA: the combination trains the copy of the one source that trains the head, and
    # two sources with a copy each are refused (peft refuses that too).
    base = TwoLinear()
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["attn"], feedforward_modules=[],
                                                          modules_to_save=["ff"]))
    model.add_adapter("b", IA3Config(target_modules=["attn"], feedforward_modules=[], modules_to_save=["ff"]))
    heads = model.get_base_model().ff.modules_to_save
    with torch.no_grad():
        heads["default"].weight.add_(1.0)  # "trained"
    model.add_weighted_adapter(["default"], [1.0], "one")
    assert torch.equal(heads["one"].weight, heads["default"].weight)
    with pytest.raises(ValueError, match="each train their own copy of 'ff'"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "two")
    assert "two" not in model.peft_config


@pytest.mark.parametrize("weights, message", [([float("nan"), 1.0], r"finite numbers .*got \[nan\]"),
                                              ([True, 1.0], r"finite numbers .*got \[True\]"),
                                              ([1.0], "one weight per adapter")])
def test_add_weighted_adapter_checks_the_weights_as_for_lora(weights, message):
    model = get_peft_model(TwoLinear(), IA3Config(target_modules=["attn"], feedforward_modules=[]))
    model.add_adapter("b", IA3Config(target_modules=["attn"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["default", "b"], weights, "c")
    assert "c" not in model.peft_config


def test_add_weighted_adapter_refuses_vectors_of_different_sides_on_a_convolution():
    # Equal in and out channels give both sides one shape; the side itself must agree.
    conv = nn.Sequential(nn.Conv2d(4, 4, 1))
    model = get_peft_model(conv, IA3Config(target_modules=["0"], feedforward_modules=[]))
    model.add_adapter("input", IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    with pytest.raises(ValueError, match=r"scale the other side of '0'"):
        model.add_weighted_adapter(["default", "input"], [1.0, 1.0], "mix", )


# -- errors ---------------------------------------------------------------------------------------
def test_feedforward_modules_must_be_given_with_targets():
    # peft fills a None per architecture (LLaMA down_proj: input side); minipeft asks instead.
    with pytest.raises(ValueError, match=r"needs feedforward_modules.*pass \[\].*\['down_proj'\] \(LLaMA\)"):
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"])
    # Neither given: both come from the architecture's table when the adapter is added, as in
    # peft (tests/test_architecture_targets.py).
    assert IA3Config().feedforward_modules is None


def test_init_draws_from_the_rng_like_peft():
    peft = pytest.importorskip("peft")
    targets, ff = SETUPS["llama"]
    base = tiny("llama")
    torch.manual_seed(4)
    get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=ff))
    ours_next = torch.randn(3)
    torch.manual_seed(4)
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    torch.testing.assert_close(ours_next, torch.randn(3), rtol=0, atol=0)


def test_feedforward_modules_must_be_a_subset_of_targets():
    with pytest.raises(ValueError, match=r"subset of target_modules: \['fc2'\]"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["fc2"])


def test_unsupported_layer_type_is_named():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(ValueError, match=r"'emb': it is a Embedding; \(IA\)\^3 supports nn.Linear"):
        get_peft_model(WithEmbedding(), IA3Config(target_modules=["emb"], feedforward_modules=[]))


def test_bad_init_value_and_nothing_left_behind_on_error():
    with pytest.raises(ValueError, match="init_ia3_weights must be True or False"):
        IA3Config(target_modules=["attn"], feedforward_modules=[], init_ia3_weights="ones")
    model = TwoLinear()
    with pytest.raises(ValueError, match="matched no module"):
        get_peft_model(model, IA3Config(target_modules=["atn"], feedforward_modules=[]))
    assert isinstance(model.attn, nn.Linear)


def test_ia3_beside_lora_on_other_modules():
    torch.manual_seed(0)
    base = TwoLinear()
    x = torch.randn(3, 6)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(target_modules=["ff"], r=2, lora_alpha=4), adapter_name="lora"
    )
    model.add_adapter("ia3", IA3Config(target_modules=["attn"], feedforward_modules=[]))
    randomize_ia3(model, seed=2)
    randomize_adapters(model, seed=3, names=("lora_B",))  # B = 0 would hide a LoRA that never runs
    l = model.base_model.model.attn.ia3_l["ia3"].flatten()
    lora = model.base_model.model.ff
    A, B = lora.lora_A["lora"].weight, lora.lora_B["lora"].weight
    # "lora" active, "ia3" not: y = ff(h) + (alpha / r) B A h on the untouched attn output h.
    h = torch.relu(base.attn(x))
    expected = base.ff(h) + 2.0 * h @ A.T @ B.T
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), base(x))
    model.set_adapter("ia3")
    torch.testing.assert_close(model(x), base.ff(torch.relu(l * base.attn(x))))


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_checkpoints_load_both_ways_with_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    from minipeft import PeftModel
    from safetensors.torch import load_file

    targets, ff = SETUPS[kind]
    base = tiny(kind)
    x = ids()
    task = "FEATURE_EXTRACTION" if kind == "bert" else "CAUSAL_LM"
    config = IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task)
    ours = get_peft_model(copy.deepcopy(base), config)
    randomize_ia3(ours, seed=21)
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(first_output(theirs(x)), first_output(ours(x)), atol=1e-6, rtol=0)

    # peft's file, written from the same vectors, has the same keys and values as ours.
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "theirs" / "adapter_model.safetensors"
    )
    assert ours_file.keys() == theirs_file.keys()
    assert all(k.endswith(".ia3_l") for k in ours_file)
    for k in ours_file:
        torch.testing.assert_close(ours_file[k], theirs_file[k], atol=0, rtol=0)

    # And peft's checkpoint loads into minipeft.
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(first_output(reloaded(x)), first_output(ours(x)), atol=1e-6, rtol=0)


class Convs(nn.Module):
    """Convolutions (IA)^3 adapts as peft does: 2-D, grouped 2-D, 3-D."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.volume = nn.Conv3d(6, 4, 1)

    def forward(self, x):
        h = self.grouped(torch.relu(self.conv(x)))
        return self.volume(torch.relu(h).unsqueeze(2))


@pytest.mark.parametrize("feedforward", [[], ["grouped"], ["grouped", "volume"]])
def test_convolutions_match_peft(feedforward):
    # The vectors scale channels, (1, C, 1, ...) as peft stores them; outputs, files and merged
    # kernels (grouped input channels included) as peft's.
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, x = Convs().eval(), torch.randn(2, 3, 5, 5)
    config = dict(target_modules=["conv", "grouped", "volume"], feedforward_modules=feedforward)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config))
    ours = get_peft_model(copy.deepcopy(base), IA3Config(**config))
    randomize_ia3(theirs, seed=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
        torch.testing.assert_close(merged_ours(x), merged_theirs(x), atol=1e-5, rtol=0)
        for (name, p), (_, q) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)

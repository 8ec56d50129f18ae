"""PiSSA, OLoRA and orthogonal initialisations, and PiSSA/OLoRA's conversion to plain LoRA on save.

References: peft itself (the same base model and init option give the same A, B and residual
weight; for ``pissa_niter_<n>`` torch is seeded identically before both), the identity
``W_res + s B0 A0 = W`` (the output is unchanged at init), and, for the conversion, the trained
model's outputs reproduced by a fresh ORIGINAL base loading the converted checkpoint (with peft
and with minipeft), and the tensors peft's own ``save_pretrained`` writes for the same weights.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import minipeft
from minipeft import LoraConfig, PeftModel, get_peft_model
from tests.models import TinyNet, input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


@pytest.fixture(scope="module")
def bases():
    return {kind: tiny_transformers_model(kind) for kind in TARGETS}


def config(kind: str, init, **extra) -> dict:
    common = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS[kind])
    return {**common, **extra}


def build(library, base, seed: int = 3, **kwargs):
    """A PeftModel of ``library`` (peft or minipeft) on a copy of ``base``, torch seeded first."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's Conv1D fan_in_fan_out notice
        return library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**kwargs))


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, minipeft.tuners.lora.LoraLinear)]


def train(model, steps: int = 3, lr: float = 1e-2):
    """A few Adam steps of the LM loss, so that A and B move away from A0 and B0."""
    ids = input_ids(batch=4, length=8, seed=5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- the initialisations against peft and against the identity ---------------------------------------
PARITY = [
    ("llama", "pissa", {}),
    ("llama", "pissa_niter_2", {}),
    ("llama", "olora", {}),
    ("llama", "OLoRA", {}),  # peft accepts OLoRA in any case
    ("llama", "pissa", dict(use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("llama", "olora", dict(use_dora=True)),
    ("gpt2", "pissa", {}),  # Conv1D: decomposed transposed, as peft does
    ("gpt2", "pissa_niter_1", dict(use_dora=True)),
]


@pytest.mark.parametrize("kind, init, extra", PARITY)
def test_init_is_peft_s_to_the_bit(bases, kind, init, extra):
    """Same A0, B0, residual base weights (and DoRA magnitudes) as peft, with the output unchanged."""
    theirs = build(peft, bases[kind], **config(kind, init, **extra))
    ours = build(minipeft, bases[kind], **config(kind, init, **extra))
    mine, their_state = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == their_state.keys()
    for key, value in their_state.items():
        assert torch.equal(mine[key], value), key
    base_weights = dict(bases[kind].named_parameters())
    changed = [k for k, v in mine.items() if k.endswith("base_layer.weight")]
    assert changed and all(not torch.equal(mine[k], base_weights[k.replace("base_model.model.", "").replace(
        ".base_layer", "")]) for k in changed)  # every target holds a residual now
    torch.testing.assert_close(logits(ours), logits(bases[kind]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind, extra", [("llama", {}), ("llama", dict(rank_pattern={"down_proj": 2}, use_dora=True)),
                                          ("gpt2", {})])
def test_orthogonal_init_is_peft_s_to_the_bit_and_changes_nothing_at_first(bases, kind, extra):
    # Both factors random and non-zero, their product exactly zero: the base weights stay, and
    # so does the output.
    theirs = build(peft, bases[kind], **config(kind, "orthogonal", **extra))
    ours = build(minipeft, bases[kind], **config(kind, "orthogonal", **extra))
    mine, their_state = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == their_state.keys()
    for key, value in their_state.items():
        assert torch.equal(mine[key], value), key
    for _, layer in lora_layers(ours):
        A, B = layer.lora_factors("default")
        assert A.abs().min() > 0 and B.abs().min() > 0
        assert (B @ A).abs().max() < 1e-6
    torch.testing.assert_close(logits(ours), logits(bases[kind]), atol=1e-6, rtol=0)


def test_orthogonal_init_needs_an_even_rank_where_it_is_used_and_linear_layers():
    with pytest.raises(ValueError, match=r"'orthogonal' .* needs an even rank; 'blocks.0.fc1' gets r=5 \(from r or rank_pattern\)"):
        get_peft_model(TinyNet(), LoraConfig(r=4, rank_pattern={"fc1": 5}, target_modules=["fc1"],
                                             init_lora_weights="orthogonal"))
    # as in peft, only the ranks of the layers adapted count: r=3 is never used here
    get_peft_model(TinyNet(), LoraConfig(r=3, rank_pattern={"fc1": 2}, target_modules=["fc1"],
                                         init_lora_weights="orthogonal"))
    with pytest.raises(TypeError, match=r"'orthogonal' is for linear layers .*'embed' is a Embedding"):
        get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["embed"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_residual_plus_update_is_the_original_weight(bases, init):
    """W_res + s B0 A0 = W in every layer; PiSSA's s B0 A0 is the top-r SVD part of W."""
    base = bases["llama"]
    model = build(minipeft, base, **config("llama", init, lora_alpha=6))
    original = dict(base.named_modules())
    for name, layer in lora_layers(model):
        W = original[name.removeprefix("base_model.model.")].weight
        torch.testing.assert_close(layer.get_base_layer().weight + layer.delta_weight("default"), W, atol=1e-6, rtol=0)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W)
            top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            torch.testing.assert_close(layer.delta_weight("default"), top, atol=1e-5, rtol=0)


def test_pissa_niter_is_random_and_seeded(bases):
    kwargs = config("llama", "pissa_niter_1")
    a, b, c = (build(minipeft, bases["llama"], seed=s, **kwargs).state_dict() for s in (1, 1, 2))
    key = next(k for k in a if "lora_A" in k)
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_bf16_base_keeps_fp32_factors_and_peft_s_residual(bases):
    """The decomposition runs in fp32; the residual is cast back to bf16 (peft's, to the bit) and the
    factors stay fp32, where peft rounds them to bf16 first: ours are peft's before that rounding."""
    base = copy.deepcopy(bases["llama"]).to(torch.bfloat16)
    theirs = build(peft, base, **config("llama", "pissa"))
    ours = build(minipeft, base, **config("llama", "pissa"))
    their_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        if "lora_" in key:
            assert value.dtype == torch.float32
            assert torch.equal(value.to(torch.bfloat16), their_state[key].to(torch.bfloat16)), key
        else:
            assert value.dtype == their_state[key].dtype and torch.equal(value, their_state[key]), key
    torch.testing.assert_close(logits(ours).float(), logits(base).float(), atol=0.05, rtol=0)


# -- merging, unloading, loading ---------------------------------------------------------------------
def test_merge_gives_the_fine_tuned_weight_and_unload_the_residual_as_peft(bases):
    base = bases["llama"]
    model = train(build(minipeft, base, **config("llama", "pissa")))
    trained = logits(model)
    residuals = {n: layer.get_base_layer().weight.clone() for n, layer in lora_layers(model)}
    model.merge_adapter()
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.get_base_layer().weight, residuals[name], atol=1e-6, rtol=0)

    theirs = build(peft, base, **config("llama", "pissa"))
    theirs.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(copy.deepcopy(model).merge_and_unload()), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(copy.deepcopy(theirs).merge_and_unload()), trained, atol=1e-5, rtol=0)
    # unload() keeps the residual base weights, in both libraries: not the original model.
    ours_unloaded, theirs_unloaded = model.unload().state_dict(), theirs.unload().state_dict()
    for key, value in theirs_unloaded.items():
        assert torch.equal(ours_unloaded[key], value), key
    assert not torch.allclose(ours_unloaded["model.layers.0.self_attn.q_proj.weight"],
                              base.state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_adapter_loads_onto_the_original_base_by_decomposing_again(bases, tmp_path, init):
    """A PiSSA/OLoRA adapter saved as it is decomposes W again on load (the saved config asks for it):
    the original base then computes the trained model, in minipeft and in peft."""
    base = bases["llama"]
    model = train(build(minipeft, base, **config("llama", init)))
    model.save_pretrained(tmp_path / "trained")
    for library in (minipeft, peft):
        loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained")
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


# -- conversion on save ------------------------------------------------------------------------------
def save_initial(model, folder, peft_workflow: bool) -> None:
    """Save the adapter as it is right after initialisation. peft's documented workflow sets
    init_lora_weights=True on the config for that save and back afterwards; both forms work."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    if peft_workflow:
        config.init_lora_weights = True
    model.save_pretrained(folder)
    config.init_lora_weights = init


def saved(folder) -> tuple[dict, dict]:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f), load_file(os.path.join(folder, "adapter_model.safetensors"))


CONVERSIONS = [
    ("llama", "pissa", {}),
    ("llama", "pissa_niter_2", {}),
    ("llama", "olora", {}),
    ("llama", "pissa", dict(use_rslora=True)),
    ("llama", "olora", dict(rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("gpt2", "pissa", {}),
]


@pytest.mark.parametrize("kind, init, extra", CONVERSIONS)
def test_converted_adapter_is_the_trained_model_on_the_original_base_and_what_peft_writes(
    bases, tmp_path, kind, init, extra
):
    base, kwargs = bases[kind], config(kind, init, **extra)
    ours = build(minipeft, base, **kwargs)
    theirs = build(peft, base, **kwargs)
    save_initial(ours, tmp_path / "ours_init", peft_workflow=False)
    save_initial(theirs, tmp_path / "theirs_init", peft_workflow=True)
    assert saved(tmp_path / "ours_init")[1].keys() == saved(tmp_path / "theirs_init")[1].keys()

    train(ours)
    theirs.load_state_dict(ours.state_dict())  # the same trained weights (and residuals) in peft
    ours.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft loads the initial adapter beside the PiSSA one, and warns of it
        theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))

    # The files: peft's tensors, and peft's config for what minipeft reads.
    (our_config, our_tensors), (their_config, their_tensors) = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert our_tensors.keys() == their_tensors.keys()
    for key, value in their_tensors.items():
        assert torch.equal(our_tensors[key], value), key
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert our_config[field] == their_config[field], field
    assert our_config["init_lora_weights"] is True and our_config["r"] == 2 * kwargs["r"]

    # The converted adapter on a fresh ORIGINAL base computes the trained model, in both libraries.
    trained = logits(ours)
    assert (trained - logits(base)).abs().max() > 1e-2  # training moved the model
    for library in (minipeft, peft):
        loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        torch.testing.assert_close(logits(loaded), trained, atol=1e-5, rtol=0)
        assert torch.equal(
            loaded.get_base_model().state_dict()["lm_head.weight"], base.state_dict()["lm_head.weight"]
        )
    # And minipeft loads peft's converted checkpoint.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded), trained, atol=1e-5, rtol=0)
    assert ours.peft_config["default"].init_lora_weights == init  # the model's own config is unchanged


def test_rslora_with_patterns_converts_with_the_same_scaling(bases, tmp_path):
    """peft refuses rsLoRA with rank_pattern/alpha_pattern here (it would double alpha_pattern);
    minipeft multiplies every alpha by sqrt(2), and peft loads the result to the trained outputs."""
    base = bases["llama"]
    kwargs = config("llama", "pissa", use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    model = build(minipeft, base, **kwargs)
    save_initial(model, tmp_path / "init", peft_workflow=True)
    train(model)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    saved_config = saved(tmp_path / "out")[0]
    assert saved_config["rank_pattern"] == {"down_proj": 4}
    assert saved_config["alpha_pattern"] == {"v_proj": pytest.approx(3 * 2**0.5)}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    for name, layer in lora_layers(model):
        theirs = loaded.get_submodule(name)
        assert theirs.scaling["default"] == pytest.approx(layer.scaling["default"], rel=1e-12)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_dora_conversion_keeps_the_magnitude_peft_drops(bases, tmp_path):
    """W + s B'A' = W_res + s B A row for row, so DoRA's magnitude holds on the original base too;
    peft 0.21 keeps only lora_A/lora_B, minipeft the magnitude as well, and peft loads that file."""
    base = bases["llama"]
    model = build(minipeft, base, **config("llama", "pissa", use_dora=True))
    save_initial(model, tmp_path / "init", peft_workflow=True)
    train(model)
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    tensors = saved(tmp_path / "out")[1]
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    for library in (minipeft, peft):
        loaded = library.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
        torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_converted_save_is_atomic_and_leaves_the_initial_folder_alone(bases, tmp_path):
    base = bases["llama"]
    model = build(minipeft, base, **config("llama", "olora"))
    model.save_pretrained(tmp_path / "init")
    before = {name: (tmp_path / "init" / name).read_bytes() for name in os.listdir(tmp_path / "init")}
    model.save_pretrained(tmp_path / "out")  # an earlier checkpoint in the target folder
    earlier = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    other = build(minipeft, base, **config("llama", "olora", r=2))
    other.save_pretrained(tmp_path / "other_init")
    with pytest.raises(ValueError, match="another rank"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other_init")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == earlier
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert {name: (tmp_path / "init" / name).read_bytes() for name in os.listdir(tmp_path / "init")} == before


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["PiSSA", "pissa_niter_", "pissa_niter_-1", "pissa_niter_x", "EVA", "corda"])
def test_unknown_init_strings_are_refused_with_the_choices(init):
    with pytest.raises(ValueError, match=r"init_lora_weights must be .*'pissa_niter_<n>'.*'olora', 'loftq' or 'eva'"):
        LoraConfig(target_modules=["fc1"], init_lora_weights=init)


def test_unsupported_layers_are_refused_before_any_weight_changes():
    base = TinyNet()
    original = copy.deepcopy(base.state_dict())
    # fc1 comes first in the model and could be decomposed; the head (16 -> 3) cannot hold r=4.
    with pytest.raises(ValueError, match=r"'head'.*\(3 x 16\).*at most 3; r=4"):
        get_peft_model(base, LoraConfig(r=4, target_modules=["fc1", "head"], init_lora_weights="pissa"))
    with pytest.raises(TypeError, match=r"'embed' is a Embedding.*init_lora_weights=True"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["fc1", "embed"], init_lora_weights="olora"))
    with pytest.raises(TypeError, match=r"'conv2d' is a Conv2d"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["blocks.0.fc1", "conv2d"], init_lora_weights="pissa"))
    state = base.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())


def test_direct_injection_is_all_or_nothing_too():
    """inject_adapter_in_model, without a PeftModel, checks every target and the modules_to_save
    overlap before it decomposes the first weight (a rollback could not undo that)."""
    base = TinyNet()
    original = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match=r"'head'.*at most 3; r=4"):
        minipeft.inject_adapter_in_model(LoraConfig(r=4, target_modules=["fc1", "head"], init_lora_weights="pissa"), base)
    # modules_to_save matches by plain suffix, as peft's does: "c1" selects the target fc1 too,
    # which is then trained whole and never decomposed.
    with pytest.raises(ValueError, match=r"after applying modules_to_save=\['c1'\], which removed"):
        minipeft.inject_adapter_in_model(
            LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["c1"], init_lora_weights="pissa"), base)
    state = base.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())


def test_olora_on_gpt2_conv1d_is_refused(bases):
    with pytest.raises(ValueError, match=r"'olora'.*GPT-2 Conv1D.*wrong shapes.*'pissa'"):
        build(minipeft, bases["gpt2"], **config("gpt2", "olora"))


def test_a_second_adapter_beside_a_pissa_one_warns_as_in_peft(bases):
    model = build(minipeft, bases["llama"], **config("llama", "pissa"))
    with pytest.warns(UserWarning, match=r"\['default'\] \(PiSSA/OLoRA/LoftQ\).*residuals"):
        model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))


def test_combining_a_pissa_adapter_does_not_decompose_the_base_again(bases):
    model = train(build(minipeft, bases["llama"], **config("llama", "pissa")))
    weights = {n: layer.get_base_layer().weight.clone() for n, layer in lora_layers(model)}
    trained = logits(model)
    model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    assert model.peft_config["combined"].init_lora_weights is True
    assert all(torch.equal(layer.get_base_layer().weight, weights[n]) for n, layer in lora_layers(model))
    model.set_adapter("combined")
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=0)


@pytest.fixture
def pissa_model(bases, tmp_path):
    model = build(minipeft, bases["llama"], **config("llama", "pissa"))
    save_initial(model, tmp_path / "init", peft_workflow=True)
    return model


def test_conversion_needs_the_initial_folder(pissa_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path_initial_model_for_weight_conversion.*right after"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "nope")
    with pytest.raises(TypeError, match="a path; got int"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=3)
    with pytest.raises(ValueError, match="over the initial adapter"):
        pissa_model.save_pretrained(tmp_path / "init", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_an_initial_folder_of_another_adapter(bases, pissa_model, tmp_path):
    plain = build(minipeft, bases["llama"], **config("llama", True))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="every lora_B there is zero, which is plain LoRA's initialisation"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "plain")
    olora = build(minipeft, bases["llama"], **config("llama", "olora"))
    olora.save_pretrained(tmp_path / "olora")
    with pytest.raises(ValueError, match=r"initialised with init_lora_weights='olora'.*with 'pissa'"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "olora")
    fewer = build(minipeft, bases["llama"], **{**config("llama", "pissa"), "target_modules": ["q_proj"]})
    fewer.save_pretrained(tmp_path / "fewer")
    with pytest.raises(ValueError, match="other LoRA layers than this adapter"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "fewer")
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_adapters_that_changed_no_base_weight(bases, pissa_model, tmp_path):
    plain = build(minipeft, bases["llama"], **config("llama", True))
    with pytest.raises(ValueError, match=r"init_lora_weights=True.*needs no conversion.*set it back"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    with pytest.warns(UserWarning, match="residuals"):
        pissa_model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"one adapter.*selected_adapters=\[name\]"):
        pissa_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    pissa_model.save_pretrained(
        tmp_path / "out", selected_adapters=["default"], path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    assert saved(tmp_path / "out")[0]["r"] == 8

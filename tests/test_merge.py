"""merge_adapter / merge_and_unload with ``safe_merge`` and several ``adapter_names``.

References: the hand-written sum ``W + sum_i s_i B_i A_i``, the unmerged forward, and peft
itself on the same weights. A broken adapter (a NaN in one layer) must leave the whole model
as it was: no layer merged, the PeftModel intact.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch

import minipeft
from minipeft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from minipeft.tuners.base import AdapterLayer
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

TARGETS = ["fc1", "fc2", "embed", "conv2d"]


def two_adapters(base):
    """TinyNet with LoRA "default" (active) and "b" on ``TARGETS``, random weights."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=TARGETS))
    randomize_adapters(model)
    return model


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def break_last_layer(model, adapter):
    """A NaN in ``adapter``'s B of the last LoRA layer: the layers before it are healthy."""
    name, layer = [(n, m) for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_B")][-1]
    B = layer.lora_B[adapter].weight if adapter in layer.lora_B else layer.lora_embedding_B[adapter]
    with torch.no_grad():
        B[0, 0] = float("nan")
    return name


@pytest.mark.parametrize("use_dora", [False, True])
def test_safe_merge_refuses_nan_and_merges_nothing(use_dora):
    targets = ["fc1", "fc2", "head"] if use_dora else TARGETS
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    broken = break_last_layer(model, "default")
    before = base_weights(model)
    n_layers = sum(isinstance(m, AdapterLayer) for m in model.modules())

    with pytest.raises(ValueError, match=rf"adapter 'default' into '{broken}'.*NaN or inf"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match=rf"adapter 'default' into '{broken}'"):
        model.merge_and_unload(safe_merge=True)
    # Nothing was written, nothing is marked merged, and the wrappers are all still there.
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == n_layers and not any(m.merged for m in layers)

    # Without safe_merge the NaN goes in, as in peft: the check is what safe_merge buys.
    model.merge_adapter()
    assert not torch.isfinite(model.get_base_model().get_submodule(broken).get_base_layer().weight).all()


def test_safe_merge_of_healthy_adapters_equals_the_plain_merge():
    base = TinyNet().eval()
    expected = two_adapters(base)
    safe = copy.deepcopy(expected)
    expected.merge_adapter(["default", "b"])
    safe.merge_adapter(["default", "b"], safe_merge=True)
    for (name, p), q in zip(expected.named_parameters(), safe.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_layer_merge_safe_merge_names_the_adapter():
    model = get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1"]))
    layer = model.base_model.model.blocks[0]["fc1"]
    before = layer.get_base_layer().weight.clone()
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(float("inf"))
        layer.lora_B["default"].weight.fill_(1.0)
    with pytest.raises(ValueError, match="adapter 'default' into this LoraLinear"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def test_ia3_safe_merge_checks_weight_and_bias():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = get_peft_model(net, IA3Config(target_modules=["0", "1"], feedforward_modules=[]))
    with torch.no_grad():
        model.base_model.model[1].ia3_l["default"][2] = float("nan")
    before = base_weights(model)
    with pytest.raises(ValueError, match="adapter 'default' into '1'"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_merge_and_unload_of_two_adapters_is_base_plus_both_deltas():
    base = TinyNet().eval()
    model = two_adapters(base)
    expected = {}
    for name, layer in model.get_base_model().named_modules():
        if hasattr(layer, "delta_weight"):
            W = layer.get_base_layer().weight
            expected[f"{name}.weight"] = W + layer.delta_weight("default") + layer.delta_weight("b")
    merged = model.merge_and_unload(safe_merge=True, adapter_names=["default", "b"])
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules()) and type(merged) is TinyNet
    params = dict(merged.named_parameters())
    for name, W in expected.items():
        torch.testing.assert_close(params[name], W, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("dora_first, dora_second", [(False, False), (False, True), (True, True)])
def test_merging_two_adapters_matches_peft(dora_first, dora_second):
    # With DoRA second, its row norm must come from the base weight as the forward reads it,
    # not from the weight that already holds the first adapter (off by up to 0.15 here when it did).
    base = tiny_transformers_model("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    models = {}
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**config, use_dora=dora_first))
        model.add_adapter("b", library.LoraConfig(**{**config, "r": 2, "use_rslora": True, "use_dora": dora_second}))
        models[library.__name__] = model
    randomize_adapters(models["peft"])
    models["minipeft"].load_state_dict(models["peft"].state_dict(), strict=True)
    ids = input_ids()

    for model in models.values():
        model.merge_adapter(adapter_names=["default", "b"], safe_merge=True)
    torch.testing.assert_close(models["minipeft"](input_ids=ids).logits, models["peft"](input_ids=ids).logits,
                               atol=1e-5, rtol=0)
    for model in models.values():
        model.unmerge_adapter()
    merged = {k: m.merge_and_unload(adapter_names=["default", "b"]) for k, m in models.items()}
    assert merged["minipeft"].state_dict().keys() == merged["peft"].state_dict().keys()
    for name, p in merged["peft"].state_dict().items():
        torch.testing.assert_close(merged["minipeft"].state_dict()[name], p, atol=1e-6, rtol=0, msg=name)


def test_merge_and_unload_keeps_the_head_of_the_adapter_it_merges():
    base = TinyNet().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    randomize_adapters(model)
    model.set_adapter("b")
    expected = model(input_ids=input_ids())
    model.set_adapter("default")
    # "b" is merged although "default" is active: its LoRA and its head, not default's head.
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(merged(input_ids=input_ids()), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="each train their own copy of 'head'"):
        model.merge_and_unload(adapter_names=["default", "b"])


def test_merge_argument_errors():
    model = get_peft_model(tiny_transformers_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="list of names"):
        model.merge_adapter("default")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.merge_and_unload(adapter_names=["nope"])
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="virtual tokens"):
        model.merge_adapter(["prompt"])


def test_an_adapter_named_twice_is_refused_not_merged_twice():
    """``W + s B A`` once per adapter: a repeated name would fold the same update in twice."""
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, target_modules=["fc1"]))
    randomize_adapters(model)
    before = base_weights(model)
    for merge in (model.merge_adapter, lambda names: model.merge_and_unload(adapter_names=names)):
        with pytest.raises(ValueError, match=r"adapter_names lists \['default'\] more than once"):
            merge(["default", "default"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    layer = model.base_model.model.blocks[0]["fc1"]
    with pytest.raises(ValueError, match=r"adapter_names lists \['default'\] more than once"):
        layer.merge(["default", "default"])
    assert not layer.merged


class _Scale(AdapterLayer):
    """A toy method, y = c * (W x + b), that implements only the merge hook (and unmerge)."""

    other_param_names = ("c",)
    mergeable = True

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.c = {}

    def forward(self, x):
        out = self.base_layer(x)
        for name in self.adapters_to_apply():
            out = out * self.c[name]
        return out

    def merged_tensors(self, adapter_name, tensors):
        return {k: t * self.c[adapter_name] for k, t in tensors.items()}, None

    def unmerge(self):
        while self.merged_adapters:
            c = self.c[self.merged_adapters.pop()]
            for p in self.get_base_layer().parameters():
                p.data /= c


def test_a_method_with_only_the_merge_hook_merges_and_safe_merges():
    layer = _Scale(torch.nn.Linear(4, 3))
    layer.c.update(a=2.0, b=-0.5, broken=float("inf"))
    layer.set_adapter(["a", "b"])
    x = torch.randn(5, 4)
    expected = layer(x)
    layer.merge(["a", "b"], safe_merge=True)
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer(x), expected)  # the merged weight and bias alone: -(W x + b)
    torch.testing.assert_close(layer.base_layer(x), expected)
    layer.unmerge()
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    assert layer.first_nonfinite_merge(["a", "broken", "b"]) == "broken"
    with pytest.raises(ValueError, match="adapter 'broken' into this _Scale"):
        layer.merge(["a", "broken"], safe_merge=True)
    assert not layer.merged and all(torch.equal(v, before[k]) for k, v in layer.base_layer.state_dict().items())


def test_safe_merge_with_a_module_trained_whole_that_has_no_weight():
    """modules_to_save may name a whole block (no ``.weight``): nothing of it is folded, and the
    merge equals the unmerged forward."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"], init_lora_weights=False))
    x = torch.randn(3, 4)
    expected = model(x)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("adapters", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "lora_bias", "loha", "lokr", "adalora"])
def test_a_half_precision_weight_is_rounded_once_when_merged(method, adapters):
    """W + delta computed in fp32 and rounded to bf16 once, as peft's in-place add rounds it; rounding
    delta to bf16 first and the sum again moved about 2% of the entries of a 64 x 64 weight."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
    configs = {"lora": LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
               "lora_bias": LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, lora_bias=True),
               "loha": minipeft.LoHaConfig(r=4, target_modules=["0"], init_weights=False),
               "lokr": minipeft.LoKrConfig(r=4, target_modules=["0"], init_weights=False),
               "adalora": minipeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0"],
                                                 init_lora_weights=False)}
    model = get_peft_model(copy.deepcopy(base), configs[method])
    if adapters == "bf16":  # the whole model cast down, adapters too: the update is still summed in fp32
        model.to(torch.bfloat16)
    layer = model.get_base_model()[0]
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad and p.dim() == 1:  # lora_bias: a bias worth rounding too
                p.normal_()
    f = {name: p.detach().float() for name, p in layer.named_parameters() if p.requires_grad}
    f = {name.split(".")[0]: p for name, p in f.items() if not name.endswith("bias")} | \
        {"b_B": p for name, p in f.items() if name.endswith("bias")}
    delta = {  # the fp32 update, by hand from the factors
        "lora": lambda: f["lora_B"] @ f["lora_A"] * layer.scaling["default"],
        "loha": lambda: (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * layer.scaling["default"],
        "lokr": lambda: torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"] if "lokr_w2_a" in f else f["lokr_w2"])
        * layer.scaling["default"],
        "adalora": lambda: f["lora_B"] @ (f["lora_A"] * f["lora_E"]) * (8 / (4 + 1e-5)),
    }[method.removesuffix("_bias")]()
    want_weight = (base[0].weight.float() + delta).to(torch.bfloat16)
    want_bias = (base[0].bias.float() + layer.scaling["default"] * f["b_B"]).to(torch.bfloat16) \
        if method == "lora_bias" else base[0].bias
    model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, want_weight)
    assert torch.equal(layer.get_base_layer().bias, want_bias)


@pytest.mark.parametrize("method", ["lora", "dora", "lora_embedding", "adalora", "vera"])
def test_an_fp64_weight_merges_in_fp64(method):
    """Updates are computed in at least fp32: an fp64 model (and fp64 adapters) merge to fp64
    precision, not to fp32's 1e-7."""
    torch.manual_seed(0)
    embedding = method == "lora_embedding"
    base = torch.nn.Sequential(torch.nn.Embedding(40, 24) if embedding else torch.nn.Linear(48, 24)).double()
    configs = {"lora": LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
               "dora": LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=True),
               "lora_embedding": LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
               "adalora": minipeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["0"],
                                                 init_lora_weights=False),
               "vera": minipeft.VeraConfig(r=4, target_modules=["0"], init_weights=False)}
    model = get_peft_model(copy.deepcopy(base), configs[method])
    x = torch.randint(0, 40, (3, 5)) if embedding else torch.randn(3, 48, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-10, rtol=1e-10)
        model.unmerge_adapter()
        torch.testing.assert_close(model.get_base_model()[0].base_layer.weight, base[0].weight, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("computed", ["parametrizations.weight_norm", "spectral_norm", "legacy weight_norm"])
def test_a_weight_the_base_computes_is_never_merged_into(computed):
    # Audio and GAN models compute their weight from other parameters at each call: a merge's
    # write would be lost (the merged model would compute the base model), so it is refused.
    base = torch.nn.Sequential(collections.OrderedDict(proj=torch.nn.Linear(6, 5)))
    if computed == "parametrizations.weight_norm":
        torch.nn.utils.parametrizations.weight_norm(base.proj)
    elif computed == "spectral_norm":
        torch.nn.utils.parametrizations.spectral_norm(base.proj)
    else:
        torch.nn.utils.weight_norm(base.proj)
    model = get_peft_model(base, LoraConfig(target_modules=["proj"], init_lora_weights=False)).eval()
    x = torch.randn(3, 6)
    adapted = model(x)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge into 'proj', so nothing was merged: its base layer computes "
                                             r"\['weight'\] from other parameters"):
            merge()
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    assert torch.allclose(model.unload()(x), model.get_base_model()(x))

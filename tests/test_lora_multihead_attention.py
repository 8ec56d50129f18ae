"""LoRA on nn.MultiheadAttention: the attention run with W + s B A in place of its in_proj and
out_proj weights. The reference is PyTorch's own attention called with those sums written by
hand (torch.func.functional_call on an unadapted copy), for outputs and for the gradients of
all four factors; peft is the reference for the layout and for in_proj's numbers.

peft 0.21 adds out_proj's update twice in its forward and its merge (W + 2 s B A; reported as
huggingface/peft#3774). So the comparisons with peft's numbers keep out_proj's B at zero, where
the two libraries must agree, and the checkpoints are compared tensor by tensor."""

from __future__ import annotations

import copy
import pickle
import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call

import minipeft

peft = pytest.importorskip("peft")

E, HEADS, R, ALPHA = 16, 2, 4, 8
SCALE = ALPHA / R


class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayer blocks (whose eval fast path reads the attention's weights
    itself) and a head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=E, nhead=HEADS, dim_feedforward=32, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 2)

    def forward(self, x, mask=None):
        return self.head(self.enc(x, src_key_padding_mask=mask).mean(1))


class CrossAttention(nn.Module):
    """The attention called directly, sequence-first, with a padding mask (torchvision's ViT and
    CLIP call theirs so)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)

    def forward(self, x, mask=None):
        out, _ = self.attn(x, x.flip(0), x, key_padding_mask=mask, need_weights=False)
        return out


def adapted(base: nn.Module, **config) -> nn.Module:
    model = minipeft.get_peft_model(
        copy.deepcopy(base), minipeft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["attn", "self_attn"],
                                                 init_lora_weights=False, **config))
    return model


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{attention name: (A_in, B_in, A_out, B_out)} of the default adapter."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "LoraMultiheadAttention":
            out[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight, module.lora_B["default"].weight,
                module.out_proj.lora_A["default"].weight, module.out_proj.lora_B["default"].weight)
    return out


def by_hand(base: nn.Module, model: nn.Module, *inputs) -> torch.Tensor:
    """The unadapted model run with W + s B A written into each attention's two weights."""
    weights = {}
    for name, (A_in, B_in, A_out, B_out) in factors(model).items():
        attention = base.get_submodule(name)
        weights[f"{name}.in_proj_weight"] = attention.in_proj_weight + SCALE * B_in @ A_in
        weights[f"{name}.out_proj.weight"] = attention.out_proj.weight + SCALE * B_out @ A_out
    return functional_call(base, weights, inputs)


def data(kind):
    g = torch.Generator().manual_seed(3)
    if kind is Encoder:
        x, mask = torch.randn(2, 5, E, generator=g), torch.zeros(2, 5, dtype=torch.bool)
    else:
        x, mask = torch.randn(5, 2, E, generator=g), torch.zeros(2, 5, dtype=torch.bool)
    mask[1, -2:] = True  # padding in the second sequence
    return x, mask


@pytest.mark.parametrize("kind", [Encoder, CrossAttention])
@pytest.mark.parametrize("mode", ["train", "eval", "eval, no grad"])
def test_outputs_and_gradients_are_those_of_the_summed_weights(kind, mode):
    torch.manual_seed(0)
    base = kind().eval()
    model = adapted(base)
    model.train(mode == "train")
    base.train(mode == "train")
    x, mask = data(kind)
    if mode == "eval, no grad":
        # nn.TransformerEncoderLayer's fast path would read the base weights past the adapter.
        with torch.no_grad():
            torch.testing.assert_close(model(x, mask), by_hand(base, model, x, mask), atol=1e-6, rtol=0)
        return
    got, want = model(x, mask), by_hand(base, model, x, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - base(x, mask)).abs().max() > 1e-2  # the adapters do change the output
    leaves = [t for four in factors(model).values() for t in four]
    grads_got = torch.autograd.grad(got.square().sum(), leaves)
    grads_want = torch.autograd.grad(want.square().sum(), leaves)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        assert g.abs().sum() > 0


def test_layout_and_in_proj_numbers_match_peft():
    torch.manual_seed(0)
    base = Encoder()
    config = dict(r=R, lora_alpha=ALPHA, target_modules=["self_attn"], init_lora_weights=False)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, param in p.named_parameters():
            if "out_proj.lora_B" in name:
                param.zero_()  # where peft's doubled out_proj update is zero too
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    m.load_state_dict(p.state_dict(), strict=True)  # the same module tree, name for name
    p.train(), m.train()  # peft's eval forward takes the encoder layer's fast path, without its adapters
    x, mask = data(Encoder)
    out_p, out_m = p(x, mask), m(x, mask)
    torch.testing.assert_close(out_m, out_p, atol=1e-6, rtol=0)
    out_p.square().sum().backward()
    out_m.square().sum().backward()
    grads_p = {n: t.grad for n, t in p.named_parameters() if t.requires_grad and "out_proj.lora_B" not in n}
    grads_m = {n: t.grad for n, t in m.named_parameters() if t.requires_grad and "out_proj.lora_B" not in n}
    assert sorted(grads_m) == sorted(grads_p) and len(grads_m) == 6
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_m[name], grad, atol=1e-6, rtol=1e-5)


def test_checkpoints_load_in_peft_and_back(tmp_path):
    torch.manual_seed(0)
    base = Encoder()
    m = adapted(base)
    m.save_pretrained(tmp_path / "mini")
    p = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    theirs = {n.replace("base_model.model.", ""): t for n, t in p.named_parameters() if "lora_" in n}
    ours = {n.replace("base_model.model.", ""): t for n, t in m.named_parameters() if "lora_" in n}
    assert sorted(theirs) == sorted(ours) and len(ours) == 8
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, atol=0, rtol=0)

    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    x, mask = data(Encoder)
    with torch.no_grad():
        torch.testing.assert_close(m2(x, mask), m(x, mask), atol=0, rtol=0)


def test_merge_unmerge_disable_and_unload():
    torch.manual_seed(0)
    base = Encoder().eval()
    model = adapted(base).eval()
    x, mask = data(Encoder)
    with torch.no_grad():
        adapted_out, base_out = model(x, mask), base(x, mask)
        with model.disable_adapter():  # (the base model's eval takes the fast path: equal to rounding)
            torch.testing.assert_close(model(x, mask), base_out, atol=1e-6, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(x, mask), adapted_out, atol=1e-6, rtol=0)
        model.unmerge_adapter()
        for name, param in base.named_parameters():  # unmerging gives the base weights back
            torch.testing.assert_close(model.get_base_model().get_parameter(
                name.replace("self_attn.", "self_attn.base_layer.").replace("out_proj.", "out_proj.base_layer.")),
                param, atol=1e-6, rtol=0)
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(merged(x, mask), adapted_out, atol=1e-6, rtol=0)
        attention = merged.enc.layers[0].self_attn
        assert type(attention) is nn.MultiheadAttention and isinstance(attention.out_proj, nn.Linear)
        assert sorted(dict(merged.named_parameters())) == sorted(dict(base.named_parameters()))
        torch.testing.assert_close(model.unload()(x, mask), base_out, atol=1e-6, rtol=0)


def test_second_adapter_switching_and_deleting():
    torch.manual_seed(0)
    base = CrossAttention()
    model = adapted(base)
    model.add_adapter("other", minipeft.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    x, mask = data(CrossAttention)
    with torch.no_grad():
        first = model(x, mask)
        model.set_adapter("other")
        other = model(x, mask)
    assert (first - other).abs().max() > 1e-3
    trainable = [n for n, t in model.named_parameters() if t.requires_grad]
    assert len(trainable) == 4 and all(".other." in n for n in trainable)  # in_proj's and out_proj's
    model.delete_adapter("default")
    assert not [n for n, _ in model.named_parameters() if ".default." in n]
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), other, atol=0, rtol=0)


def test_lora_dropout_is_not_applied_and_says_so():
    """In training mode too the output is that of the summed weights, with no input dropped."""
    base = CrossAttention()
    with pytest.warns(UserWarning, match=r"lora_dropout=0.5 is not applied on 'attn', an nn.MultiheadAttention"):
        model = adapted(base, lora_dropout=0.5)
    model.train()
    x, mask = data(CrossAttention)
    torch.testing.assert_close(model(x, mask), by_hand(base, model, x, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, error", [
    (dict(lora_bias=True), r"lora_bias=True on 'attn', an nn.MultiheadAttention"),
    (dict(use_dora=True), r"DoRA is implemented for linear layers, embeddings and convolutions \(as in peft\); "
                          r"'attn' is a MultiheadAttention"),
    (dict(init_lora_weights="pissa"), r"decomposes the weight of a linear layer; 'attn' is a MultiheadAttention"),
])
def test_what_the_weight_form_cannot_do_is_refused(options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        minipeft.get_peft_model(CrossAttention(), minipeft.LoraConfig(r=R, target_modules=["attn"], **options))


def test_projections_of_other_widths_are_refused():
    model = CrossAttention()
    model.attn = nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8)
    with pytest.raises(ValueError, match=r"needs query, key and value of one width .* kdim=8, vdim=8, embed_dim=16"):
        minipeft.get_peft_model(model, minipeft.LoraConfig(r=R, target_modules=["attn"]))


@pytest.mark.parametrize("config", [minipeft.LoraConfig, lambda **kw: minipeft.IA3Config(feedforward_modules=[], **kw)])
def test_naming_out_proj_alone_is_refused(config):
    """The attention reads out_proj.weight itself and never calls out_proj: a wrapper there would
    never run (peft accepts it and trains an adapter that does nothing)."""
    with pytest.raises(ValueError, match=r"'enc.layers.0.self_attn.out_proj' is the out_proj of the "
                                         r"nn.MultiheadAttention 'enc.layers.0.self_attn'.*never calls it"):
        minipeft.get_peft_model(Encoder(), config(target_modules=["out_proj"]))


def test_all_linear_leaves_out_proj_out():
    model = minipeft.get_peft_model(Encoder(), minipeft.LoraConfig(r=R, target_modules="all-linear"))
    adapted_layers = {n.split(".lora_A")[0].removeprefix("base_model.model.")
                      for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted_layers == {f"enc.layers.{i}.{name}" for i in (0, 1) for name in ("linear1", "linear2")} | {"head"}


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_weighted_combination_sums_both_projections_updates(combination_type):
    """'cat' (exactly) and 'svd' at full rank give the sum of the sources' updates, on in_proj and
    out_proj alike."""
    torch.manual_seed(0)
    base = CrossAttention()
    model = adapted(base)
    model.add_adapter("b", minipeft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["attn"], init_lora_weights=False))
    layer = model.get_base_model().attn
    x, mask = data(CrossAttention)
    with torch.no_grad():
        weights = {"attn.in_proj_weight": base.attn.in_proj_weight + 0.5 * layer.delta_weight("default")
                   + 2.0 * layer.delta_weight("b"),
                   "attn.out_proj.weight": base.attn.out_proj.weight + 0.5 * layer.out_proj.delta_weight("default")
                   + 2.0 * layer.out_proj.delta_weight("b")}
        want = functional_call(base, weights, (x, mask))
        model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "both", combination_type=combination_type,
                                   svd_rank=2 * R)
        model.set_adapter("both")
        # (outputs up to about 15: the SVD's fp32 rounding reaches 1e-5 there)
        torch.testing.assert_close(model(x, mask), want, atol=1e-5, rtol=1e-5)


class Pooled(nn.Module):
    """Ordinary linear layers named out_proj (a CLIP-like encoder) beside an attention pooler."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"out_proj": nn.Linear(E, E)}) for _ in range(2))
        self.pool = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        for layer in self.layers:
            x = layer["out_proj"](x)
        return self.pool(x[:, :1], x, x, need_weights=False)[0]


@pytest.mark.parametrize("options, warned", [
    (dict(target_modules=["out_proj"]), True),
    (dict(target_modules=r".*out_proj"), True),
    (dict(target_modules=["out_proj"], exclude_modules=["pool.out_proj"]), False),
    (dict(target_modules=["out_proj"], layers_to_transform=[0, 1], layers_pattern="layers"), False),
])
def test_a_suffix_or_regex_leaves_an_attentions_out_proj_out(options, warned, recwarn):
    model = minipeft.get_peft_model(Pooled(), minipeft.LoraConfig(r=R, **options))
    adapted_layers = {n.split(".lora_A")[0].removeprefix("base_model.model.")
                      for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted_layers == {"layers.0.out_proj", "layers.1.out_proj"}
    messages = [str(w.message) for w in recwarn if "never calls it" in str(w.message)]
    assert bool(messages) == warned
    if warned:
        assert "also matched ['pool.out_proj'], left out" in messages[0]


def test_an_attentions_out_proj_named_alone_is_refused_and_beside_others_left_out():
    with pytest.raises(ValueError, match=r"'pool.out_proj' is the out_proj of the nn.MultiheadAttention 'pool'"):
        minipeft.get_peft_model(Pooled(), minipeft.LoraConfig(target_modules=["pool.out_proj"]))
    with pytest.warns(UserWarning, match=r"also matched \['pool.out_proj'\], left out"):
        model = minipeft.get_peft_model(Pooled(), minipeft.LoraConfig(target_modules=["pool.out_proj", "layers.0.out_proj"]))
    assert [n for n, _ in model.named_parameters() if ".lora_A." in n] == [
        "base_model.model.layers.0.out_proj.lora_A.default.weight"]


def test_a_padded_batch_through_a_nested_tensor_encoder_with_gradients_on():
    """nn.TransformerEncoder packs a padded batch into a nested tensor at eval unless the
    attention's weights need gradients; it reads in_proj_weight to tell, and must see the adapters'."""
    torch.manual_seed(0)
    base = Encoder().eval()
    layer = base.enc.layers[0]
    base.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)  # its default
    model = adapted(base).eval()
    x, mask = data(Encoder)
    got = model(x, mask)  # grad enabled: not nested
    torch.testing.assert_close(got, by_hand(base, model, x, mask), atol=1e-6, rtol=0)
    got.sum().backward()
    assert all(t.grad is not None for four in factors(model).values() for t in four)
    with torch.no_grad():  # nested (padded positions come out as zeros), as the base model with the summed weights
        torch.testing.assert_close(model(x, mask), by_hand(base, model, x, mask), atol=1e-5, rtol=0)


def test_a_refused_injection_leaves_the_attention_as_it_was(monkeypatch):
    """A target that fails after the attention's wrapper was built (and put a LoraLinear on its
    out_proj) must leave the user's model untouched."""
    from minipeft.config import PeftType
    from minipeft.tuners import PEFT_METHODS

    method = PEFT_METHODS[PeftType.LORA]

    def wrap(module, adapter_name, config, key):
        if key == "head":
            raise RuntimeError("a failure after the attention's wrapper was built")
        return method.wrap(module, adapter_name, config, key)

    monkeypatch.setitem(PEFT_METHODS, PeftType.LORA, dataclasses.replace(method, wrap=wrap))
    model = Encoder()
    names = sorted(dict(model.named_modules()))
    with pytest.raises(RuntimeError, match="a failure after"):
        minipeft.inject_adapter_in_model(minipeft.LoraConfig(r=R, target_modules=["self_attn", "head"]), model)
    assert sorted(dict(model.named_modules())) == names
    assert type(model.enc.layers[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_bias_all_trains_biases_as_peft_picks_them(tmp_path):
    """peft's bias="all" takes parameters named bias (not the attention's in_proj_bias): the same
    biases train, and peft's checkpoint loads."""
    torch.manual_seed(0)
    base = Encoder()
    config = dict(r=R, target_modules=["self_attn"], bias="all")
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    m = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(**config))
    trained = sorted(n for n, t in m.named_parameters() if t.requires_grad)
    assert trained == sorted(n for n, t in p.named_parameters() if t.requires_grad)
    assert not any("in_proj_bias" in n for n in trained)
    p.save_pretrained(tmp_path)
    minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("method", ["LoraConfig", "LoHaConfig"])
def test_a_peft_all_linear_checkpoint_with_an_attentions_out_proj_loads(method, tmp_path):
    """peft's 'all-linear' adapts an nn.MultiheadAttention's out_proj too, where the attention never
    calls it (those tensors change nothing in peft): minipeft leaves them out, with warnings, and
    computes what peft computes."""
    torch.manual_seed(0)
    base = Pooled().eval()
    options = dict(target_modules="all-linear", init_lora_weights=False) if method == "LoraConfig" else \
        dict(target_modules="all-linear", init_weights=False)
    p = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**options))
    p.save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as caught:
        m = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "left out" in messages and "pool.out_proj" in messages
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        torch.testing.assert_close(m(x), p(x), atol=1e-6, rtol=0)
        assert (m(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("config", [
    minipeft.LoraConfig(r=R, target_modules=["self_attn", "linear1"], init_lora_weights=False),
    minipeft.IA3Config(target_modules=["linear1", "linear2"], feedforward_modules=["linear2"], init_ia3_weights=False),
    minipeft.LoHaConfig(r=R, target_modules=["linear2"], init_weights=False),
    minipeft.LNTuningConfig(target_modules=["norm2"]),
    minipeft.LoraConfig(r=R, target_modules=["linear2"], use_dora=True, init_lora_weights=False),
    minipeft.OFTConfig(r=0, oft_block_size=4, target_modules=["linear1"], init_weights=False),
    minipeft.RoadConfig(group_size=4, target_modules=["linear1"], init_weights=False),
    minipeft.BottleneckConfig(target_modules=["linear2"], bottleneck_size=4),
], ids=["lora", "ia3", "loha", "ln_tuning", "dora", "oft", "road", "bottleneck"])
def test_adapters_inside_an_encoder_layer_run_in_its_eval_fast_path_too(config):
    """In eval mode nn.TransformerEncoderLayer computes the whole block in one fused op from its
    sublayers' weights, past their forwards; a padded batch goes through it as a nested tensor.
    Any adapter inside must keep it on the path that runs the adapter: the output is the one
    torch's own slow path gives."""
    torch.manual_seed(0)
    base = Encoder()
    base.enc = nn.TransformerEncoder(base.enc.layers[0], 2, enable_nested_tensor=True)
    model = minipeft.get_peft_model(base, config).eval()
    with torch.no_grad():  # (some start as the identity: LN tuning's copies, the bottleneck's up projection)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x, mask = data(Encoder)
    real = ~mask  # (a nested batch comes back with zeros where the slow path computes padding)
    encoder = model.base_model.model.enc
    for padding in (None, mask):
        with torch.no_grad():
            fast = encoder(x, src_key_padding_mask=padding)[real]
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                slow = encoder(x, src_key_padding_mask=padding)[real]
            finally:
                torch.backends.mha.set_fastpath_enabled(True)
            with model.disable_adapter():
                assert (slow - encoder(x, src_key_padding_mask=padding)[real]).abs().max() > 1e-3  # the adapter acts
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_an_adapted_encoder_layer_copies_pickles_and_unloads_to_the_fast_path():
    torch.manual_seed(0)
    base = Encoder().eval()
    model = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoraConfig(r=R, target_modules=["linear1"])).eval()
    x, mask = data(Encoder)
    with torch.no_grad():
        expected = model(x, mask)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(twin(x, mask), expected, atol=0, rtol=0)
        plain = model.unload()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in plain.modules())  # the hooks went with the wrappers


def test_a_nested_batch_that_would_need_gradients_is_refused_saying_what_works():
    # In eval mode nn.TransformerEncoder packs a padded batch into a nested tensor, judging by the
    # frozen weights; the adapter's output then needs gradients, which the next attention refuses.
    torch.manual_seed(0)
    base = Encoder()
    base.enc = nn.TransformerEncoder(base.enc.layers[0], 2, enable_nested_tensor=True)
    model = minipeft.get_peft_model(base, minipeft.LoraConfig(r=R, target_modules=["linear1"])).eval()
    x, mask = data(Encoder)
    with pytest.raises(ValueError, match="enable_nested_tensor=False, run it in training mode"):
        model(x, mask)
    with model.disable_adapter():  # nothing that trains runs: the base model's own nested path
        assert not model(x, mask).requires_grad
    model.train()
    model(x, mask).sum().backward()  # in training mode nothing is packed

"""OFT against hand-derived math (a 2 x 2 Cayley rotation in closed form, orthogonality, the
rotated weight) and against peft (one seed, the same rotation parameters, outputs, gradients and
checkpoints both ways, for each option).

Deliberate differences, each checked here: on a convolution minipeft's forward is the rotated
kernel, which peft's merge computes too (peft's unmerged Conv2d forward is not: it folds
overlapping input patches back by summing them); ``module_dropout`` is applied (peft 0.21 builds
the dropout layer but never calls it); GPT-2's Conv1D and Conv1d/Conv3d are supported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import minipeft
from minipeft import OFTConfig, get_peft_model, injection
from minipeft.tuners.oft import cayley, nearest_divisor, skew_symmetric
from tests import against_peft
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


# -- the rotation, by hand ----------------------------------------------------------------------
def test_a_2x2_block_is_the_closed_form_cayley_rotation():
    """For b = 2, Q = [[0, q], [-q, 0]] and Q^2 = -q^2 I, so (I - Q)(I + Q)^{-1} is the rotation
    [[1 - q^2, -2q], [2q, 1 - q^2]] / (1 + q^2), and peft's 5-term series
    I + 2Q + 2Q^2 + 2Q^3 + Q^4 is (1 - 2q^2 + q^4) I + (2 - 2q^2) Q."""
    q = 0.3
    Q = skew_symmetric(torch.tensor([[q]], dtype=torch.float64), 2)
    torch.testing.assert_close(Q[0], torch.tensor([[0.0, q], [-q, 0.0]], dtype=torch.float64))
    exact = torch.tensor([[1 - q * q, -2 * q], [2 * q, 1 - q * q]], dtype=torch.float64) / (1 + q * q)
    torch.testing.assert_close(cayley(Q, None)[0], exact)
    series = (1 - 2 * q * q + q**4) * torch.eye(2, dtype=torch.float64) + (2 - 2 * q * q) * Q[0]
    torch.testing.assert_close(cayley(Q, 5)[0], series)
    # The two forms turn the opposite ways: the series approximates the exact rotation's transpose.
    torch.testing.assert_close(cayley(Q * 1e-3, 12)[0], cayley(Q * 1e-3, None)[0].T)


@pytest.mark.parametrize("terms", [None, 2, 3, 4, 6])
def test_exact_rotations_are_orthogonal_and_series_match_peft(terms):
    torch.manual_seed(0)
    upper = torch.randn(3, 10) * 0.1  # three 5 x 5 blocks
    R = cayley(skew_symmetric(upper, 5), terms)
    if terms is None:
        torch.testing.assert_close(R @ R.transpose(-2, -1), torch.eye(5).expand(3, 5, 5), atol=1e-6, rtol=0)
    layer = peft.tuners.oft.layer.OFTRotationModule(3, 10, 5, 15, use_cayley_neumann=terms is not None,
                                                    num_cayley_neumann_terms=terms or 5)
    torch.testing.assert_close(R, layer._cayley_batch(upper, 5, terms is not None, terms or 5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size, value, want", [(32, 6, 4), (32, 8, 8), (12, 5, 4), (30, 4, 3), (12, 40, 12), (7, 3, 1)])
def test_sizes_that_do_not_divide_move_to_the_nearest_divisor(size, value, want):
    assert nearest_divisor(size, value) == want


def test_the_forward_rotates_the_input_and_a_new_adapter_is_the_base_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 5))
    model = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=4, target_modules=["0"]))
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)
    with torch.no_grad():
        model.get_base_model()[0].oft_R["default"].weight.normal_()
    layer = model.get_base_model()[0]
    R = torch.block_diag(*layer.rotation("default"))  # (12, 12)
    torch.testing.assert_close(model(x), x @ R @ base[0].weight.T + base[0].bias, atol=1e-5, rtol=0)
    assert layer.r["default"] == 3 and layer.oft_block_size["default"] == 4


# -- against peft -------------------------------------------------------------------------------
def seeded_pair(base, config: dict, seed: int = 3):
    return against_peft.seeded_pair(base, "OFTConfig", config, seed)


OPTIONS = {
    "neumann": {},
    "exact cayley": dict(use_cayley_neumann=False),
    "block_share": dict(block_share=True),
    "coft": dict(coft=True, eps=1e-2),
    "r instead of the block size": dict(r=4, oft_block_size=0),
    "a block size that does not divide": dict(oft_block_size=6),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_logits_gradients_and_parameters_match_peft(option):
    base = tiny_transformers_model("llama")
    config = dict(oft_block_size=8, target_modules=LLAMA_TARGETS, init_weights=False) | OPTIONS[option]
    p, m = seeded_pair(base, config)
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())
    for name, t in p.named_parameters():
        torch.testing.assert_close(m.get_parameter(name), t, atol=1e-9, rtol=0)  # coft: also after its projection


@pytest.mark.parametrize("bias", ["oft_only", "all"])
def test_trained_biases_match_peft(bias):
    base = tiny_transformers_model("bert")  # its linear layers have biases (the tiny LLaMA's have none)
    p, m = seeded_pair(base, dict(oft_block_size=8, target_modules=["query", "value"], init_weights=False, bias=bias))
    ids = input_ids()
    trained = []
    for model in (p, m):
        model(input_ids=ids).logits.square().sum().backward()
        trained.append({n: t.grad for n, t in model.named_parameters() if t.requires_grad})
    assert sorted(trained[1]) == sorted(trained[0]) and any(n.endswith(".bias") for n in trained[0])
    for name, grad in trained[0].items():
        torch.testing.assert_close(trained[1][name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("option", ["neumann", "exact cayley", "block_share", "coft"])
def test_checkpoints_load_in_peft_and_back(tmp_path, option):
    base = tiny_transformers_model("llama")
    p, m = seeded_pair(base, dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_weights=False) | OPTIONS[option])
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path)


def test_an_embedding_rotates_its_vectors_as_peft_does(tmp_path):
    base = tiny_transformers_model("llama")
    p, m = seeded_pair(base, dict(oft_block_size=8, target_modules=["embed_tokens"], init_weights=False))
    ids = input_ids()
    torch.testing.assert_close(m(input_ids=ids).logits, p(input_ids=ids).logits, atol=1e-6, rtol=1e-5)
    layer = m.get_base_model().model.embed_tokens
    R = torch.block_diag(*layer.rotation("default"))
    torch.testing.assert_close(layer(ids), layer.base_layer.weight[ids] @ R, atol=1e-6, rtol=0)
    # peft's file also holds the frozen table (save_embedding_layers); minipeft loads it as peft does.
    p.save_pretrained(tmp_path / "peft")
    m2 = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(m2(input_ids=ids).logits, p(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, image):
        return self.conv(image)


def test_a_convolution_runs_with_its_rotated_kernel_which_peft_merges(tmp_path):
    torch.manual_seed(0)
    base = ConvNet()
    image = torch.randn(2, 4, 7, 7)
    p, m = seeded_pair(base, dict(oft_block_size=4, target_modules=["conv"]))  # R = I
    torch.testing.assert_close(m(image), base(image), atol=0, rtol=0)
    p, m = seeded_pair(base, dict(oft_block_size=4, target_modules=["conv"], init_weights=False))
    assert m.get_base_model().conv.oft_R["default"].weight.shape == (9, 6)  # 36 = 4 x 3 x 3 in blocks of 4
    with torch.no_grad():
        theirs = p.merge_and_unload()(image)
    torch.testing.assert_close(m(image), theirs, atol=1e-5, rtol=1e-5)
    m.save_pretrained(tmp_path / "mini")
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
                                   .merge_and_unload()(image), m(image), atol=1e-5, rtol=1e-5)
    layer = m.get_base_model().conv
    R = torch.block_diag(*layer.rotation("default"))  # (36, 36)
    kernel = (base.conv.weight.flatten(1) @ R.T).view_as(base.conv.weight)
    torch.testing.assert_close(m(image), nn.functional.conv2d(image, kernel, base.conv.bias, padding=1),
                               atol=1e-5, rtol=1e-5)


# -- layers peft does not adapt -------------------------------------------------------------------
def test_gpt2_conv1d_rotates_the_input_side_of_its_transposed_weight():
    base = tiny_transformers_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), OFTConfig(oft_block_size=8, target_modules=["c_fc"], init_weights=False))
    layer = model.get_base_model().transformer.h[0].mlp.c_fc
    assert layer.fan_in_fan_out and model.peft_config["default"].fan_in_fan_out
    x = torch.randn(3, 32)
    R = torch.block_diag(*layer.rotation("default"))
    torch.testing.assert_close(layer(x), x @ R @ layer.base_layer.weight + layer.base_layer.bias, atol=1e-5, rtol=0)


# -- merging, several adapters, dropout (mixed batches: test_mixed_batch.py) ----------------------
def test_merge_unmerge_and_two_adapters_compose_as_their_merges():
    base = tiny_transformers_model("llama")
    config = dict(oft_block_size=8, target_modules=LLAMA_TARGETS, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), OFTConfig(**config))
    model.add_adapter("b", OFTConfig(**config | dict(oft_block_size=4, use_cayley_neumann=False)))
    ids = input_ids()
    with torch.no_grad():
        injection.set_adapter(model.get_base_model(), ["default", "b"])  # both active on every layer
        both = model(input_ids=ids).logits
        model.merge_adapter(["default", "b"])
        torch.testing.assert_close(model(input_ids=ids).logits, both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        restored = copy.deepcopy(model).unload().state_dict()  # the inverse blocks give the weights back
        for name, t in base.state_dict().items():
            torch.testing.assert_close(restored[name], t, atol=1e-6, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_several_active_adapters_merge_only_in_their_order():
    base = nn.Sequential(nn.Linear(8, 8))
    model = get_peft_model(base, OFTConfig(oft_block_size=4, target_modules=["0"], init_weights=False))
    model.add_adapter("b", OFTConfig(oft_block_size=4, target_modules=["0"], init_weights=False))
    injection.set_adapter(model.get_base_model(), ["default", "b"])
    with pytest.raises(ValueError, match=r"merge them in order \(\['default'\] first\)"):
        model.merge_adapter(["b"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
        model.merge_adapter(["default"])  # the first one alone: the other still acts after it
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_keeps_its_dtype_and_merges_to_its_forward(dtype):
    base = tiny_transformers_model("llama").to(dtype)
    model = get_peft_model(base, OFTConfig(oft_block_size=8, target_modules=LLAMA_TARGETS, init_weights=False))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = input_ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert unmerged.dtype == dtype
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=0.02, rtol=0.02)


def test_module_dropout_acts_in_training_forwards_only():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), OFTConfig(oft_block_size=2, module_dropout=0.5,
                                                                      target_modules=["0"], init_weights=False))
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.eval()
        full = model(x)
        model.train()
        dropped = [model(x) for _ in range(3)]
        merged = copy.deepcopy(model).merge_and_unload()(x)  # merged in training mode: nothing dropped
    assert all(not torch.allclose(d, full) for d in dropped) and not torch.allclose(dropped[0], dropped[1])
    torch.testing.assert_close(merged, full, atol=1e-6, rtol=0)


def test_coft_projects_in_the_forward_but_a_merge_writes_nothing():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)), OFTConfig(oft_block_size=4, coft=True, eps=1e-2,
                                                                     target_modules=["0"]))
    layer = model.get_base_model()[0]
    with torch.no_grad():
        layer.oft_R["default"].weight.fill_(0.5)
    before = layer.oft_R["default"].weight.clone()
    assert layer.first_nonfinite_merge(["default"]) is None  # a dry run: no write
    merged, _ = layer.merged_tensors("default", layer._base_tensors())
    torch.testing.assert_close(layer.oft_R["default"].weight, before, atol=0, rtol=0)
    model(torch.randn(2, 8))  # a forward projects in place, as peft's does
    q = skew_symmetric(layer.oft_R["default"].weight.detach(), 4)
    torch.testing.assert_close(q.flatten(1).norm(dim=1), torch.full((2,), 1e-2 / 2 ** 0.5), atol=1e-7, rtol=0)
    torch.testing.assert_close(merged["weight"], layer.merged_tensors("default", layer._base_tensors())[0]["weight"])


def test_module_dropout_replaces_whole_blocks_by_the_identity_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), OFTConfig(oft_block_size=2, module_dropout=0.25,
                                                                      target_modules=["0"], init_weights=False))
    rotation = model.get_base_model()[0].oft_R["default"]
    eye = torch.eye(2)
    model.train()
    draws = set()
    for _ in range(20):
        blocks = rotation.matrices()
        identity = [i for i in range(8) if torch.equal(blocks[i], eye)]
        assert len(identity) == 2  # int(0.25 x 8)
        draws.add(tuple(identity))
    assert len(draws) > 1
    model.eval()
    assert not any(torch.equal(b, eye) for b in rotation.matrices())


# -- bad input ------------------------------------------------------------------------------------
def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="either r .* or oft_block_size"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ValueError, match="either r .* or oft_block_size"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="OFTConfig.bias must be 'none', 'all' or 'oft_only', got 'lora_only'"):
        OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="OFTConfig.use_cayley_neumann must be True or False, got 'False'"):
        OFTConfig(use_cayley_neumann="False")
    with pytest.raises(ValueError, match="with 1 the series is I"):
        OFTConfig(num_cayley_neumann_terms=1)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="OFT rotates vectors of size 8 \\(2 blocks of 4\\); got an input whose last "
                                         "dimension is 6"):
        model(torch.randn(2, 6))
    with pytest.warns(UserWarning, match="blocks are 1 x 1 .* stays the identity"):
        get_peft_model(nn.Sequential(nn.Linear(7, 2)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    with pytest.raises(ValueError, match="OFT supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.LayerNorm(8)), OFTConfig(target_modules=["0"]))
    conv = nn.Sequential(nn.Conv2d(2, 2, 3))
    model = get_peft_model(conv, minipeft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="Add the OFT adapters to a convolution first"):
        model.add_adapter("oft", OFTConfig(oft_block_size=2, target_modules=["0"]))


def test_files_from_older_peft_versions_are_refused_or_warned_about(tmp_path):
    from minipeft.checkpoint import config_from_dict

    data = OFTConfig(target_modules=["q_proj"]).to_dict()
    assert data["peft_version"] == "0.18.0"  # peft reads the series as its own, without a warning
    with pytest.warns(UserWarning, match="saved before peft 0.18"):
        config_from_dict({**data, "peft_version": "0.17.1"})
    with pytest.raises(ValueError, match="peft before 0.14"):
        config_from_dict({k: v for k, v in data.items() if k != "oft_block_size"})
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)), OFTConfig(oft_block_size=4, target_modules=["0"]))
    old_tensors = {"base_model.model.0.oft_r": torch.zeros(2, 4, 4), "base_model.model.0.oft_s": torch.ones(4, 1)}
    with pytest.raises(ValueError, match="oft_r / oft_s tensors, the OFT of peft 0.15.2 and before"):
        minipeft.set_peft_model_state_dict(model, old_tensors)

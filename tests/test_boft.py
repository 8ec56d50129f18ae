"""BOFT against hand-derived math (a 2 x 2 Cayley block, the butterfly built as dense matrices from
its definition) and against peft (one seed: the same parameters, logits, gradients, dropped blocks
and checkpoints both ways). peft builds more than one butterfly factor only with its CUDA
extension; ``peft_butterfly`` gives it a pure-PyTorch stand-in for that extension's one operation
(a batch of block-diagonal matrices), so that peft's own butterfly runs on a CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import minipeft
from minipeft import BOFTConfig, get_peft_model
from tests import against_peft, merge_checks
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")
peft_boft = pytest.importorskip("peft.tuners.boft.layer")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # input sizes 32, 32, 48


class BlockDiagonalExtension:
    """peft's ``fbd_cuda`` (a batch of blocks (N, D, b, b) -> (N, D b, D b)) in plain PyTorch."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        return [torch.stack([torch.stack([grad[i, j * b:(j + 1) * b, j * b:(j + 1) * b] for j in range(d)])
                             for i in range(n)])]


@pytest.fixture
def peft_butterfly(monkeypatch):
    """peft as on a machine where its CUDA extension built: every butterfly factor computed."""
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", BlockDiagonalExtension())


@pytest.fixture
def peft_without_extension(monkeypatch):
    """peft as on a machine where its CUDA extension did not build (it does not try here)."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)


def butterfly_matrix(layer, adapter="default") -> torch.Tensor:
    """``R = F_{m-1} ... F_0`` as a dense (d, d) matrix, from the definition: ``F_i = P_i B_i P_i^T``,
    ``B_i = diag(blocks)``, ``P_i[k, perm_i[k]] = 1`` with ``perm_i`` built by hand (in each group
    of ``b 2^i`` features the chunks of ``b / 2`` in the order 0, 2, 4, ..., 1, 3, 5, ...)."""
    blocks = layer.factor_blocks(adapter, in_forward=False).detach()
    m, count, b, _ = blocks.shape
    d = count * b
    r = torch.eye(d)
    for i in range(m):
        group, half = b * 2**i, b // 2
        chunk_order = list(range(0, 2 ** (i + 1), 2)) + list(range(1, 2 ** (i + 1), 2)) if i else [0, 1]
        perm = [g + c * half + k for g in range(0, d, group) for c in chunk_order for k in range(half)] if i \
            else list(range(d))
        p = torch.zeros(d, d)
        for k, target in enumerate(perm):
            p[k, target] = 1
        r = p @ torch.block_diag(*blocks[i]) @ p.T @ r
    return r


# -- hand-derived math ------------------------------------------------------------------------------
def test_a_2x2_block_is_the_closed_form_cayley_rotation_and_s_scales_the_outputs_not_the_bias():
    base = nn.Sequential(nn.Linear(2, 3))
    model = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=2, target_modules=["0"]))
    layer = model.get_base_model()[0]
    a, s = 0.5, torch.tensor([2.0, -1.0, 0.5])
    with torch.no_grad():
        layer.boft_R["default"].copy_(torch.tensor([[[[0.3, a + 0.3], [-a + 0.3, 0.3]]]]))  # skew part: [[0, a], [-a, 0]]
        layer.boft_s["default"].copy_(s[:, None])
    # (I - Q)(I + Q)^{-1} for Q = [[0, a], [-a, 0]]
    rotation = torch.tensor([[1 - a * a, -2 * a], [2 * a, 1 - a * a]]) / (1 + a * a)
    x = torch.randn(4, 2)
    want = s * (x @ rotation @ base[0].weight.T) + base[0].bias
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("block_size, factors", [(2, 1), (2, 3), (4, 2)])
def test_the_butterfly_is_orthogonal_and_the_forward_is_the_dense_product(block_size, factors):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 5))
    model = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors,
                                                           target_modules=["0"], init_weights=False))
    layer = model.get_base_model()[0]
    r, s = butterfly_matrix(layer), layer.boft_s["default"].detach().flatten()
    torch.testing.assert_close(r @ r.T, torch.eye(16), atol=1e-5, rtol=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), s * (x @ r @ base[0].weight.T) + base[0].bias, atol=1e-5, rtol=0)
    # m factors of b x b blocks connect every feature within groups of b 2^(m-1), and none beyond
    reach = block_size * 2 ** (factors - 1)
    within = torch.block_diag(*[torch.ones(reach, reach)] * (16 // reach)).bool()
    assert (r[within] != 0).all() and (r[~within] == 0).all()


def test_a_new_adapter_is_the_base_model():
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                           target_modules=TARGETS))
    ids = input_ids()
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)


# -- against peft ---------------------------------------------------------------------------------
def seeded_pair(base, config: dict, seed: int = 3):
    return against_peft.seeded_pair(base, "BOFTConfig", config, seed)


OPTIONS = {
    "one factor": dict(boft_block_size=4),
    "two factors": dict(boft_block_size=4, boft_n_butterfly_factor=2),
    "three factors by block count": dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3),
    "dropout": dict(boft_block_size=2, boft_n_butterfly_factor=3, boft_dropout=0.5),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_parameters_logits_gradients_and_dropped_blocks_match_peft(option, peft_butterfly):
    config = dict(target_modules=TARGETS, init_weights=False) | OPTIONS[option]
    p, m = seeded_pair(tiny_transformers_model("llama"), config)
    for name, t in p.named_parameters():
        if t.requires_grad:
            torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())


@pytest.mark.parametrize("bias", ["boft_only", "all"])
def test_trained_biases_match_peft(bias, peft_without_extension):
    p, m = seeded_pair(tiny_transformers_model("bert"), dict(boft_block_size=4, target_modules=["query", "value"],
                                                            bias=bias, init_weights=False))
    ids = input_ids()
    for model in (p, m):
        model(input_ids=ids).logits.sum().backward()
    grads = [{n: t.grad for n, t in model.named_parameters() if t.requires_grad} for model in (p, m)]
    assert sorted(grads[0]) == sorted(grads[1]) and any(n.endswith(".bias") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("option", ["one factor", "two factors"])
def test_checkpoints_load_in_peft_and_back(tmp_path, option, peft_butterfly):
    base = tiny_transformers_model("llama")
    p, m = seeded_pair(base, dict(target_modules=TARGETS, init_weights=False) | OPTIONS[option])
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path)


def test_a_file_from_peft_without_its_extension_loads_as_the_one_factor_it_trained(tmp_path, peft_without_extension):
    base = tiny_transformers_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                     target_modules=TARGETS, init_weights=False))
    p.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="tensors hold one factor"):
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].boft_n_butterfly_factor == 1
    ids = input_ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, p(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_a_convolution_matches_peft(tmp_path, peft_butterfly):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1))
    p, m = seeded_pair(base, dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["0"],
                                  init_weights=False))
    layer = m.get_base_model()[0]
    assert layer.boft_R["default"].shape == (2, 18, 4, 4) and layer.boft_s["default"].shape == (1, 6)
    image = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(m(image), p(image), atol=1e-5, rtol=1e-5)
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(image), tmp_path, atol=1e-5)


# -- what minipeft adds, merging, and the lifecycle -------------------------------------------------
def test_gpt2_conv1d_multiplies_the_input_side_of_its_transposed_weight():
    # (merged equal to the forward there and on other convolutions: test_weight_transform.py)
    model = get_peft_model(tiny_transformers_model("gpt2"), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                                                      target_modules=["c_fc"], init_weights=False))
    layer = model.get_base_model().transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    r, s = butterfly_matrix(layer), layer.boft_s["default"].detach().flatten()
    torch.testing.assert_close(layer(x), s * (x @ r @ layer.base_layer.weight) + layer.base_layer.bias,
                               atol=1e-5, rtol=0)


def test_two_adapters_compose_as_their_merges_and_unmerge_restores_the_weights():
    base = tiny_transformers_model("llama")
    model = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                           target_modules=TARGETS, init_weights=False))
    model.add_adapter("b", BOFTConfig(boft_block_size=0, boft_block_num=2, target_modules=TARGETS, init_weights=False))
    ids = input_ids()
    merge_checks.assert_merge_in_order_and_unmerge(model, base, lambda m: m(input_ids=ids).logits)


def test_dropout_replaces_int_p_blocks_of_one_factor_in_training_only():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 4)), BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2,
                                                                      boft_dropout=0.5, target_modules=["0"],
                                                                      init_weights=False))
    layer = model.get_base_model()[0]
    clean = layer.factor_blocks("default", in_forward=False)
    eye = torch.eye(2)
    for _ in range(5):
        dropped = layer.factor_blocks("default", in_forward=True)
        changed = [(dropped[i] != clean[i]).flatten(1).any(1) for i in range(2)]
        assert sorted(int(c.sum()) for c in changed) == [0, 4]  # int(0.5 x 8) blocks, all in one factor
        factor = 0 if changed[0].any() else 1
        torch.testing.assert_close(dropped[factor][changed[factor]], eye.expand(4, 2, 2))
    model.eval()
    torch.testing.assert_close(layer.factor_blocks("default", in_forward=True), clean)


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="give BOFT either boft_block_size"):
        BOFTConfig(boft_block_size=4, boft_block_num=2)
    with pytest.raises(ValueError, match="a positive integer \\(1 is OFT\\); got 0"):
        BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="'none', 'all' or 'boft_only'"):
        BOFTConfig(bias="oft_only")
    with pytest.raises(ValueError, match=r"boft_block_size=5 does not divide its size 16; use one of \[1, 2, 4, 8, 16\]"):
        get_peft_model(nn.Sequential(nn.Linear(16, 4)), BOFTConfig(boft_block_size=5, target_modules=["0"]))
    cases = {  # (size, block size, factors): what the message offers; each offer is then checked to work
        (12, 3, 2): r"got 4 blocks of 3 \(size 12\)\. Use boft_n_butterfly_factor <= 1 with these blocks, or for 2 "
                    r"factors boft_block_size one of \[2, 6\]",
        (16, 16, 2): r"Use boft_n_butterfly_factor <= 1 with these blocks, or for 2 factors boft_block_size one of "
                     r"\[2, 4, 8\]",
        (12, 2, 3): r"Use boft_n_butterfly_factor <= 2 with these blocks; no block size gives 3 factors here \(the "
                    r"size would have to be a multiple of 8\)",
    }
    for (size, block_size, factors), message in cases.items():
        with pytest.raises(ValueError, match=message):
            get_peft_model(nn.Sequential(nn.Linear(size, 4)), BOFTConfig(boft_block_size=block_size,
                                                                         boft_n_butterfly_factor=factors,
                                                                         target_modules=["0"]))
    for size, block_size, factors in [(12, 3, 1), (12, 2, 2), (12, 6, 2), (16, 16, 1), (16, 8, 2)]:
        get_peft_model(nn.Sequential(nn.Linear(size, 4)), BOFTConfig(boft_block_size=block_size,
                                                                     boft_n_butterfly_factor=factors,
                                                                     target_modules=["0"]))
    with pytest.raises(ValueError, match="BOFT supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Embedding(4, 4)), BOFTConfig(target_modules=["0"]))


def test_half_precision_adapters_solve_their_blocks_in_float32():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8))
    model = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                           target_modules=["0"], init_weights=False))
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
        model.to(torch.bfloat16)  # adapters too: torch has no bf16 solve, so the blocks are solved in fp32
        assert model.get_base_model()[0].boft_R["default"].dtype == torch.bfloat16
        torch.testing.assert_close(model(x.bfloat16()).float(), want, atol=0.05, rtol=0.05)
        model.merge_adapter()
        torch.testing.assert_close(model(x.bfloat16()).float(), want, atol=0.05, rtol=0.05)


def test_unmerging_a_zero_scale_is_refused_rather_than_writing_infinities():
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)), BOFTConfig(boft_block_size=4, target_modules=["0"],
                                                                      init_weights=False))
    with torch.no_grad():
        model.get_base_model()[0].boft_s["default"][1] = 0.0
        model.merge_adapter()
        with pytest.raises(ValueError, match="output scale has zero entries.*reload the base weights"):
            model.unmerge_adapter()
    assert torch.isfinite(model.get_base_model()[0].base_layer.weight).all()


def test_peft_files_with_settings_only_its_cpu_path_accepts_load(tmp_path, peft_without_extension):
    """Without its extension peft takes boft_n_butterfly_factor=0 (and trains one factor); a
    dropout of 1 (a whole factor's blocks) is valid in both."""
    base = tiny_transformers_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=0,
                                                                     boft_dropout=1.0, target_modules=TARGETS,
                                                                     init_weights=False))
    p.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="boft_n_butterfly_factor=0, which peft without its CUDA extension"):
        ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].boft_dropout == 1.0
    ids = input_ids()
    torch.testing.assert_close(ours(input_ids=ids).logits, p.eval()(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("inner", [
    minipeft.RoadConfig(target_modules=["fc"], group_size=4, init_weights=False),
    minipeft.IA3Config(target_modules=["fc"], feedforward_modules=[], init_ia3_weights=False),
    minipeft.LoraConfig(r=2, target_modules=["fc"], lora_bias=True, init_lora_weights=False),
], ids=["road", "ia3 on outputs", "lora_bias"])
def test_the_output_scale_over_an_adapter_that_changes_the_bias_merges_as_it_computes(inner):
    # s scales the output less the bias of the layer inside, as that layer computes it: merging
    # the inner adapter (which writes that bias) or BOFT (which scales the rows) keeps the model.
    torch.manual_seed(0)
    base = nn.Sequential()
    base.fc = nn.Linear(8, 8)
    model = get_peft_model(base, inner, adapter_name="inner")
    model.add_adapter("boft", BOFTConfig(boft_block_size=4, target_modules=["fc"], init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_s" in name or ("lora_B" in name and "bias" in name):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model.set_adapter(["inner", "boft"])
    model.eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        unmerged = model(x)
        torch.testing.assert_close(model(x[0]), unmerged[0])  # an unbatched input too
        for names in (["inner"], ["boft"]):
            model.merge_adapter(names)
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.merge_and_unload()(x), unmerged, atol=1e-5, rtol=0)


def test_the_output_scale_over_another_adapter_takes_each_rows_bias_in_a_mixed_batch():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.fc = nn.Linear(8, 8)
    inner = minipeft.LoraConfig(r=2, target_modules=["fc"], lora_bias=True, init_lora_weights=False)
    model = get_peft_model(base, inner, adapter_name="inner")
    model.add_adapter("boft", BOFTConfig(boft_block_size=4, target_modules=["fc"], init_weights=False))
    model.eval()
    x, names = torch.randn(4, 8), ["inner", "boft", "boft", "__base__"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(x[i : i + 1])
            else:
                model.set_adapter(name)
                alone = model(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-6, rtol=0)

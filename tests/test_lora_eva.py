"""EVA (lora_eva.py): the incremental PCA against a PCA of all rows at once, the rank budget by
hand, and the whole initialisation against peft's (ranks, alphas, A, checkpoints both ways)."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import minipeft
from minipeft import EvaConfig, LoraConfig, get_eva_state_dict, get_peft_model, initialize_lora_eva_weights
from minipeft.tuners.lora_eva import IncrementalPCA, distribute_ranks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, for torchrun
from tests.models import VOCAB, tiny_transformers_model  # noqa: E402
from tests.two_processes import run_two_processes  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def lm_batches(count: int = 8, batch: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def eva_model(base, library=minipeft, batches=None, **eva):
    """``base`` with an EVA-initialised LoRA of ``library`` (peft or minipeft)."""
    config = library.LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva",
                                eva_config=library.EvaConfig(**eva))
    model = quietly(library.get_peft_model, copy.deepcopy(base), config)
    extra = {"show_progress_bar": False} if library is not minipeft else {}
    quietly(library.initialize_lora_eva_weights, model, batches or lm_batches(), **extra)
    return model


def a_matrices(model) -> dict[str, torch.Tensor]:
    """Each layer's A, by its name in the base model."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): m.lora_A["default"].weight.detach()
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


# -- the incremental PCA --------------------------------------------------------------------------
def test_incremental_pca_of_rows_of_rank_k_is_the_pca_of_all_rows_at_once():
    # Rows in a k-dimensional affine subspace: keeping k directions loses nothing, so the
    # incremental result is exact, whatever the batches.
    torch.manual_seed(0)
    k, d = 3, 20
    basis, offset = torch.randn(k, d), torch.randn(d) * 5
    rows = torch.randn(90, k) * torch.tensor([5.0, 2.0, 0.5]) @ basis + offset
    pca = IncrementalPCA(k)
    for batch in rows.split([10, 35, 20, 25]):
        pca.update(batch)
    _, s, vt = torch.linalg.svd(rows.double() - rows.double().mean(0), full_matrices=False)
    torch.testing.assert_close(pca.singular_values.double(), s[:k], rtol=1e-4, atol=1e-4)
    # the same directions, up to sign; and the largest entry of each made positive
    torch.testing.assert_close((pca.components.double() * vt[:k]).sum(1).abs(), torch.ones(k, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    assert (pca.components.gather(1, pca.components.abs().argmax(1, keepdim=True)) > 0).all()
    # all the variance is in the k directions
    torch.testing.assert_close(float(pca.explained_variance_ratio.sum()), 1.0, rtol=0, atol=1e-4)
    torch.testing.assert_close(pca.mean, rows.double().mean(0), rtol=0, atol=1e-9)


def test_incremental_pca_tracks_the_total_variance_of_all_rows_and_the_movement_of_its_directions():
    torch.manual_seed(1)
    rows = torch.randn(120, 8) * torch.arange(1, 9) + torch.randn(8)
    pca = IncrementalPCA(2)
    pca.update(rows[:40])
    assert pca.similarity is None and not pca.converged(1, tau=0.0)
    pca.update(rows[40:])
    centred = rows.double() - rows.double().mean(0)
    torch.testing.assert_close(pca.sum_sq, centred.square().sum(), rtol=1e-6, atol=0)  # (rows centred in fp32)
    torch.testing.assert_close(pca.explained_variance_ratio.double(),
                               pca.singular_values.double().square() / centred.square().sum(), rtol=1e-6, atol=0)
    # the two largest directions of variances 64 and 49 are the last two axes
    assert pca.components.abs().argmax(1).tolist() == [7, 6]
    assert pca.converged(0, tau=1.0) and pca.converged(2, tau=-1.0)


def test_the_rank_budget_goes_to_the_largest_ratios_over_all_layers():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.35, 0.01, 0.0]),
              "c": torch.tensor([0.02, 0.01, 0.0, 0.0])}
    # the 6 largest: a .5 .3 .1 .05, b .4 .35 -> c gets none
    assert distribute_ranks(ratios, 6) == {"a": 4, "b": 2, "c": 0}
    assert distribute_ranks(ratios, 2) == {"a": 1, "b": 1, "c": 0}
    # layers with equal inputs share their ratios: a tie goes to the one named first
    assert distribute_ranks({"q": torch.tensor([0.6, 0.2]), "k": torch.tensor([0.6, 0.2])}, 3) == {"q": 2, "k": 1}


# -- against peft ---------------------------------------------------------------------------------
@pytest.mark.parametrize("eva", [{}, {"rho": 1.0}, {"adjust_scaling_factors": False}, {"tau": 0.9}])
def test_eva_gives_peft_ranks_alphas_and_directions(eva):
    peft = pytest.importorskip("peft")
    base = tiny_transformers_model("llama")
    theirs, ours = eva_model(base, peft, **eva), eva_model(base, **eva)
    for field in ("rank_pattern", "alpha_pattern"):
        assert getattr(ours.peft_config["default"], field) == getattr(theirs.peft_config["default"], field), field
    if eva.get("rho") == 1.0:
        assert ours.peft_config["default"].rank_pattern == {}  # nothing moves
    else:
        assert ours.peft_config["default"].rank_pattern  # the test sees ranks move
    expected, got = a_matrices(theirs), a_matrices(ours)
    assert got.keys() == expected.keys()
    for name, a in expected.items():
        # the same randomised SVDs from the same seed, rounding apart
        torch.testing.assert_close(got[name], a, rtol=1e-4, atol=1e-5, msg=name)
    ids = lm_batches(1)[0]["input_ids"]
    with torch.no_grad():  # B = 0: both still compute the base model
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits)


def test_whitening_divides_each_direction_by_the_root_of_its_singular_value_once():
    peft = pytest.importorskip("peft")
    base = tiny_transformers_model("llama")
    plain, ours, theirs = eva_model(base), eva_model(base, whiten=True), eva_model(base, peft, whiten=True)
    plain, ours, theirs = a_matrices(plain), a_matrices(ours), a_matrices(theirs)
    for name, a in plain.items():
        # the same directions, each row's length now 1 / sqrt(s_i)
        torch.testing.assert_close(ours[name] / ours[name].norm(dim=1, keepdim=True), a, rtol=0, atol=1e-5)
        shared = name.endswith(("q_proj", "k_proj", "v_proj"))
        if not shared:  # a layer measured alone: as peft
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
        else:
            # peft divides the tensor q, k and v share in place, once for each of them whose rank
            # takes that row: (1 / sqrt(s_i))^times
            group = [name.rsplit(".", 1)[0] + "." + p for p in ("q_proj", "k_proj", "v_proj")]
            times = torch.tensor([sum(ours[m].shape[0] > i for m in group) for i in range(a.shape[0])])
            assert times.max() > 1
            torch.testing.assert_close(theirs[name].norm(dim=1), ours[name].norm(dim=1) ** times, rtol=1e-3, atol=0)


class TwoLayers(nn.Module):
    """``focused`` sees inputs in a 4-dimensional subspace, ``spread`` inputs along all 16
    directions: each of focused's directions explains about 1/4 of the variance of its inputs,
    each of spread's about 1/16, so EVA gives focused the whole budget (2 x 2) and spread none."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        basis, _ = torch.linalg.qr(torch.randn(16, 4))
        self.register_buffer("onto_subspace", basis @ basis.T)  # (16, 16), rank 4
        self.focused = nn.Linear(16, 16)
        self.spread = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.spread(h) + self.focused(h @ self.onto_subspace)


def test_a_layer_left_with_rank_0_loses_its_adapter_and_the_checkpoint_crosses_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TwoLayers()
    models = {}
    for library in (peft, minipeft):
        config = library.LoraConfig(r=2, target_modules=["focused", "spread"], init_lora_weights="eva",
                                    eva_config=library.EvaConfig(rho=2.0))
        model = quietly(library.get_peft_model, copy.deepcopy(base), config)
        extra = {"show_progress_bar": False} if library is not minipeft else {}
        quietly(library.initialize_lora_eva_weights, model, lm_batches(), **extra)
        models[library.__name__] = model
    ours, theirs = models["minipeft"], models["peft"]
    config = ours.peft_config["default"]
    assert config.rank_pattern == {"focused": 4} == theirs.peft_config["default"].rank_pattern
    assert config.alpha_pattern == {"focused": 16.0} == theirs.peft_config["default"].alpha_pattern
    assert config.target_modules == ["focused"] and set(theirs.peft_config["default"].target_modules) == {"focused"}
    assert type(ours.base_model.model.spread) is nn.Linear  # unwrapped
    torch.testing.assert_close(a_matrices(ours)["focused"], a_matrices(theirs)["focused"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        ours.base_model.model.focused.lora_B["default"].weight.normal_()
    ids = lm_batches(1)[0]["input_ids"]
    ours.save_pretrained(tmp_path / "mini")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(loaded(ids), ours(ids))
    back = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mini")
    torch.testing.assert_close(back(ids), ours(ids))
    assert back.peft_config["default"].eva_config == EvaConfig(rho=2.0)


def test_a_state_dict_measured_on_the_base_model_starts_the_peft_model_the_same():
    base = tiny_transformers_model("llama")
    config = LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva")
    state = get_eva_state_dict(copy.deepcopy(base), lm_batches(), peft_config=config)
    assert set(state) == {f"model.layers.{i}.{p}.{t}" for i in (0, 1) for p, t in
                          [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                           ("self_attn", "o_proj"), ("mlp", "up_proj")]}
    model = quietly(get_peft_model, copy.deepcopy(base), config)
    quietly(initialize_lora_eva_weights, model, eva_state_dict=state)
    reference = eva_model(base)
    assert model.peft_config["default"].rank_pattern == reference.peft_config["default"].rank_pattern
    for name, a in a_matrices(reference).items():
        torch.testing.assert_close(a_matrices(model)[name], a, rtol=0, atol=0)


def test_tokens_the_masks_leave_out_change_nothing():
    base = tiny_transformers_model("llama")
    config = LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva")
    batches = lm_batches()
    for b in batches:
        b["labels"] = b["input_ids"].clone()
        b["labels"][:, -4:] = -100  # the last tokens: in a causal model, nothing before them sees them
    changed = copy.deepcopy(batches)
    for b in changed:
        b["input_ids"][:, -4:] = (b["input_ids"][:, -4:] + 7) % VOCAB
    same = [get_eva_state_dict(base, data, peft_config=config) for data in (batches, changed)]
    for name in same[0]:
        torch.testing.assert_close(same[1][name], same[0][name], rtol=0, atol=0)
    unmasked = get_eva_state_dict(base, changed, peft_config=LoraConfig(
        r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva", eva_config=EvaConfig(use_label_mask=False)))
    assert any(not torch.equal(unmasked[n], same[0][n]) for n in same[0] if unmasked[n].shape == same[0][n].shape)


def test_a_resized_adapter_keeps_the_layer_mode_grad_and_other_adapters():
    base = tiny_transformers_model("llama")
    model = quietly(get_peft_model, copy.deepcopy(base), LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                                                     init_lora_weights="eva"))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["o_proj"]))
    o_proj = model.base_model.model.model.layers[1].self_attn.o_proj
    other = o_proj.lora_A["other"].weight.detach().clone()
    model.eval()
    quietly(initialize_lora_eva_weights, model, lm_batches())
    assert o_proj.r["default"] != 4  # resized (6 here, as peft)
    assert o_proj.lora_A["default"].weight.requires_grad and not o_proj.lora_A["other"].weight.requires_grad
    assert not any(m.training for m in o_proj.modules())
    assert o_proj.active_adapters == ["default"] and torch.equal(o_proj.lora_A["other"].weight, other)
    assert o_proj.scaling["default"] == 8 / 4  # alpha grew with the rank


# -- refusals -------------------------------------------------------------------------------------
def test_eva_refuses_what_it_cannot_do():
    base = tiny_transformers_model("llama")
    plain = quietly(get_peft_model, copy.deepcopy(base), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match=r"not made for EVA \(init_lora_weights=True\).*init_lora_weights='eva'"):
        initialize_lora_eva_weights(plain, lm_batches())
    with pytest.raises(TypeError, match="starts the adapter of a PeftModel"):
        initialize_lora_eva_weights(base, lm_batches())
    model = quietly(get_peft_model, copy.deepcopy(base), LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                                                     init_lora_weights="eva"))
    with pytest.raises(ValueError, match="needs a dataloader to measure on, or an eva_state_dict"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="the dataloader gave no batch"):
        initialize_lora_eva_weights(model, [])
    with pytest.raises(TypeError, match="reads the data more than once .* not a generator"):
        initialize_lora_eva_weights(model, (b for b in lm_batches()))
    model.peft_config["default"].eva_config.tau = 1.0
    with pytest.raises(ValueError, match="with tau=1.0 none ever does"):
        initialize_lora_eva_weights(model, lm_batches())
    model.peft_config["default"].eva_config.tau = 0.99
    with pytest.raises(ValueError, match=r"names \['lm_head'\], which hold no LoRA linear layer.*model.layers.0"):
        initialize_lora_eva_weights(model, eva_state_dict={"lm_head": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match=r"must be \(rank, 32\).*got \(2, 31\)"):
        initialize_lora_eva_weights(model, eva_state_dict={"model.layers.0.mlp.up_proj": torch.zeros(2, 31)})
    # r * rho = 8 directions, and every batch keeps 2 tokens a sample: 4 rows
    short = lm_batches(3, batch=2)
    for b in short:
        b["attention_mask"][:, 2:] = 0
    with pytest.raises(ValueError, match=r"could not measure .*model.layers.0.self_attn.q_proj.*the \[8"):
        initialize_lora_eva_weights(model, short)

    class Reread:  # re-iterable, but without a length: the stall is noticed all the same
        def __iter__(self):
            return iter(short)

    with pytest.raises(ValueError, match=r"could not measure"):
        initialize_lora_eva_weights(model, Reread())
    with pytest.raises(ValueError, match=r"prepare_layer_inputs_fn names \['q_proj'\], which EVA does not measure"):
        initialize_lora_eva_weights(model, lm_batches(), prepare_layer_inputs_fn={"q_proj": lambda *a: a[0][0]})
    with pytest.raises(TypeError, match="reads a batch as a dict with 'input_ids'"):
        initialize_lora_eva_weights(model, [torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="needs its peft_config"):
        get_eva_state_dict(base, lm_batches())
    for kwargs, match in [({"rho": 0.5}, "rho must be a number >= 1"), ({"tau": 1.5}, "tau must be a cosine")]:
        with pytest.raises(ValueError, match=match):
            EvaConfig(**kwargs)
    with pytest.raises(ValueError, match=r"eva_config has no field \['rh'\]; EvaConfig's fields are \['rho'"):
        LoraConfig(init_lora_weights="eva", eva_config={"rh": 2})


def test_callbacks_written_for_peft_work_here():
    base = tiny_transformers_model("llama")
    config = LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva")
    reference = get_eva_state_dict(base, lm_batches(), peft_config=config)

    def peft_style(layer_input, model_input, layer_name):  # peft's default, written out
        return layer_input[0][model_input.T.unbind()]

    def whole_batch(layer_input, model_input, layer_name):  # prepare_model_inputs_fn=None: the batch itself
        assert set(model_input) == {"input_ids", "attention_mask"}
        return layer_input[0].reshape(-1, layer_input[0].shape[-1])

    q = "base_model.model.model.layers.0.self_attn.q_proj"  # peft's names for a dict's keys
    for kwargs in [dict(prepare_layer_inputs_fn=peft_style),
                   dict(prepare_model_inputs_fn=None, prepare_layer_inputs_fn=whole_batch),
                   dict(prepare_layer_inputs_fn={q: peft_style})]:
        got = get_eva_state_dict(base, lm_batches(), peft_config=config, **kwargs)
        for name, a in reference.items():  # every token counts in both: the same A
            torch.testing.assert_close(got[name], a, rtol=0, atol=0, msg=name)


def test_a_layer_that_never_runs_or_never_varies_is_handled():
    # nn.MultiheadAttention reads its out_proj's weight itself: that layer never runs, is not
    # measured, and keeps the init of True.
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return self.fc(self.attn(h, h, h)[0])

    torch.manual_seed(0)
    model = quietly(get_peft_model, Attention(), LoraConfig(r=2, target_modules=["attn", "fc"], init_lora_weights="eva"))
    with pytest.warns(UserWarning, match=r"EVA did not measure \['attn', 'attn.out_proj'\]"):
        initialize_lora_eva_weights(model, lm_batches())
    assert model.base_model.model.fc.r["default"] == 2  # the budget is the measured layers' alone
    assert model.base_model.model.attn.base_layer.out_proj.r["default"] == 2
    # inputs that never vary explain no variance (not 0 / 0): the other layer takes the budget
    pca = IncrementalPCA(2)
    pca.update(torch.ones(5, 3))
    pca.update(torch.ones(5, 3))
    assert pca.explained_variance_ratio.tolist() == [0.0, 0.0]


def test_started_again_the_adapter_is_new_and_user_patterns_of_other_layers_stay(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_transformers_model("llama")
    config = dict(r=4, target_modules=["q_proj", "o_proj", "embed_tokens"], init_lora_weights="eva",
                  rank_pattern={"embed_tokens": 2, "o_proj": 6}, alpha_pattern={"embed_tokens": 3.0})
    model = quietly(get_peft_model, copy.deepcopy(base), LoraConfig(**config))
    with torch.no_grad():  # as if trained: B no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_()
    quietly(initialize_lora_eva_weights, model, lm_batches())
    ids = lm_batches(1)[0]["input_ids"]
    embed = model.base_model.model.model.embed_tokens
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        embed.lora_embedding_A["default"].zero_()  # (LoRA on an embedding is EVA's to leave alone)
        torch.testing.assert_close(model(input_ids=ids).logits, plain)  # B = 0 on every measured layer
        embed.lora_embedding_A["default"].normal_()
    saved = model.peft_config["default"]
    assert embed.r["default"] == 2 and saved.rank_pattern["embed_tokens"] == 2
    assert saved.alpha_pattern["embed_tokens"] == 3.0
    model.save_pretrained(tmp_path)
    for library in (minipeft, peft):
        loaded = quietly(library.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, msg=library.__name__)


def test_the_measured_rank_wins_over_a_users_pattern_of_the_same_name():
    torch.manual_seed(0)
    base = TwoLayers()
    config = LoraConfig(r=2, target_modules=["focused", "spread"], init_lora_weights="eva",
                        rank_pattern={"focused": 2, "spread": 3})
    model = quietly(get_peft_model, copy.deepcopy(base), config)
    quietly(initialize_lora_eva_weights, model, lm_batches(), show_progress_bar=False)  # (peft's keyword)
    # the budget is 2 + 3; focused takes its most, 2 * rho = 4, and each layer's entry is the measured one
    assert model.peft_config["default"].rank_pattern == {"focused": 4, "spread": 1}
    assert model.peft_config["default"].alpha_pattern == {"focused": 8 * 4 / 2, "spread": 8 * 1 / 3}
    assert model.base_model.model.focused.lora_A["default"].weight.shape == (4, 16)
    assert model.base_model.model.spread.lora_A["default"].weight.shape == (1, 16)


def test_eva_config_is_saved_as_peft_saves_it_and_read_back():
    config = LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5, "whiten": True})
    assert config.eva_config == EvaConfig(rho=1.5, whiten=True)
    assert config.to_dict()["eva_config"] == {"rho": 1.5, "tau": 0.99, "use_label_mask": True,
                                              "label_mask_value": -100, "whiten": True, "adjust_scaling_factors": True}
    assert LoraConfig.from_dict(config.to_dict()) == config
    assert LoraConfig(init_lora_weights="eva").eva_config == EvaConfig()
    with pytest.warns(UserWarning, match="eva_config is used by init_lora_weights='eva' only"):
        LoraConfig(eva_config=EvaConfig())
    with pytest.raises(ValueError, match="EvaConfig.whiten must be True or False, not 'no'"):
        EvaConfig(whiten="no")
    with pytest.raises(ValueError, match="EvaConfig.rho must be a number >= 1"):
        EvaConfig(rho=float("inf"))
    # a newer peft's field inside eva_config: loaded without it, with a warning (it only steered the start)
    saved = {**config.to_dict(), "eva_config": {**config.to_dict()["eva_config"], "future_knob": None}}
    with pytest.warns(UserWarning, match=r"eva_config holds \['future_knob'\], which EvaConfig does not know"):
        assert minipeft.PeftConfig.from_dict(saved) == config


# -- torch.distributed ----------------------------------------------------------------------------
def test_two_ranks_measure_their_batches_together(tmp_path):
    """Each of two processes reads half of every batch; gathered, both compute the A one process
    computes on the whole batches."""
    run_two_processes(__file__, str(tmp_path))
    whole = get_eva_state_dict(tiny_transformers_model("llama"), lm_batches(), peft_config=LoraConfig(
        r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(got[name], whole[name], rtol=0, atol=1e-5, msg=name)


def _distributed_worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    halves = [{k: v.chunk(2)[rank] for k, v in b.items()} for b in lm_batches()]
    state = get_eva_state_dict(tiny_transformers_model("llama"), halves, peft_config=LoraConfig(
        r=4, target_modules=LLAMA_TARGETS, init_lora_weights="eva"))
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    _distributed_worker(sys.argv[1])

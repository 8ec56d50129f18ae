"""add_weighted_adapter's task-arithmetic types: ties, dare_linear, dare_ties, magnitude_prune and
their _svd variants (the math in minipeft/tuners/task_arithmetic.py).

References: peft itself on the same base model and adapter weights, for every type. The dare
types draw random masks; minipeft draws them from the global generator in peft's order (after the
new adapter's random init, layer by layer, A's before B's, each update in the layout the base
stores it), so under one torch.manual_seed both give the same adapter, and leave the generator in
the same state. By hand: a worked TIES example (both sign methods), magnitude pruning's count and
choice, DARE's mask statistics (kept fraction, rescale, unbiasedness), density 1 and a single
source, and the rank and option errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import minipeft
from minipeft import LoraConfig, get_peft_model
from minipeft.tuners import task_arithmetic
from minipeft.tuners.lora import LoraLayer
from tests.models import TinyNet, randomize_adapters, tiny_transformers_model

peft = pytest.importorskip("peft")

NAMES = ["default", "b", "c"]
WEIGHTS = [0.7, -1.3, 0.9]  # a negative weight: subtracting an adapter is allowed
TARGETS = {
    # every layer type peft's _svd path handles (not its nn.Conv1d: it skips flattening the kernel)
    "tinynet": (lambda: TinyNet().eval(), dict(target_modules=["fc1", "fc2", "embed", "conv2d"])),
    # GPT-2's Conv1D stores the update transposed, (in, out): the layout peft prunes it in
    "gpt2": (lambda: tiny_transformers_model("gpt2"), dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"])),
    "llama": (lambda: tiny_transformers_model("llama"), dict(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"])),
}


def build(base, configs: list[dict]):
    """(peft model, minipeft model) holding adapters NAMES[:len(configs)], peft's random weights in both."""
    models = []
    for library in (peft, minipeft):
        model = library.get_peft_model(copy.deepcopy(base), library.LoraConfig(**configs[0]))
        for name, config in zip(NAMES[1:], configs[1:]):
            model.add_adapter(name, library.LoraConfig(**config))
        models.append(model)
    randomize_adapters(models[0])
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models


def new_adapter_tensors(model, name="mix"):
    return {k: v for k, v in model.state_dict().items() if f".{name}" in k}


def lora_layers(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


# -- against peft -------------------------------------------------------------------------------
TYPES = ["ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd", "magnitude_prune",
         "magnitude_prune_svd"]
PARITY = [
    # (arch, combination_type, number of sources, majority_sign_method, density)
    *[("tinynet", kind, 2, "total", 0.4) for kind in TYPES],
    # three sources, so that "frequency" (a vote) and "total" (a sum) elect different signs
    *[("tinynet", kind, 3, "frequency", 0.6) for kind in ("ties", "ties_svd", "dare_ties", "dare_ties_svd")],
    *[("gpt2", kind, 2, "total", 0.5) for kind in ("ties", "dare_linear_svd")],  # few: its SVDs are slow on CPU
    ("llama", "dare_ties_svd", 3, "total", 0.3),
    ("llama", "magnitude_prune", 2, "total", 1.0),  # density 1: no pruning (and no warning needed)
]


@pytest.mark.parametrize("arch, combination_type, sources, majority_sign_method, density", PARITY)
def test_new_adapter_matches_peft(arch, combination_type, sources, majority_sign_method, density):
    make, targets = TARGETS[arch]
    # Per-source scalings differ (rsLoRA, alphas); the factor types need one rank, "_svd" any.
    configs = [dict(targets, r=4, lora_alpha=8), dict(targets, r=4, lora_alpha=3, use_rslora=True),
               dict(targets, r=2 if combination_type.endswith("svd") else 4, lora_alpha=2)][:sources]
    peft_model, mini_model = build(make(), configs)
    after = []
    for model in (peft_model, mini_model):
        torch.manual_seed(1234)
        model.add_weighted_adapter(
            NAMES[:sources], WEIGHTS[:sources], "mix", combination_type=combination_type, density=density,
            majority_sign_method=majority_sign_method,
        )
        after.append(torch.rand(4))  # the generator is left where peft leaves it
    expected, got = new_adapter_tensors(peft_model), new_adapter_tensors(mini_model)
    assert got.keys() == expected.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(after[1], after[0], atol=0, rtol=0)
    assert mini_model.peft_config["mix"].r == peft_model.peft_config["mix"].r


def test_svd_variant_options_match_peft():
    """ties_svd with sources of different ranks, a chosen svd_rank, clamping and a reduced SVD."""
    _, targets = TARGETS["llama"]
    configs = [dict(targets, r=4, lora_alpha=8), dict(targets, r=2, lora_alpha=2)]
    peft_model, mini_model = build(tiny_transformers_model("llama"), configs)
    options = dict(combination_type="ties_svd", density=0.5, svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)
    for model in (peft_model, mini_model):
        model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "mix", **options)
    expected = new_adapter_tensors(peft_model)
    for key, value in expected.items():
        torch.testing.assert_close(new_adapter_tensors(mini_model)[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert mini_model.peft_config["mix"].r == 3


def test_dare_depends_on_the_seed():
    """The parity above is not vacuous: another seed draws other masks."""
    _, targets = TARGETS["tinynet"]
    model = two_adapters(targets)
    results = []
    for seed, name in [(1, "x"), (2, "y"), (1, "z")]:
        torch.manual_seed(seed)
        model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], name, combination_type="dare_linear", density=0.5)
        results.append(model.base_model.model.blocks[0]["fc1"].lora_A[name].weight.detach().clone())
    assert not torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# -- the math by hand ---------------------------------------------------------------------------
# Three task vectors of four entries, density 0.5: each keeps its two largest |entries|.
TAUS = [torch.tensor([4.0, -1.0, 2.0, 1.0]), torch.tensor([-3.0, 2.0, 3.5, -6.0]), torch.tensor([-2.0, -3.0, -7.0, 4.0])]
TRIMMED = [[4.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.5, -6.0], [0.0, 0.0, -7.0, 4.0]]
TIES_WEIGHTS = [1.0, 2.0, 0.5]


def test_magnitude_pruning_keeps_the_largest_entries():
    assert [task_arithmetic.prune_by_magnitude(t, 0.5).tolist() for t in TAUS] == TRIMMED
    # k = int(density * numel), rounded down as peft does: 0.29 * 100 = 28.999... keeps 28
    tau = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)
    kept = task_arithmetic.prune_by_magnitude(tau, 0.29)
    assert torch.equal(kept[:72], torch.zeros(72)) and torch.equal(kept[72:], tau[72:])
    assert torch.equal(task_arithmetic.prune_by_magnitude(tau, 1.0), tau)


@pytest.mark.parametrize(
    "method, signs, merged",
    [
        # total: sign of the summed trimmed entries, [4, 0, -1.5, -2] -> [+, + (tie), -, -]
        ("total", [1.0, 1.0, -1.0, -1.0], [1 * 4.0, 0.0, 0.5 * -7.0, 2 * -6.0]),
        # frequency: sign of the vote, [+1, 0, +1, 0] -> all +; entry 2 averages 1*2 and 2*3.5
        ("frequency", [1.0, 1.0, 1.0, 1.0], [1 * 4.0, 0.0, (1 * 2.0 + 2 * 3.5) / 2, 0.5 * 4.0]),
    ],
)
def test_ties_by_hand(method, signs, merged):
    trimmed = torch.tensor(TRIMMED)
    assert task_arithmetic.elect_sign(trimmed, method).tolist() == signs
    assert task_arithmetic.ties(TAUS, TIES_WEIGHTS, 0.5, method).tolist() == merged
    # the same from peft's merge utilities
    expected = peft.utils.merge_utils.ties(TAUS, torch.tensor(TIES_WEIGHTS), 0.5, method)
    assert expected.tolist() == merged


def test_magnitude_prune_by_hand():
    # sum_i w_i trim(tau_i) = [4, 0, 2 + 7 - 3.5, -12 + 2]
    assert task_arithmetic.magnitude_prune(TAUS, TIES_WEIGHTS, 0.5).tolist() == [4.0, 0.0, 5.5, -10.0]


def test_dare_mask_statistics():
    """DARE keeps each entry with probability p and divides it by p: over 200,000 entries the kept
    fraction is p (within 5 binomial standard deviations), every entry is 0 or tau / p, and the
    mean over 2,000 independent draws of each of 100 entries is tau (within 5 standard errors)."""
    p, n = 0.3, 200_000
    tau = torch.randn(n, generator=torch.Generator().manual_seed(0)).abs() + 0.1  # no zeros
    torch.manual_seed(0)
    pruned = task_arithmetic.prune_at_random(tau, p)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(pruned[kept], tau[kept] / p)

    draws, tau = 2_000, torch.linspace(-2.0, 2.0, 100)
    mean = task_arithmetic.prune_at_random(tau.expand(draws, -1).contiguous(), p).mean(dim=0)
    standard_error = tau.abs() * math.sqrt((1 - p) / p / draws)  # std of m * tau / p is |tau| sqrt((1-p)/p)
    assert torch.all((mean - tau).abs() <= 5 * standard_error + 1e-6)


def two_adapters(targets, second_rank=4, **second):
    model = get_peft_model(TinyNet().eval(), LoraConfig(r=4, lora_alpha=8, **targets))
    model.add_adapter("b", LoraConfig(r=second_rank, lora_alpha=3, use_rslora=True, **targets, **second))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("combination_type, unpruned", [("dare_linear_svd", "svd"), ("magnitude_prune", "linear")])
def test_density_one_prunes_nothing_and_draws_nothing(combination_type, unpruned):
    model = two_adapters(dict(target_modules=["fc1", "fc2", "embed"]))
    after = []
    for kind, name, density in [(combination_type, "pruned", 1.0), (unpruned, "plain", None)]:
        torch.manual_seed(0)
        model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], name, combination_type=kind, density=density)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("pruned"), layer.delta_weight("plain"), atol=0, rtol=0)


def test_a_single_source_is_scaled_not_pruned():
    """peft combines a single adapter "linear", whatever the type: exactly w * its update."""
    model = two_adapters(dict(target_modules=["fc1", "conv2d"]))
    model.add_weighted_adapter(["b"], [-0.5], "scaled", combination_type="ties", density=0.1)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("scaled"), -0.5 * layer.delta_weight("b"), atol=1e-6, rtol=0)


def test_svd_variants_take_any_ranks():
    model = two_adapters(dict(target_modules=["fc1"]), second_rank=2)
    model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "mix", combination_type="magnitude_prune_svd", density=0.5)
    assert model.peft_config["mix"].r == 4  # the largest rank


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(combination_type="ties", density=0.5),
         r"'ties' needs adapters of one rank, got \{'default': 4, 'b': 2\}.*use 'ties_svd'"),
        (dict(combination_type="dare_linear", density=0.5), r"'dare_linear' needs adapters of one rank"),
        (dict(combination_type="magnitude_prune", density=0.5), r"'magnitude_prune' needs adapters of one rank"),
        (dict(combination_type="ties_svd"), r"'ties_svd' keeps a fraction `density`.*in \(0, 1\].*got None"),
        (dict(combination_type="dare_ties_svd", density=0), r"density as a number in \(0, 1\].*got 0"),
        (dict(combination_type="dare_linear_svd", density=1.5), r"got 1.5"),
        (dict(combination_type="magnitude_prune_svd", density=float("nan")), r"got nan"),
        (dict(combination_type="ties_svd", density=True), r"got True"),
        (dict(combination_type="ties_svd", density=0.5, majority_sign_method="mean"),
         r"majority_sign_method must be one of \['total', 'frequency'\].*got 'mean'"),
        (dict(combination_type="dare_ties_svd", density=0.5, majority_sign_method="Total"), r"got 'Total'"),
        # found while computing the factors, after the new adapter went in: still rolled back
        (dict(combination_type="ties_svd", density=0.5, svd_driver="gesvdj"), r"only supported on CUDA"),
    ],
)
def test_errors_leave_the_model_unchanged(kwargs, match):
    model = two_adapters(dict(target_modules=["fc1", "embed"]), second_rank=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "x", **kwargs)
    assert list(model.peft_config) == NAMES[:2]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_factor_types_refuse_a_layer_whose_ranks_differ():
    """Both adapters have rank 4, but "b" has rank 2 on fc2 (rank_pattern): ties would stack
    factors of two shapes there (peft fails inside torch.stack). "linear" zero-pads instead."""
    model = two_adapters(dict(target_modules=["fc1", "fc2"]), rank_pattern={"fc2": 2})
    with pytest.raises(ValueError, match=r"one rank in every layer; in '.*blocks.0.fc2' .*\{'default': 4, 'b': 2\}"):
        model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "x", combination_type="ties", density=0.5)
    assert list(model.peft_config) == NAMES[:2]
    model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "x", combination_type="ties_svd", density=0.5)


def test_options_a_type_does_not_use_are_ignored_as_in_peft():
    model = two_adapters(dict(target_modules=["fc1"]))
    model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "plain", combination_type="cat")
    model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "x", combination_type="cat", density=7, majority_sign_method="?")
    model.add_weighted_adapter(NAMES[:2], WEIGHTS[:2], "y", combination_type="dare_linear", density=0.5,
                               majority_sign_method="?")  # no sign election in dare_linear
    layer = model.base_model.model.blocks[0]["fc1"]
    torch.testing.assert_close(layer.delta_weight("x"), layer.delta_weight("plain"), atol=0, rtol=0)

"""minipeft.kernels.lora_linear against a float64 pure-PyTorch reference.

The kernels run on CPU tensors through Triton's interpreter, so this file needs no GPU.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

# TRITON_INTERPRET=1 must be set before triton is first imported: triton.jit decides at
# decoration time, for our kernels and for triton's own tl.zeros, tl.rand, ..., whether they
# are compiled for a GPU or interpreted on the CPU with numpy. In a full test run another
# module may have imported triton already (`import peft` does, through torch); then it is too
# late in this process, and test_in_fresh_interpreter reruns this file in a new one instead.
TOO_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not TOO_LATE:
    os.environ["TRITON_INTERPRET"] = "1"

from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import minipeft.kernels as kernels  # noqa: E402
import minipeft.kernels.fused_lora as impl  # noqa: E402

interpreted = pytest.mark.skipif(TOO_LATE, reason="triton was imported first; see test_in_fresh_interpreter")


@pytest.mark.skipif(not TOO_LATE, reason="this process interprets the kernels itself")
def test_in_fresh_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


from tests.kernel_checks import (  # noqa: E402
    PATHS, TOL, check_against_reference, make_inputs, reference, rel_err, tf32_allowed,
)


def test_the_hosts_grid_arithmetic_is_tritons():
    # Plain Python in place of triton's constexpr functions (host time): the same numbers.
    import triton

    assert [impl._next_power_of_2(n) for n in range(5000)] == [triton.next_power_of_2(n) for n in range(5000)]
    assert all(impl._cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 70))


@interpreted
@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 70),
    K=st.integers(1, 70),
    N=st.integers(1, 70),
    r=st.sampled_from([1, 2, 5, 16, 17, 40, 64, 65, 130]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    scaling=st.sampled_from([0.5, 2.0]),
    path=st.sampled_from(PATHS),
)
def test_matches_float64_reference(lead, K, N, r, dtype, bias, layout, p, scaling, path):
    assume(path != "few rows" or impl.use_few_rows(torch.Size(lead).numel(), r, dtype))
    check_against_reference(lead, K, N, r, dtype, bias, layout, p, scaling, path)


@interpreted
@pytest.mark.parametrize("path, dtype", [(path, dtype) for path in PATHS
                                         for dtype in (torch.float32, torch.bfloat16, torch.float16)
                                         if path != "few rows" or dtype != torch.float32])  # few rows: 16-bit
def test_ragged_shapes_every_dtype(dtype, path):
    # Fixed cases next to the random ones: edges in every block dimension, r = 1, K < block;
    # the few-rows route takes at most 32 rows.
    rows = [(3, 7), (30,)] if path == "few rows" else [(3, 37), (70,)]
    check_against_reference(rows[0], 45, 29, 1, dtype, True, "strided", 0.0, 2.0, path)
    check_against_reference(rows[1], 5, 33, 8, dtype, False, "transposed", 0.25, 0.5, path)


@interpreted
@pytest.mark.parametrize("path", ["triton GEMM", "cuBLAS base"])  # the few-rows route takes 1 to 32 rows
def test_an_empty_batch(path):
    # No rows (an empty micro-batch): y is (0, N), dx (0, K), and dA, dB are zero.
    check_against_reference((0,), 40, 24, 4, torch.float32, True, "contiguous", 0.1, 2.0, path)
    check_against_reference((2, 0), 40, 24, 4, torch.bfloat16, False, "strided", 0.0, 2.0, path)


@interpreted
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("needs_grad", ["x", "A", "B", "x B", "A B"])
def test_only_the_gradients_asked_for(needs_grad, path):
    # dx and dA come from one kernel (the dx GEMM, or the backward's low-rank pass), which
    # must compute each alone too.
    dtype = torch.bfloat16 if path == "few rows" else torch.float32  # few rows: 16-bit only
    check_against_reference((3, 10), 40, 36, 5, dtype, True, "strided", 0.25, 2.0, path, needs_grad)


@interpreted
@pytest.mark.parametrize("cublas_without_dropout", [True, False])
@pytest.mark.parametrize("dx_gemm_first", [True, False])
@pytest.mark.parametrize("needs_grad", ["x A B", "A B", "x B"])
def test_the_backward_without_dropout_either_way(cublas_without_dropout, dx_gemm_first, needs_grad):
    # Without dropout on the cuBLAS route, dx's low-rank part and dA are cuBLAS products
    # (CUBLAS_WITHOUT_DROPOUT) or our pass: each in either order of dy W, and for dx or dA alone.
    passes = []
    pass_itself = impl._lowrank_grads

    def counted(*args, **kwargs):
        passes.append(1)
        return pass_itself(*args, **kwargs)

    with mock.patch.object(impl, "CUBLAS_WITHOUT_DROPOUT", cublas_without_dropout), \
            mock.patch.object(impl, "DX_GEMM_FIRST", dx_gemm_first), mock.patch.object(impl, "_lowrank_grads", counted):
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference((3, 13), 40, 36, 5, dtype, True, "strided", 0.0, 2.0, "cuBLAS base", needs_grad)
    assert len(passes) == (0 if cublas_without_dropout else 2)


@interpreted
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(p):
    kept = torch.stack([kernels.dropout_mask(seed, (16, 128), p).float().mean() for seed in range(100)])
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    # Different seeds draw different masks; the same seed draws the same one.
    assert not torch.equal(kernels.dropout_mask(0, (16, 128), p), kernels.dropout_mask(1, (16, 128), p))
    assert torch.equal(kernels.dropout_mask(7, (16, 128), p), kernels.dropout_mask(7, (16, 128), p))


@interpreted
def test_the_kept_elements_are_scaled_by_the_rate_the_mask_drops_at():
    # The 16-bit coins drop at p rounded down to a multiple of 2**-16; scaling by 1 / (1 - p)
    # itself would bias the expectation. A rate below 2**-16 drops nothing and scales nothing.
    assert kernels.dropout_rate(0.3) == 19660 / 65536 and kernels.dropout_rate(1e-5) == 0.0
    x, lora_A = torch.randn(40, 64), torch.randn(3, 64)
    assert torch.equal(kernels.dropout_mask(5, x.shape, 1e-5), torch.ones(x.shape, dtype=torch.bool))
    assert rel_err(impl._shrink(x, lora_A, 1e-5, 5), x.double() @ lora_A.double().t()) < 1e-6


@interpreted
def test_backward_redraws_the_forward_mask():
    # dA = dxa^T (D * x / (1 - p)) depends on D directly: it matches the reference built with
    # the forward's mask, and would not with any other mask.
    p, seed = 0.5, 42
    x, weight, b, lora_A, lora_B = make_inputs((24,), 40, 24, 4, torch.float32)
    lora_A.requires_grad_(True)
    kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, p, seed=seed).sum().backward()

    def reference_dA(mask_seed):
        A64 = lora_A.detach().double().requires_grad_(True)
        mask = kernels.dropout_mask(mask_seed, x.shape, p).double()
        reference(x.double(), weight.double(), b.double(), A64, lora_B.double(), 1.0, mask, p).sum().backward()
        return A64.grad

    assert rel_err(lora_A.grad, reference_dA(seed)) < 1e-5
    assert rel_err(lora_A.grad, reference_dA(seed + 1)) > 0.1


@interpreted
def test_the_seed_is_drawn_on_the_cpu_whatever_the_default_device():
    # Without a seed, each call draws one from the CPU generator and reads it as an int. Drawn on
    # the default device instead (torch.set_default_device("cuda"), common in LLM code), that
    # read would wait for the GPU on every call; on the meta device it cannot be read at all.
    x, weight, b, lora_A, lora_B = make_inputs((6,), 16, 12, 2, torch.float32)
    torch.manual_seed(3)
    expected = kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.5)
    torch.manual_seed(3)
    with torch.device("meta"):
        y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.5)
    assert torch.equal(y, expected)


@interpreted
@pytest.mark.parametrize("config", impl._shrink_configs(interpreted=False), ids=str)
def test_every_gpu_shrink_tile_draws_the_same_mask(config):
    # The GPU's shrink tiles (16 to 64 rows, K steps of 128 or 256), through the interpreter:
    # whatever tile the autotuner picks, xa is (D * x) A^T / (1 - p) with the mask that
    # dropout_mask() and the backward draw, here over ragged rows and K (70 x 300).
    p, seed = 0.3, 11
    x = torch.randn(70, 300)
    lora_A = torch.randn(5, 300)
    with mock.patch.object(impl, "_shrink_tuned", impl._autotuned_shrink([config])):
        xa = impl._shrink(x, lora_A, p, seed)
    mask = kernels.dropout_mask(seed, x.shape, p).double()
    assert rel_err(xa, (mask * x.double() / (1 - kernels.dropout_rate(p))) @ lora_A.double().t()) < 1e-5


@interpreted
@pytest.mark.parametrize("config", impl._lowrank_grad_configs(interpreted=False), ids=str)
@pytest.mark.parametrize("r, add", [(5, False), (5, True), (130, True)])
def test_every_gpu_lowrank_grad_tile(config, r, add):
    # The backward's low-rank pass in each of the GPU's tiles, through the interpreter: 1100
    # rows span several programs of every config (their partial dA sums meet in the atomics)
    # and end inside a row block; rank 130 pads to 256 and narrows the columns to 16. With
    # `add`, dx already holds dy W (here random) and the pass adds onto it.
    p, seed = 0.3, 11
    x = torch.randn(1100, 40)
    dxa, lora_A = torch.randn(1100, r), torch.randn(r, 40)
    dy_w = torch.randn(1100, 40) if add else torch.zeros(1100, 40)
    with mock.patch.object(impl, "_lowrank_grad_tuned", impl._autotuned_lowrank_grad([config])):
        dx, da = impl._lowrank_grads(dxa, lora_A, x, p, seed, want_dx=True, want_da=True,
                                     add_to=dy_w.clone() if add else None)
    dropped = kernels.dropout_mask(seed, x.shape, p).double() / (1 - kernels.dropout_rate(p))
    assert rel_err(dx, dy_w.double() + dropped * (dxa.double() @ lora_A.double())) < 1e-5
    assert rel_err(da, dxa.double().t() @ (dropped * x.double())) < 1e-5


@interpreted
@pytest.mark.parametrize("config", impl._few_rows_configs(interpreted=False), ids=str)
def test_every_gpu_few_rows_tile(config):
    # The decoding forward in each of the GPU's tiles, through the interpreter, over ragged
    # columns (N = 300) and K: 700 is 3 to 6 K steps, so with 4 or 8 splits some have a short
    # share and some none. A split config's partials meet through the counters, which the last
    # program sets back to 0: the second launch (another input, the same counters) must be as
    # right as the first.
    p, seed, scaling = 0.25, 5, 2.0
    with mock.patch.object(impl, "_few_rows_tuned", impl._autotuned_few_rows([config])):
        for trial in range(2):
            x, weight, bias, lora_A, lora_B = make_inputs((30,), 700, 300, 16, torch.bfloat16, seed=trial)
            y, xa = impl._few_rows(x, weight, bias, lora_A, lora_B, scaling, p, seed)
            mask = kernels.dropout_mask(seed, x.shape, p).double()
            args = [t.double() for t in (x, weight, bias, lora_A, lora_B)]
            expected = reference(*args, scaling, mask, p, xa_dtype=torch.bfloat16)
            assert rel_err(y, expected) < TOL[torch.bfloat16]
            dropped = mask * args[0] / (1 - kernels.dropout_rate(p))
            assert rel_err(xa, dropped @ args[3].t()) < TOL[torch.bfloat16]
    if config.kwargs["SPLIT_K"] > 1:
        partials, arrivals = impl._split_scratch[(x.device, None)]
        assert not arrivals.any()


class FirstSplitOnly:
    """An autotuned few-rows kernel launched with its grid's axis 2, the splits of K, cut to
    split 0: the other splits' partials are whatever the scratch holds."""

    def __init__(self, tuned):
        self.tuned, self.configs = tuned, tuned.configs

    def __getitem__(self, grid):
        return self.tuned[lambda meta: (*grid(meta)[:2], 1)]


@interpreted
def test_only_the_last_ticket_finishes_a_tile():
    # The interpreter runs programs in grid order, so there the last split always arrives last.
    # Here split 0 does: a launch of every split leaves all the partials in the scratch, then
    # split 0 runs alone, first with its tile's counter at SPLIT_K - 1 (the others are in: it
    # must add all SPLIT_K partials and write the tile, the same bits), then at 0 (it is not last:
    # y stays as it was).
    config = next(c for c in impl._few_rows_configs(interpreted=False)
                  if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]) == (64, 128, 4))
    x, weight, bias, lora_A, lora_B = make_inputs((16,), 1000, 150, 16, torch.bfloat16)  # K: 8 steps, 2 a split
    tuned = impl._autotuned_few_rows([config])
    tiles = -(-150 // 64)
    with mock.patch.object(impl, "_few_rows_tuned", tuned):
        y, xa = impl._few_rows(x, weight, bias, lora_A, lora_B, 2.0, 0.0, 0)
    partials, arrivals = impl._split_scratch[(x.device, None)]
    try:
        with mock.patch.object(impl, "_few_rows_tuned", FirstSplitOnly(tuned)):
            arrivals[:tiles] = 3
            last_y, last_xa = impl._few_rows(x, weight, bias, lora_A, lora_B, 2.0, 0.0, 0)
            assert torch.equal(last_y, y) and torch.equal(last_xa, xa) and not arrivals.any()
            untouched = torch.full_like(y, 7.0)
            impl._few_rows(x, weight, bias, lora_A, lora_B, 2.0, 0.0, 0, y=untouched)
            assert (untouched == 7).all() and (arrivals[:tiles] == 1).all()
    finally:
        arrivals.zero_()


def test_split_k_scratch_holds_every_config_tried():
    # The scratch is sized for the split configs the autotuner tries for N columns: each one's
    # partials (tiles x splits slots of block_m x (BLOCK_N + block_r) floats) and counters fit.
    # Where every split config would run more than SPLIT_K_MAX_PROGRAMS programs (a vocabulary
    # head), none is tried and there is no scratch.
    configs = impl._few_rows_configs(interpreted=False)
    tuned = impl._autotuned_few_rows(configs)
    for N in (150, 4096, 11008, 128256):
        for block_m, block_r in [(16, 16), (32, 64)]:
            floats, tiles = impl._few_rows_scratch_size(tuned, N, 1, block_m, block_r)
            tried = impl._configs_for(configs, N)
            for c in tried:
                bn, split = c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]
                if split > 1:
                    assert -(-N // bn) * split <= impl.SPLIT_K_MAX_PROGRAMS
                    assert -(-N // bn) <= tiles and -(-N // bn) * split * block_m * (bn + block_r) <= floats
            assert any(c.kwargs["SPLIT_K"] > 1 for c in tried) == (N < 128256) == (floats > 0)


@interpreted
def test_split_k_scratch_serves_one_config_after_another():
    # The split-K scratch is kept between launches and sized by the configs in play: here wide
    # tiles split 8 ways (few counters, many partials), then narrow ones split 4 ways (more
    # counters, fewer partials). The second must still find all of its counters at 0.
    wide, narrow = (next(c for c in impl._few_rows_configs(interpreted=False) if (c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]) == shape)
                    for shape in [(128, 8), (32, 4)])
    x, weight, bias, lora_A, lora_B = make_inputs((16,), 700, 300, 16, torch.bfloat16)
    expected = reference(*(t.double() for t in (x, weight, bias, lora_A, lora_B)), 2.0, None, 0.0, xa_dtype=torch.bfloat16)
    for config in (wide, narrow):
        with mock.patch.object(impl, "_few_rows_tuned", impl._autotuned_few_rows([config])):
            y, _ = impl._few_rows(x, weight, bias, lora_A, lora_B, 2.0, 0.0, 0)
        assert rel_err(y, expected) < TOL[torch.bfloat16], config


@interpreted
@pytest.mark.parametrize("want_dx, want_da", [(True, True), (True, False), (False, True)])
def test_the_autotuners_trials_leave_dx_and_da_as_one_launch_would(want_dx, want_da):
    # On a GPU the first call of a shape runs every config, each trial on the live tensors:
    # every trial adds onto dx (which holds dy W) and into da. The autotuner must zero da and
    # put dx back around each, and never zero dx through a stand-in for a da not wanted. Here
    # the trials run under the interpreter, timed by a stand-in that runs each twice.
    trials = []

    def run_twice(call, quantiles=None, **kwargs):
        call(), call()
        trials.append(call)
        return [float(len(trials))] * (len(quantiles) if quantiles else 1)  # the first config wins

    p, seed = 0.3, 11
    x, dxa, lora_A, dy_w = torch.randn(300, 40), torch.randn(300, 5), torch.randn(5, 40), torch.randn(300, 40)
    configs = impl._lowrank_grad_configs(interpreted=False)[:3]
    with mock.patch.object(impl, "_lowrank_grad_tuned", impl._autotuned_lowrank_grad(configs, do_bench=run_twice)):
        dx, da = impl._lowrank_grads(dxa, lora_A, x, p, seed, want_dx, want_da,
                                     add_to=dy_w.clone() if want_dx else None)
    assert len(trials) == len(configs)
    dropped = kernels.dropout_mask(seed, x.shape, p).double() / (1 - kernels.dropout_rate(p))
    if want_dx:
        assert rel_err(dx, dy_w.double() + dropped * (dxa.double() @ lora_A.double())) < 1e-5
    if want_da:
        assert rel_err(da, dxa.double().t() @ (dropped * x.double())) < 1e-5


@interpreted
@pytest.mark.parametrize("dx_gemm_first", [True, False])
@pytest.mark.parametrize("needs_grad", ["x A B", "x B", "A"])
def test_either_order_of_the_backwards_dx_gemm(dx_gemm_first, needs_grad):
    # dy W issued before the low-rank pass (which adds onto it) or after it (cuBLAS adding onto
    # the pass's output): the same gradients, with and without dropout.
    with mock.patch.object(impl, "DX_GEMM_FIRST", dx_gemm_first):
        for dtype, p in [(torch.float32, 0.25), (torch.bfloat16, 0.0)]:
            check_against_reference((3, 10), 40, 36, 5, dtype, True, "strided", p, 2.0, "cuBLAS base", needs_grad)


@interpreted
def test_saves_only_x_xa_and_the_weights():
    # The dropped copy of x is never kept for the backward: only the seed is.
    x, weight, b, lora_A, lora_B = make_inputs((32,), 48, 20, 4, torch.float32)
    lora_A.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.3, seed=3)
    inputs = {t.data_ptr() for t in (x, weight, lora_A, lora_B)}
    extra = [t.shape for t in saved if t.data_ptr() not in inputs]
    assert extra == [torch.Size([32, 4])]  # xa


@interpreted
def test_a_frozen_a_saves_no_copy_of_x():
    # x is read back for dA alone: with A frozen (LoRA-FA) only xa (M, r) is kept, as the
    # reference keeps it, and dx (which needs the mask, not x) is still right.
    x, weight, b, lora_A, lora_B = make_inputs((32,), 48, 20, 4, torch.float32)
    x.requires_grad_(True)
    lora_B.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, 0.3, seed=3)
    assert x.data_ptr() not in {t.data_ptr() for t in saved}
    y.sum().backward()
    mask = kernels.dropout_mask(3, x.shape, 0.3).double()
    x64 = x.detach().double().requires_grad_(True)
    reference(x64, weight.double(), b.double(), lora_A.double(), lora_B.double(), 1.0, mask, 0.3).sum().backward()
    assert rel_err(x.grad, x64.grad) < TOL[torch.float32]


@interpreted
def test_no_input_features():
    # K = 0: x W^T and the low-rank term are empty sums, so y is the bias on every row.
    x, weight, b = torch.randn(2, 3, 0), torch.randn(5, 0), torch.randn(5)
    lora_A, lora_B = torch.randn(2, 0, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert torch.equal(y, b.expand(2, 3, 5))
    y.sum().backward()
    assert lora_A.grad.shape == (2, 0) and torch.equal(lora_B.grad, torch.zeros(5, 2))


@interpreted
def test_what_is_refused_and_what_is_not(monkeypatch):
    x, weight, b, lora_A, lora_B = make_inputs((4,), 16, 12, 2, torch.float32)
    call = lambda **kw: kernels.lora_linear(x, weight, b, lora_A, lora_B, **{"scaling": 1.0, **kw})  # noqa: E731
    for seed in (-5, 2**40, True):
        for draw in (lambda: call(dropout_p=0.1, seed=seed), lambda: kernels.dropout_mask(seed, x.shape, 0.1)):
            with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*31\)"):
                draw()
    with pytest.raises(TypeError, match=r"seed must be an integer, got float 5.7"):  # not quietly 5
        call(dropout_p=0.1, seed=5.7)
    # The mask a call used, for any integer seed the call takes (a numpy int, a 0-d tensor).
    for seed in (np.int64(9), torch.tensor(9)):
        assert torch.equal(kernels.dropout_mask(seed, x.shape, 0.5), kernels.dropout_mask(9, x.shape, 0.5))
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"p must be a dropout rate in \[0, 1\]"):
            kernels.dropout_mask(0, x.shape, p)
    with pytest.raises(TypeError, match="takes scaling as a constant"):
        call(scaling=torch.tensor(2.0, requires_grad=True))
    with torch.no_grad():  # nothing is differentiated: a scaling that requires grad is a constant there
        assert torch.equal(call(scaling=torch.tensor(2.0, requires_grad=True)), call(scaling=2.0))
    with pytest.raises(ValueError, match="at least 1-D; got a 0-d tensor"):
        kernels.lora_linear(torch.tensor(1.0), weight, b, lora_A, lora_B, 1.0)
    with pytest.raises(TypeError, match=r"one dtype for all tensors: x is torch.float32, but \{'lora_B': 'torch.float16'\}"):
        kernels.lora_linear(x, weight, b, lora_A, lora_B.half(), 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        call(dropout_p=1.0)
    assert torch.equal(call(dropout_p=1.0, training=False), call())  # nn.Dropout(1.0).eval() is the identity
    with torch.no_grad():  # a weight that requires grad is left alone where nothing is differentiated
        weight.requires_grad_(True)
        assert torch.equal(call(), kernels.lora_linear(x, weight.detach(), b, lora_A, lora_B, 1.0))
    weight.requires_grad_(False)
    # Under deterministic algorithms only cuBLAS runs: our kernels' tiles are autotuned by timing
    # (each sums in its own order) and, with dropout, dA is summed with atomic adds; so a call
    # that our kernels would compute is refused, whether it trains or not. A rate below 2**-16
    # drops nothing, so it is a call without dropout.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    for trains_A in (True, False):
        lora_A.requires_grad_(trains_A)
        for refused in [dict(dropout_p=0.1), dict(route="triton GEMM")]:
            with pytest.raises(RuntimeError, match="autotuner"):
                call(**refused)
        assert torch.equal(call(dropout_p=1e-6), call()) and torch.equal(call(dropout_p=0.1, training=False), call())
    bf16 = [t.to(torch.bfloat16) for t in (x, weight, b, lora_A, lora_B)]
    with pytest.raises(RuntimeError, match="few-rows"):
        kernels.lora_linear(*bf16, 1.0)  # decoding's route, for 4 rows of bf16
    assert torch.equal(kernels.lora_linear(*bf16, 1.0, route="cuBLAS base"),
                       kernels.lora_linear(*bf16, 1.0, route="cuBLAS base"))


@interpreted
def test_frozen_weight_gets_no_gradient():
    x, weight, b, lora_A, lora_B = make_inputs((8,), 16, 12, 2, torch.float32)
    for t in (x, lora_A, lora_B):
        t.requires_grad_(True)
    kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0).sum().backward()
    assert weight.grad is None and b.grad is None
    assert x.grad is not None and lora_A.grad is not None and lora_B.grad is not None

    # A trainable base weight is refused rather than silently left without a gradient.
    with pytest.raises(ValueError, match="frozen"):
        kernels.lora_linear(x, weight.requires_grad_(True), b, lora_A, lora_B, 1.0)


@interpreted
@pytest.mark.parametrize("path", PATHS)
def test_the_output_takes_in_place_ops_and_a_second_derivative_is_refused(path):
    # The output is a tensor of its own, not a view made inside the autograd Function: a model
    # may modify it in place (ReLU(inplace=True) after the layer), as after the reference path.
    # The kernels' work is invisible to autograd, so create_graph=True must raise rather than
    # give a second derivative without the low-rank terms: also for d(sum y)/dx, whose dy (ones)
    # needs no grad, where torch's once_differentiable let a gradient penalty train A and B wrong.
    x, weight, b, lora_A, lora_B = make_inputs((2, 5), 24, 20, 4, torch.bfloat16)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, route=path)
    expected = reference(*(t.double() for t in (x, weight, b, lora_A, lora_B)), 2.0, None, 0.0, torch.bfloat16).relu()
    torch.relu_(y)
    assert rel_err(y, expected) < TOL[torch.bfloat16]
    y.sum().backward()  # the in-place op is differentiated through
    assert x.grad is not None and lora_A.grad is not None
    with pytest.raises(RuntimeError, match=r"lora_linear has no second derivative .* create_graph=True asks for one: "
                                           r"run the layer on the reference path"):
        torch.autograd.grad(kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, route=path).sum(), x,
                            create_graph=True)
    # With A and B frozen and dy a constant, dx is a constant too: exact, and not refused.
    lora_A.requires_grad_(False)
    (gx,) = torch.autograd.grad(kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, route=path).sum(), x,
                                create_graph=True)
    x64 = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(x64, *(t.double() for t in (weight, b, lora_A, lora_B)), 2.0, None,
                                                0.0, torch.bfloat16).sum(), x64)
    assert not gx.requires_grad and rel_err(gx, expected) < TOL[torch.bfloat16]


@interpreted
def test_a_call_under_autocast_computes_in_the_tensors_dtype():
    # Called directly under autocast (the LoRA layer itself leaves autocast to the reference
    # path), the kernels and the cuBLAS calls between them keep the tensors' one dtype.
    x, weight, b, lora_A, lora_B = make_inputs((6,), 24, 20, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert y.dtype == torch.float32
    expected = reference(*(t.double() for t in (x, weight, b, lora_A, lora_B)), 2.0, None, 0.0, torch.float32)
    assert rel_err(y, expected) < TOL[torch.float32]


@interpreted
def test_eval_mode_and_seed_handling():
    x, weight, b, lora_A, lora_B = make_inputs((2, 9), 20, 10, 4, torch.float32)
    call = lambda **kw: kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, **kw)  # noqa: E731
    # No dropout outside training.
    assert torch.equal(call(dropout_p=0.5, training=False), call(dropout_p=0.0))
    # Without a seed one is drawn from torch's generator, so manual_seed makes runs repeatable.
    torch.manual_seed(0)
    first = call(dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(call(dropout_p=0.5), first)
    assert not torch.equal(call(dropout_p=0.5), first)


@interpreted
@pytest.mark.parametrize("path", PATHS)
def test_a_call_with_nothing_to_differentiate_skips_autograd(path):
    # Inference (no_grad, or no input that needs a gradient) runs the same kernels without the
    # autograd Function: the same numbers, and the same dropout mask for the same seed.
    x, weight, b, lora_A, lora_B = make_inputs((3, 7), 40, 24, 8, torch.bfloat16)
    lora_A.requires_grad_(True)
    call = lambda: kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, 0.25, seed=5, route=path)  # noqa: E731
    recorded = call()
    assert recorded.grad_fn is not None
    refuse = mock.patch.object(impl.LoraLinearFunction, "apply", side_effect=AssertionError("autograd was used"))
    with torch.no_grad(), refuse:
        bare = call()
    assert bare.shape == recorded.shape and torch.equal(bare, recorded.detach())


@interpreted
def test_rejects_mixed_dtypes():
    x, weight, b, lora_A, lora_B = make_inputs((4,), 8, 8, 2, torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.lora_linear(x.half(), weight, b, lora_A, lora_B, 1.0)


@interpreted
def test_switch_and_fallback_rule():
    assert kernels.is_available()
    assert kernels.enabled()
    kernels.set_enabled(False)
    try:
        assert not kernels.enabled()
    finally:
        kernels.set_enabled(True)
    # Decoding-sized batches run the one-launch few-rows kernel where the rank allows, and
    # cuBLAS's base product otherwise; so does a long sequence while our GEMM is slower than
    # cuBLAS (FUSE_BASE_GEMM off, as measured).
    bf16 = torch.bfloat16
    assert not impl.FUSE_BASE_GEMM
    assert not impl.use_fused_base(8192, 4096, 4096)
    assert impl.forward_path(8192, 4096, 4096, 16, bf16) == "cuBLAS base"
    assert impl.forward_path(16, 4096, 4096, 16, bf16) == "few rows"
    assert impl.forward_path(32, 4096, 11008, 64, torch.float16) == "few rows"
    assert impl.forward_path(16, 4096, 4096, 65, bf16) == "cuBLAS base"
    assert impl.forward_path(33, 4096, 4096, 16, bf16) == "cuBLAS base"
    assert impl.forward_path(16, 4096, 4096, 16, torch.float32) == "cuBLAS base"
    # With it on, a long sequence runs our GEMM, except in full fp32.
    with mock.patch.object(impl, "FUSE_BASE_GEMM", True):
        assert not impl.use_fused_base(16, 4096, 4096)
        assert impl.use_fused_base(8192, 4096, 4096)
        assert impl.forward_path(8192, 4096, 4096, 16, bf16) == "triton GEMM"
        assert impl.forward_path(16, 4096, 4096, 16, bf16) == "few rows"
        with tf32_allowed(False):
            assert not impl.use_fused_base(8192, 4096, 4096, torch.float32)
        with tf32_allowed(True):
            assert impl.use_fused_base(8192, 4096, 4096, torch.float32)


@interpreted
@pytest.mark.parametrize("api", ["legacy", "new"])
@pytest.mark.parametrize("dtype, allow_tf32, precision", [
    (torch.float32, False, "ieee"), (torch.float32, True, "tf32"), (torch.bfloat16, False, "tf32")])
def test_fp32_tiles_follow_torchs_tf32_switch(dtype, allow_tf32, precision, api):
    """On a GPU tl.dot rounds fp32 tiles to TF32 unless told otherwise, while cuBLAS (and so the
    reference path) does that only when torch allows it TF32 (allow_tf32, or the fp32_precision
    that replaces it). Every kernel launch must ask for what cuBLAS would do. (The interpreter
    computes in full precision either way, so this checks what the launches ask for.)"""
    launched = {}
    kernel_fns = [impl._matmul_lowrank_kernel, impl._few_rows_kernel, impl._shrink_kernel,
                  impl._lowrank_grad_kernel]

    def spy(fn):
        def run(*args, **kwargs):
            launched.setdefault(fn.__name__, set()).add(kwargs["DOT_PRECISION"])
            return original[fn](*args, **kwargs)
        return run

    original = {fn: fn.run for fn in kernel_fns}
    x, weight, b, lora_A, lora_B = make_inputs((20,), 24, 20, 4, dtype)
    lora_A.requires_grad_(True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tf32_allowed(allow_tf32, api))
        for fn in kernel_fns:
            stack.enter_context(mock.patch.object(fn, "run", spy(fn)))
        for path in PATHS:
            if path == "few rows" and dtype == torch.float32:
                continue  # fp32 decoding is left to cuBLAS
            for x_needs_grad in (True, False):  # with and without dx
                x.requires_grad_(x_needs_grad)
                y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout_p=0.1, seed=3, route=path)
                y.sum().backward()
    # Every kernel ran (the few-rows one in 16-bit only).
    expected = [fn for fn in kernel_fns if fn is not impl._few_rows_kernel or dtype != torch.float32]
    assert launched == {fn.__name__: {precision} for fn in expected}


@contextlib.contextmanager
def gemm_launches():
    """(USE_TMA, whether descriptors were passed) of every launch of the GEMM kernel inside."""
    launches, run = [], impl._matmul_lowrank_kernel.run
    x_desc = impl._matmul_lowrank_kernel.arg_names.index("x_desc")

    def spy(*args, **kwargs):
        launches.append((kwargs["USE_TMA"], args[x_desc] is not None))
        return run(*args, **kwargs)
    with mock.patch.object(impl._matmul_lowrank_kernel, "run", spy):
        yield launches


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tma_loads_match_the_reference(dtype):
    # The TMA configs' K loop, forced (on a GPU the autotuner picks TMA or pointer loads by
    # speed): ragged M, N and K; the forward reads W through a descriptor of W itself, (N, K),
    # the dx GEMM as stored, with the dropout mask and dA. K and N are multiples
    # of 8, so that every row is a multiple of 16 bytes, as the copy engine needs. float32 takes
    # TMA only where torch allows TF32 (full fp32 runs on FMAs); the interpreter computes in full
    # precision either way.
    with mock.patch.object(impl, "_matmul_lowrank_tuned", impl._autotuned_gemm(impl._gemm_configs(tma=True))), \
            tf32_allowed(True), gemm_launches() as launches:
        for p in (0.0, 0.1):
            check_against_reference((3, 37), 72, 40, 5, dtype, True, "contiguous", p, 2.0, "triton GEMM")
        check_against_reference((70,), 8, 104, 17, dtype, False, "contiguous", 0.25, 0.5, "triton GEMM")
    assert launches and set(launches) == {(True, True)}


@interpreted
@settings(max_examples=15, deadline=None)
@given(
    M=st.integers(1, 70),
    K8=st.integers(1, 9),
    N8=st.integers(1, 9),
    r=st.sampled_from([1, 16, 17, 40]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["contiguous", "contiguous", "strided"]),
    p=st.sampled_from([0.0, 0.1]),
)
def test_a_tma_config_matches_the_reference_on_any_shape(M, K8, N8, r, dtype, layout, p):
    # K and N multiples of 8 make x's, dy's and W's rows multiples of 16 bytes: those calls take
    # TMA loads; strided x (and so no descriptor) makes the same config read through pointers.
    with mock.patch.object(impl, "_matmul_lowrank_tuned", impl._autotuned_gemm(impl._gemm_configs(tma=True))), \
            tf32_allowed(True):
        check_against_reference((M,), 8 * K8, 8 * N8, r, dtype, True, layout, p, 2.0, "triton GEMM")


@interpreted
def test_tma_only_where_the_copy_engine_can_read():
    bf16 = torch.bfloat16
    x, weight = torch.randn(64, 40, dtype=bf16), torch.randn(24, 40, dtype=bf16)  # x (M, K), W (N, K)
    x_desc, w_desc, w_transposed = impl._tma_descriptors(x, weight.t())  # the forward: w = W^T
    assert w_transposed and x_desc.base is x
    assert w_desc.base.data_ptr() == weight.data_ptr()
    assert (list(w_desc.shape), list(w_desc.strides)) == ([24, 40], [40, 1])
    dy = torch.randn(64, 24, dtype=bf16)
    _, w_desc, w_transposed = impl._tma_descriptors(dy, weight)  # the dx GEMM: w = W, (N, K) as stored
    assert not w_transposed and w_desc.base is weight
    refused = {
        "x with a column stride": (x[:, ::2], weight[:, ::2].t()),
        "rows not 16-byte aligned": (x[:, 1:], weight[:, 1:].t()),
        "rows of 37 bf16 (74 bytes)": (x[:, :37].contiguous(), weight[:, :37].contiguous().t()),
        "an empty batch": (x[:0], weight.t()),
        "rows that overlap (an expanded dy)": (x[:1].expand(64, 40), weight.t()),
        "w with no unit stride": (x, torch.randn(80, 48, dtype=bf16)[::2, ::2]),
    }
    for why, (x_, w_) in refused.items():
        assert impl._tma_descriptors(x_, w_) is None, why
    # Nor does full fp32 get descriptors: its dot runs on FMAs, not on the tensor cores.
    x, weight, b, lora_A, lora_B = make_inputs((40,), 16, 24, 4, torch.float32)
    with tf32_allowed(False), gemm_launches() as launches:
        kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, route="triton GEMM")
    assert launches == [(False, False)]
    # The TMA configs are tuned only for calls that come with descriptors.
    pointer, tma = impl._gemm_configs()[0], impl._gemm_configs(tma=True)[0]
    assert impl._usable_configs([pointer, tma], {"TMA_READY": 0}) == [pointer]
    assert impl._usable_configs([pointer, tma], {"TMA_READY": 1}) == [pointer, tma]


@interpreted
def test_a_route_that_cannot_take_the_shape_is_refused():
    x, weight, b, lora_A, lora_B = make_inputs((40,), 8, 6, 2, torch.bfloat16)
    with pytest.raises(ValueError, match=r"few-rows route takes 1 to 32 rows .* got 40 rows"):
        kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, route="few rows")
    with pytest.raises(ValueError, match=r"route must be one of"):
        kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, route="fastest")


@interpreted
def test_shapes_devices_and_dropout_are_checked_up_front():
    x, weight, b, lora_A, lora_B = make_inputs((3,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(6, 2\)"):
        kernels.lora_linear(x, weight, b, lora_A, lora_B.T.contiguous(), 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, 8\), the rank first.*got \(8, 2\) \(transposed\?\)"):
        kernels.lora_linear(x, weight, b, lora_A.T.contiguous(), lora_B, 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        kernels.lora_linear(x, weight, b[:5], lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        kernels.lora_linear(x, weight, b, lora_A, lora_B, 1.0, dropout_p=1.5, training=False)


def _large_offsets_case():
    """x whose last row starts 2**31 elements into its storage: offsets need int64.

    The storage is ~4 GB of virtual memory, but only the pages of x's 17 rows are ever touched.
    """
    M, K, N, r, row_stride = 17, 16, 24, 4, 2**27  # (M - 1) * row_stride == 2**31; few enough rows for every path
    storage = torch.empty((M - 1) * row_stride + K, dtype=torch.float16)
    x_small, weight, b, lora_A, lora_B = make_inputs((M,), K, N, r, torch.float16)
    x = storage.as_strided((M, K), (row_stride, 1)).copy_(x_small).requires_grad_(True)
    lora_A.requires_grad_(True)
    for path in PATHS:
        y = kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, dropout_p=0.25, seed=5, route=path)
        y.float().sum().backward()
        mask = kernels.dropout_mask(5, (M, K), 0.25).double()
        x64, A64 = (t.detach().double().requires_grad_(True) for t in (x, lora_A))
        y64 = reference(x64, weight.double(), b.double(), A64, lora_B.double(), 2.0, mask, 0.25, torch.float16)
        y64.sum().backward()
        assert rel_err(y, y64) < TOL[torch.float16], "y"
        assert rel_err(x.grad, x64.grad) < TOL[torch.float16], "dx"
        assert rel_err(lora_A.grad, A64.grad) < TOL[torch.float16], "dA"
        x.grad = lora_A.grad = None


@interpreted
def test_offsets_past_2_to_the_31():
    # 32-bit offsets would wrap and read outside x, which crashes the process rather than
    # failing an assert; so the case runs in a child process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import tests.test_kernels as t; t._large_offsets_case()"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-3000:]}"

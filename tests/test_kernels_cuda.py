"""The fused LoRA kernels compiled for a real GPU, against the same float64 reference.

test_kernels.py checks the kernels' logic through Triton's interpreter on CPU tensors. This file
checks what only hardware shows: the machine code of every autotuning config of both GEMMs and
of the shrink, tensor-core rounding in each dtype (TF32 for float32 only where torch allows it),
the autotuned flagship shapes (decoding and a long sequence), and LoraLinear taking the fused
path by itself on CUDA tensors. Without a GPU it is skipped; on one it runs with the rest of
`make test`, or alone:

    python -m pytest -q tests/test_kernels_cuda.py

MINIPEFT_KERNEL_TEST_DEVICE=cpu runs the same tests through the interpreter instead, to check
this file's own logic on a machine without a GPU (slow; the per-config test then has one config).
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

DEVICE = os.environ.get("MINIPEFT_KERNEL_TEST_DEVICE", "cuda")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, as in test_kernels.py
# A full test run may have switched the interpreter on for the whole process already (see
# test_kernels.py); compiled kernels then need a fresh process: test_compiled_in_fresh_process.
NO_GPU = DEVICE == "cuda" and not torch.cuda.is_available()
INTERPRETED_HERE = DEVICE == "cuda" and not NO_GPU and os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
compiled = pytest.mark.skipif(INTERPRETED_HERE, reason="this process interprets triton; see test_compiled_in_fresh_process")

from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import minipeft.kernels as kernels  # noqa: E402
import minipeft.kernels.fused_lora as impl  # noqa: E402
from minipeft import LoraConfig, get_peft_model  # noqa: E402
from tests.kernel_checks import (PATHS, TOL, check_against_reference, make_inputs, reference, rel_err,  # noqa: E402
                                 tf32_allowed)  # noqa: E402

# TF32 keeps 10 bits of mantissa: each product is off by up to ~2^-11 of its size.
TF32_TOL = 3e-3


@pytest.mark.skipif(not INTERPRETED_HERE, reason="this process runs the compiled kernels itself")
def test_compiled_in_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


# Each runs one autotuned kernel with only the configs given (one config: no tuning at all).
def gemm_configs(configs):
    """The base GEMM."""
    return mock.patch.object(impl, "_matmul_lowrank_tuned", impl._autotuned_gemm(configs))


def few_rows_configs(configs):
    """The few-rows kernel."""
    return mock.patch.object(impl, "_few_rows_tuned", impl._autotuned_few_rows(configs))


def shrink_configs(configs):
    """The shrink (with dropout; without, it is cuBLAS)."""
    return mock.patch.object(impl, "_shrink_tuned", impl._autotuned_shrink(configs))


def lowrank_grad_configs(configs):
    """The backward's low-rank pass (dx's low-rank part and dA)."""
    return mock.patch.object(impl, "_lowrank_grad_tuned", impl._autotuned_lowrank_grad(configs))


# Small enough to compile once per kernel variant: tuning every random shape would cost minutes.
# The TMA one reads through descriptors where a shape's rows allow, through pointers elsewhere.
SMALL_CONFIG = impl._gemm_configs()[-1]
SMALL_TMA_CONFIG = impl._gemm_configs(tma=True)[-1]
SMALL_FEW_ROWS_CONFIG = impl._few_rows_configs()[0]
SPLIT_K_FEW_ROWS_CONFIGS = [c for c in impl._few_rows_configs(interpreted=False) if c.kwargs["SPLIT_K"] > 1]
SMALL_SHRINK_CONFIG = impl._shrink_configs()[0]
SMALL_LOWRANK_GRAD_CONFIG = impl._lowrank_grad_configs()[0]


@compiled
@settings(max_examples=20, deadline=None)  # each new shape or dtype compiles kernels: sized for a short GPU lease
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=3).filter(lambda s: torch.Size(s).numel() <= 300),
    K=st.integers(1, 300),
    N=st.integers(1, 300),
    r=st.sampled_from([1, 2, 5, 16, 17, 40, 64, 65, 130, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    path=st.sampled_from(PATHS),
    config=st.sampled_from([SMALL_CONFIG, SMALL_TMA_CONFIG]),
)
def test_matches_float64_reference(lead, K, N, r, dtype, bias, layout, p, path, config):
    assume(path != "few rows" or impl.use_few_rows(torch.Size(lead).numel(), r, dtype))
    with gemm_configs([config]), few_rows_configs([SMALL_FEW_ROWS_CONFIG]), shrink_configs([SMALL_SHRINK_CONFIG]), \
            lowrank_grad_configs([SMALL_LOWRANK_GRAD_CONFIG]):
        check_against_reference(lead, K, N, r, dtype, bias, layout, p, 2.0, path, device=DEVICE)


@compiled
@pytest.mark.parametrize("path", ["triton GEMM", "cuBLAS base"])  # the few-rows route takes 1 to 32 rows
def test_an_empty_batch(path):
    # Grids with no programs along M: every launch must be skipped or be a no-op.
    check_against_reference((0,), 40, 24, 4, torch.bfloat16, True, "contiguous", 0.1, 2.0, path, device=DEVICE)


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_ragged_edges_with_unit_strides(dtype, layout):
    # N = 37 and K = 45 leave odd columns in the last tiles of the forward and the dx GEMM, and
    # the bias, lora_B's columns (r = 1) and a transposed x are read with unit stride across
    # them: loads vectorised on a promise of aligned blocks (tutorial 03's hints) hit odd
    # addresses there ("misaligned address" on an H200, now fixed).
    with gemm_configs([SMALL_CONFIG]), shrink_configs([SMALL_SHRINK_CONFIG]):
        for r in (1, 16):
            check_against_reference((301,), 45, 37, r, dtype, True, layout, 0.1, 2.0, "triton GEMM", device=DEVICE)


@compiled
@pytest.mark.parametrize("config", impl._gemm_configs() + impl._gemm_configs(tma=True), ids=str)
def test_every_autotuning_config(config):
    # Ragged in every block dimension of every config; forward GEMM and the dx GEMM with the
    # dropout mask and dA, each compiled with this tile, with pointer or TMA
    # loads (K = 200 and N = 520 make rows of 16-byte multiples, which TMA needs).
    with gemm_configs([config]), shrink_configs([SMALL_SHRINK_CONFIG]):
        check_against_reference((301,), 200, 520, 16, torch.bfloat16, True, "contiguous", 0.1, 2.0, "triton GEMM",
                                device=DEVICE)


@compiled
@pytest.mark.parametrize("config", impl._few_rows_configs(), ids=str)
@pytest.mark.parametrize("M", [1, 16, 32])
def test_every_few_rows_config(config, M):
    # Ragged in N and K for every tile; the backward behind it takes the cuBLAS base.
    with few_rows_configs([config]):
        check_against_reference((M,), 1000, 520, 16, torch.bfloat16, True, "contiguous", 0.1, 2.0, "few rows",
                                device=DEVICE)


@compiled
@pytest.mark.parametrize("config", SPLIT_K_FEW_ROWS_CONFIGS, ids=str)
def test_split_k_launches_agree_bit_for_bit(config):
    # A tile's last program adds the splits' partials in split order, whichever split arrived
    # last, so every launch on one input gives the same bits. Between launches the kept partials
    # turn NaN and the input alternates between two, so a partial read before its store was
    # visible (NaN, or the other input's) would show. Many tiles and splits race at the decoding
    # shape of a 4096 x 4096 layer.
    K, N = (4096, 4096) if DEVICE == "cuda" else (1024, 96)  # (interpreted: every split has K steps)
    inputs = [make_inputs((16,), K, N, 16, torch.bfloat16, seed=seed, device=DEVICE) for seed in (0, 1)]
    launch = lambda i: impl._few_rows(*inputs[i % 2], 2.0, 0.1, 7)  # noqa: E731
    with few_rows_configs([config]):
        first = [launch(0), launch(1)]
        for i in range(200 if DEVICE == "cuda" else 4):
            for partials, _ in impl._split_scratch.values():
                partials.fill_(float("nan"))
            y, xa = launch(i)
            assert torch.equal(y, first[i % 2][0]) and torch.equal(xa, first[i % 2][1]), f"launch {i}"
    x = inputs[0][0]
    mask = kernels.dropout_mask(7, x.shape, 0.1, device=DEVICE).double()
    expected = reference(*(t.double() for t in inputs[0]), 2.0, mask, 0.1, xa_dtype=torch.bfloat16)
    assert rel_err(first[0][0], expected) < TOL[torch.bfloat16]


@compiled
@pytest.mark.parametrize("config", impl._shrink_configs(), ids=str)
def test_every_shrink_config(config):
    # Ragged in rows and K for every tile, with the mask drawn (the shrink's only use on a GPU);
    # the dx GEMM behind it draws the same mask again, so any mismatch between the two shows.
    with gemm_configs([SMALL_CONFIG]), shrink_configs([config]):
        check_against_reference((301,), 200, 520, 16, torch.bfloat16, True, "contiguous", 0.1, 2.0, "triton GEMM",
                                device=DEVICE)


@compiled
@pytest.mark.parametrize("config", impl._lowrank_grad_configs(), ids=str)
@pytest.mark.parametrize("r", [16, 130])
def test_every_lowrank_grad_config(config, r):
    # The cuBLAS route's backward pass in each tile: 1100 rows span several programs of every
    # config and end inside a row block, K = 200 ends inside a column block, and rank 130
    # narrows the columns; the mask is the shrink's, drawn again.
    with lowrank_grad_configs([config]), shrink_configs([SMALL_SHRINK_CONFIG]):
        check_against_reference((1100,), 200, 520, r, torch.bfloat16, True, "contiguous", 0.1, 2.0, "cuBLAS base",
                                device=DEVICE)


@compiled
@pytest.mark.parametrize("needs_grad, dx_gemm_first", [("x B", False), ("A B", False), ("x B", True), ("x A B", True)])
def test_the_low_rank_pass_computes_each_output_alone(needs_grad, dx_gemm_first, monkeypatch):
    # dx alone (lora_A frozen) and dA alone (x needs no gradient: the first adapted layer) are
    # variants of their own, each autotuned over every tile. With dy W computed first, the
    # tuning's trials add onto the dx that holds it, which must be put back after each.
    monkeypatch.setattr(impl, "DX_GEMM_FIRST", dx_gemm_first)
    check_against_reference((300,), 200, 520, 16, torch.bfloat16, True, "contiguous", 0.1, 2.0, "cuBLAS base",
                            needs_grad, device=DEVICE)


@compiled
def test_a_rank_above_256_in_float32_is_autotuned():
    # Rank 300 pads to 512 and narrows the pass's columns to 16; in fp32 most of its tiles
    # exceed an H100's shared memory, which the autotuner must skip, not fail on.
    check_against_reference((300,), 200, 96, 300, torch.float32, True, "contiguous", 0.1, 2.0, "cuBLAS base",
                            device=DEVICE)


@compiled
@pytest.mark.parametrize("M, path", [(16, None), (2048, None), (2048, "triton GEMM")])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autotuned_flagship_shapes(M, path, p):
    # What the benchmark runs: the library's own choice of path and its autotuned tiles, for
    # decoding (few rows) and for a long sequence (cuBLAS's base product with our shrink and
    # backward pass), and our GEMM with its autotuned tile where FUSE_BASE_GEMM would send it.
    if DEVICE == "cpu":
        M = min(M, 80)
    K = N = 4096 if DEVICE == "cuda" else 96
    check_against_reference((M,), K, N, 16, torch.bfloat16, True, "contiguous", p, 2.0, path, device=DEVICE)


@compiled
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("route, few_rows_config", [(route, SMALL_FEW_ROWS_CONFIG) for route in impl.ROUTES]
                         + [("few rows", SPLIT_K_FEW_ROWS_CONFIGS[0])], ids=str)
def test_replays_from_a_cuda_graph(route, few_rows_config):
    # Decoding is deployed as a captured graph: after capture, each replay must compute y from
    # whatever x holds then, with nothing the kernels read freed or reallocated in between (a
    # split-K config's counters included: the graph zeroes its own).
    M, K, N, r = 16, 256, 384, 16
    x, weight, bias, lora_A, lora_B = make_inputs((M,), K, N, r, torch.bfloat16, device=DEVICE)
    forward = lambda: kernels.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, training=False, route=route)  # noqa: E731
    with gemm_configs([SMALL_CONFIG]), few_rows_configs([few_rows_config]):
        side = torch.cuda.Stream()  # warm-up (compiling, cuBLAS's workspace) and capture on one stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            y = forward()
    for seed in (1, 2):
        x.copy_(make_inputs((M,), K, N, r, torch.bfloat16, seed=seed, device=DEVICE)[0])
        graph.replay()
        torch.cuda.synchronize()
        expected = reference(*(t.double() for t in (x, weight, bias, lora_A, lora_B)), 2.0, None, 0.0,
                             xa_dtype=torch.bfloat16)
        assert rel_err(y, expected) < TOL[torch.bfloat16], f"replay {seed} on the {route!r} route"


@pytest.mark.skipif(DEVICE != "cuda", reason="inductor's GPU code needs a GPU")
def test_a_lora_model_compiles_whole_on_the_gpu():
    # torch.compile with inductor, fullgraph: each fused layer is one op (kernels/torch_compile.py)
    # and the step computes what the eager step computes, dropout mask included (same generator,
    # which inductor draws from with fallback_random; its own generator would draw other seeds).
    # Then a decoding-style no-grad forward without dropout under CUDA graphs (reduce-overhead),
    # replayed on new inputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128)).to(DEVICE, torch.bfloat16)
    config = LoraConfig(r=16, target_modules=["0", "2"], lora_dropout=0.1, init_lora_weights=False)
    model = get_peft_model(model, config).train()
    x = torch.randn(4, 64, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        for t in [x, *params]:
            t.grad = None
        torch.manual_seed(3)
        y = fn(x)
        y.float().square().sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in params)]

    eager = step(model)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # (torch's generator: the seeds eager draws)
        compiled = step(torch.compile(model, fullgraph=True))
    for got, want in zip(compiled, eager, strict=True):
        assert rel_err(got, want) < TOL[torch.bfloat16]

    model.eval()
    decode = torch.compile(torch.no_grad()(model), mode="reduce-overhead", fullgraph=True)
    for seed in range(4):
        generator = torch.Generator(DEVICE).manual_seed(seed)
        tokens = torch.randn(8, 256, device=DEVICE, dtype=torch.bfloat16, generator=generator)
        got = decode(tokens).clone()
        with torch.no_grad():
            assert rel_err(got, model(tokens)) < TOL[torch.bfloat16], f"call {seed}"


@compiled
@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("path", ["triton GEMM", "cuBLAS base"])  # the few-rows route is 16-bit only
@pytest.mark.parametrize("M", [7, 385])
def test_float32_follows_torchs_tf32_switch(allow_tf32, path, M):
    # Without TF32 every kernel must compute in full fp32 (the interpreter always does, so only a
    # GPU can tell); with it, TF32's rounding is the tolerance.
    tol = TF32_TOL if allow_tf32 else TOL[torch.float32]
    with tf32_allowed(allow_tf32), gemm_configs([SMALL_CONFIG]), few_rows_configs([SMALL_FEW_ROWS_CONFIG]), \
            shrink_configs([SMALL_SHRINK_CONFIG]):
        check_against_reference((M,), 300, 140, 24, torch.float32, True, "strided", 0.1, 2.0, path,
                                device=DEVICE, tol=tol)


@compiled
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(p):
    kept = torch.stack([kernels.dropout_mask(seed, (64, 256), p, DEVICE).float().mean() for seed in range(100)])
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    assert not torch.equal(kernels.dropout_mask(0, (64, 256), p, DEVICE), kernels.dropout_mask(1, (64, 256), p, DEVICE))


@compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_linear_layer_takes_the_fused_path(dtype):
    # The layer decides by itself on CUDA tensors; on the interpreter dry run it is asked directly.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 160)).to(DEVICE, dtype)
    config = dict(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    fused_model = get_peft_model(base, LoraConfig(**config))
    reference_model = get_peft_model(nn.Sequential(nn.Linear(96, 160)).to(DEVICE, dtype),
                                     LoraConfig(**config, use_fused_kernels=False))
    reference_model.load_state_dict(fused_model.state_dict())
    x = torch.randn(4, 33, 96, device=DEVICE, dtype=dtype)

    def step(model, spy=None):
        model.zero_grad()
        x_ = x.clone().requires_grad_(True)
        with mock.patch.object(kernels, "lora_linear", spy) if spy else contextlib.nullcontext():
            y = model(x_)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        layer = model.base_model.model[0]
        return [y, x_.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    calls = []
    spy = lambda *a, **kw: calls.append(1) or impl.lora_linear(*a, **kw)  # noqa: E731
    layer = fused_model.base_model.model[0]
    with tf32_allowed(False):  # fp32: the default, where the kernels compute in full fp32
        if DEVICE == "cpu":
            layer._fused_path_applies = lambda x, adapters: True
        got = step(fused_model, spy)
        want = step(reference_model)
    assert calls, "the fused path was not taken"
    # Both paths round differently in bf16, so the error is measured on each tensor's norm.
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    for name, g, w in zip(["y", "dx", "dA", "dB"], got, want):
        assert rel_err(g, w.double()) < tol, name

"""Fused LoRA linear: the frozen product and the low-rank term written into y once, forward and backward.

By default cuBLAS computes the frozen product, and the low-rank part meets it in place: in the
forward cuBLAS adds x W^T onto the low-rank part written first (a cuBLAS addmm, after our shrink
kernel where there is dropout to draw); in the backward our kernel adds the masked low-rank part
onto dy W, which cuBLAS computes first. Our own GEMM, whose accumulator starts as the low-rank
term, is the other route (`FUSE_BASE_GEMM`, below). Both compute:

Notation (leading dims of x flattened into M; D is the dropout keep-mask, p its rate: dropout_p
rounded down to a multiple of 2**-16, `dropout_rate`):

    x (M, K)   W (N, K) frozen   b (N,) frozen or None   A (r, K)   B (N, r)   s = scaling

    forward   xa = (D * x / (1 - p)) A^T                 (M, r)   "shrink"
              y  = x W^T + b + s * xa B^T                (M, N)   base GEMM + low-rank term

    backward  dxa = s * dy B                             (M, r)   } two cuBLAS GEMMs
              dB  = s * dy^T xa                          (N, r)   }
              dx  = dy W + (D / (1 - p)) * (dxa A)       (M, K)   } one pass over x's tiles for
              dA  = dxa^T (D * x / (1 - p))              (r, K)   } both (or in our GEMM of dx);
                                                                    without dropout, cuBLAS

The mask D is never stored. Like Triton's tutorial 04 (low-memory dropout), every kernel that
needs it redraws it from the seed and the element's position (m, k) in x, with Philox
(`_keep_tile`). So the backward keeps only x, xa and an int, and `dropout_mask()` below can
hand tests the exact mask the kernels used.

Four kernels that compute (and `_dropout_mask_kernel`, which only `dropout_mask()` runs):
    _matmul_lowrank_kernel   out = x @ w + b + scale * [D] * (l @ r)     y in forward, dx in backward
    _few_rows_kernel         y and xa in one launch, for at most 32 rows  forward when decoding
                             (its K loop split where N gives few tiles)
    _shrink_kernel           xa  = (D * x) @ A^T / (1 - p)
    _lowrank_grad_kernel     dx_lr = (D * (dxa A)) / (1 - p) and         backward with dropout, when cuBLAS
                             dA = dxa^T @ (D * x) / (1 - p)               computes dy W (or dx is not needed)

dxa and dB need no mask, so they are two cuBLAS GEMMs. (A single Triton pass over dy that
produced both, adding each row block's share of dB with fp32 atomics, was slower: with the two
GEMMs instead (and the shrink's smaller row blocks), forward + backward at M = 8192, K = N =
4096, r = 16 went from 1.10 to 0.99 ms without dropout on an H200,
`benchmarks/results/nvidia-h200-first-run.md` against `nvidia-h200-run2.md`.)

All accumulate in fp32 and store in the input dtype, except dA in the backward: several
programs add into it, so it is an fp32 buffer the caller casts. The GEMM and the shrink handle
r in chunks of BLOCK_R (a power of two in [16, 64]: tl.dot needs at least 16 along each side,
and 64 keeps the low-rank tiles small); the few-rows kernel (up to rank 64) and the backward's
low-rank pass hold the whole rank at once; all mask the padding, so any rank 1..256 (or more)
works.

The GEMM's K loop reads its tiles of x and w either through pointers, as in Triton's tutorial
03, or, on Hopper and newer where every row starts on 16 bytes, through TMA descriptors: the
copy engine then fetches whole tiles into shared memory while the warps only issue tensor-core
instructions (tutorial 09). Which is faster is the autotuner's call: the large tiles are
candidates both ways (`_gemm_configs`).

Where our GEMM is not as fast as cuBLAS (`FUSE_BASE_GEMM`, `use_fused_base`: measured on an
H200, everywhere so far), the base product is cuBLAS's and only the low-rank part is ours. In
the forward the low-rank part is written first and cuBLAS adds its product onto it in place
(beta = 1), reading it in the epilogue of a GEMM that is bound by its tensor cores, not by
memory: y starts as b + s * xa B^T (a cuBLAS addmm). Run 3 added it after cuBLAS instead, a
pass that read and wrote all of y. In the backward `_lowrank_grad_kernel` writes dx's masked
low-rank part and sums dA in one pass; cuBLAS computes dy W first and the pass adds onto it, so
the GPU starts the backward's largest product before the host has launched the rest
(`DX_GEMM_FIRST`; off, cuBLAS adds dy W onto the pass's dx last). Without dropout there is no
mask to draw, and cuBLAS computes both of the pass's products (`CUBLAS_WITHOUT_DROPOUT`). The
shrink runs here when there is dropout to draw, and in cuBLAS when there is not. The forward
with few rows is the exception: there y costs about one read of W, and the few-rows kernel
saves the two extra launches (`forward_path` names the route a shape takes).
"""

import contextlib
import functools
import math
import operator
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# Under TRITON_INTERPRET=1 kernels run on the CPU through numpy. Its tl.dot multiplies
# bfloat16 tiles as their raw uint16 storage (triton 3.9), so there we upcast both operands to
# fp32 first. On a GPU this is False and tl.dot takes the 16-bit tiles straight to the tensor
# cores.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with an fp32 accumulator; PRECISION is what fp32 tiles get (`_dot_precision`)."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def _cdiv(a, b):
    """ceil(a / b) for ints. The host's arithmetic is plain Python: in recent triton versions
    triton.cdiv and triton.next_power_of_2 are constexpr functions that cost the host a few
    us a call, and every LoRA call makes several."""
    return -(-a // b)


def _next_power_of_2(n):
    """The smallest power of two >= n for n >= 1, and 0 for 0, as triton's (see _cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _dot_precision(dtype):
    """tl.dot's input precision for tensors of `dtype`.

    tl.dot rounds fp32 tiles to TF32 by default, while cuBLAS (F.linear, and so the reference
    path) computes in full fp32 unless the user allowed it TF32. Following that setting keeps the
    two paths computing the same function: full fp32 ("ieee") by default, TF32 where the user
    asked torch for it. 16-bit tiles are exact either way ("tf32" is the default that leaves them alone).
    """
    if dtype == torch.float32 and not _cublas_may_use_tf32():
        return "ieee"
    return "tf32"


def _cublas_may_use_tf32():
    """torch's TF32 switch for cuBLAS matmuls. Read through the fp32_precision API where torch has
    it (2.9 on), which also reflects the legacy allow_tf32: reading allow_tf32 raises once a user
    has set the new one."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        return matmul.allow_tf32
    precision = matmul.fp32_precision
    return (torch.backends.fp32_precision if precision == "none" else precision) == "tf32"


@triton.jit
def _keep_tile(seed, offs_m, k_start, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dropout keep-mask (BLOCK_M, BLOCK_K) for x[offs_m, k_start : k_start + BLOCK_K].

    One Philox call (tl.randint4x) returns 128 random bits; a dropout coin needs 16. So the
    eight elements x[m, 8g : 8g + 8] share the call with counter m * cdiv(K, 8) + g, each taking
    one 16-bit half of its four words. That is 8x less integer work than tl.rand's one call per
    element, which on a GPU would cost more than reading x does. Which half goes to which
    element is fixed by the joins below; any fixed spread would do, since every kernel and
    dropout_mask() draw through this one function. k_start must be a multiple of 8.
    """
    tl.static_assert(BLOCK_K % 8 == 0)
    offs_g = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    w0, w1, w2, w3 = tl.randint4x(seed, offs_m[:, None] * tl.cdiv(K, 8) + offs_g[None, :])
    halves = tl.join(tl.join(tl.join(w0 & 0xFFFF, w0 >> 16), tl.join(w1 & 0xFFFF, w1 >> 16)),
                     tl.join(tl.join(w2 & 0xFFFF, w2 >> 16), tl.join(w3 & 0xFFFF, w3 >> 16)))
    coins = tl.reshape(halves, (BLOCK_M, BLOCK_K))  # from (BLOCK_M, BLOCK_K // 8, 2, 2, 2)
    return coins >= threshold  # uniform on [0, 65536): kept with probability 1 - threshold / 65536


def _dropout_threshold(p):
    """The 16-bit coin threshold for rate p: an element is dropped iff its coin < threshold.
    So the drop rate is p rounded down to a multiple of 2**-16 (``dropout_rate``)."""
    return int(p * 65536)


def dropout_rate(p):
    """The rate the kernels drop elements at for dropout_p = p: p rounded down to a multiple of
    2**-16 (0.1 becomes 0.0999908). The kept ones are scaled by 1 / (1 - dropout_rate(p)), which
    keeps the expectation of the dropped x exactly x (1 / (1 - p) would be off by 1e-5 at p = 0.1,
    and by 7% at p = 0.9999)."""
    return _dropout_threshold(p) / 65536


def _keep_scale(p):
    return 1.0 / (1.0 - dropout_rate(p))


# ----------------------------------------------------------------------------------------------
# The GEMM: out (M, N) = x (M, K) @ w (K, N) + bias + scale * [D] * (l (M, R) @ r (R, N))
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "seed"])  # a new seed or rate must not mean a new compile
def _matmul_lowrank_kernel(
    x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, xin_ptr, dr_ptr,
    x_desc, w_desc,  # TMA descriptors of x and w, or None (`_tma_descriptors`)
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on, stride_im, stride_in, stride_drr, stride_drn,
    scale, threshold, seed,
    M_BUCKET,  # unused here; only the autotuner's cache key (one tuning per power-of-two M)
    TMA_READY,  # unused here: the autotuner's cache key, and what _usable_configs prunes by (1: descriptors given)
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,  # mask the low-rank term with D (the dx of the backward)
    R_GRAD: tl.constexpr,  # also dr (R, N) += scale * l^T ([D] * xin): the backward's dA
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 tiles (_dot_precision)
    W_TRANSPOSED: tl.constexpr,  # w_desc describes w^T (N, K), the layout nn.Linear stores W in
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,  # the K loop's tiles come from the TMA copy engine where descriptors are given
    # (an autotuning choice; the autotuner offers TMA configs only to calls with descriptors, but a
    # lone config, which it runs without pruning, must work for every call)
):
    # Grouped ordering, as in tutorial 03: GROUP_M consecutive programs walk down a column of
    # output tiles, so the w tiles they share are still in L2 when the next one needs them.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Offsets are int64: with int32, m * stride_xm overflows once x has 2**31 elements.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,) rows of out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,) columns of out
    # Rows and columns past the edge wrap back into the matrix, so the loads below need a mask
    # only along the reduction axis; what those rows compute is dropped by the final store.
    # Unlike tutorial 03, no tl.multiple_of / tl.max_contiguous hints here: they promise that
    # the wrapped offsets run on in aligned blocks, which is false at a ragged edge, and a unit
    # stride then turns that promise into vector loads at odd addresses (a bf16 bias with N = 37
    # crashed with "misaligned address" on an H200). Triton infers from M and N themselves when
    # the blocks really are aligned (their multiples of 16), so the flagship shapes compile to
    # the same code either way (`benchmarks/results/sm90-registers.md`).
    offs_am = offs_m % M
    offs_bn = offs_n % N

    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_DROPOUT:
        # out has the shape of x here (out = dx, N = x's K): the mask of x's tile at (m, n). It
        # is drawn once, before acc exists (Philox needs many registers), and lives through the
        # dA sum and the low-rank product below; held as int8 rather than bool, the 128 x 128
        # tiles with 4 warps spill 128 bytes instead of 656 (sm90-registers.md).
        keep = _keep_tile(seed, offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_M, BLOCK_N).to(tl.int8)
    if R_GRAD:
        # In the backward, this tile of dx sits exactly where the tile of x that dA needs does:
        # dA = dxa^T (D * x) / (1 - p) can be summed here, from the same l and the same mask, and
        # x is read while the GEMM keeps the memory bus idle. Rows past M load as 0, so the
        # wrapped rows of l add nothing. It is summed before the accumulator exists, so that
        # x's tile and acc are never live together (with both, the large tiles spill).
        xin = tl.load(xin_ptr + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in,
                      mask=out_mask, other=0.0)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            xin = tl.where(keep != 0, xin, 0.0).to(xin.dtype)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            l = tl.load(l_ptr + offs_am[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                        mask=offs_r[None, :] < R, other=0.0)  # (BLOCK_M, BLOCK_R)
            # Every row tile adds its share of the sum over M: fp32 atomics. Relaxed, because
            # nothing in this launch reads dr (the next kernel sees it whole): triton's default,
            # acq_rel, wraps each in memory barriers (MEMBAR and CCTL in the sm_90 code) that
            # wait for this thread's loads and stores, in the prologue, before the K loop.
            dr = _dot(tl.trans(l), xin, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
            tl.atomic_add(dr_ptr + offs_r[:, None] * stride_drr + offs_n[None, :] * stride_drn, scale * dr,
                          mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), sem="relaxed")

    # The accumulator starts as the low-rank term, scale * [D] * (l @ r), a (BLOCK_M, R) @
    # (R, BLOCK_N) product in chunks of BLOCK_R; the K loop then adds x @ w onto it. Adding the
    # term after the loop instead would keep a second (BLOCK_M, BLOCK_N) fp32 tile live, and at
    # 128 x 256 that no longer fits in registers (ptxas spills it to local memory).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        l = tl.load(l_ptr + offs_am[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    mask=offs_r[None, :] < R, other=0.0)  # (BLOCK_M, BLOCK_R)
        r = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_bn[None, :] * stride_rn,
                    mask=offs_r[:, None] < R, other=0.0)  # (BLOCK_R, BLOCK_N)
        acc = _dot(l, r, acc, DOT_PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(keep != 0, acc, 0.0)
    acc = acc * scale

    for k0 in range(0, K, BLOCK_K):
        if USE_TMA and x_desc is not None:  # (without descriptors a TMA config reads as below)
            # Hopper's copy engine moves each whole tile into shared memory by itself, with
            # no address arithmetic in the warps, and fills what lies past an edge with 0.
            x = x_desc.load([pid_m * BLOCK_M, k0])  # (BLOCK_M, BLOCK_K)
            if W_TRANSPOSED:
                w = w_desc.load([pid_n * BLOCK_N, k0]).T  # (BLOCK_K, BLOCK_N) from W's (N, K)
            else:
                w = w_desc.load([k0, pid_n * BLOCK_N])  # (BLOCK_K, BLOCK_N)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            x = tl.load(x_ptr + offs_am[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=offs_k[None, :] < K, other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_bn[None, :] * stride_wn,
                        mask=offs_k[:, None] < K, other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = _dot(x, w, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_bn).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _gemm_configs(tma=False):
    """Autotuning candidates: tiles whose K loop loads through pointers, or (tma=True) the large
    tiles again with TMA loads. The interpreter gets one small config: tuning there only costs
    time (tests run the TMA config there on purpose).

    float32 tiles take twice the shared memory of 16-bit ones; the largest configs then exceed
    an H100's 227 KiB and fail to launch, which the autotuner skips
    (`benchmarks/kernel_registers.py` tables registers, spills and shared memory per config).
    """
    def config(bm, bn, bk, group_m, warps=4, stages=3):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "USE_TMA": tma},
                             num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)
    if INTERPRET:
        return [config(32, 32, 32, 4)]
    # 128 x 128 with 4 warps and 3 stages (96 KiB of shared memory, <= 255 registers for 128
    # threads) is the large tile of which two programs fit on one SM: one's prologue (the
    # low-rank seed, and in the backward the dropout mask and dA) then runs while the other's
    # K loop keeps the tensor cores busy. Every other large tile holds an SM alone.
    if tma:
        # A tutorial-style GEMM on Hopper reaches 76-84% of cuBLAS here, epilogues included
        # (nvidia-h200-run3.md, with these TMA candidates; the autotuner chose TMA for y and dx); the
        # copy engine frees the warps' registers and issue slots for the tensor cores, which
        # matters most for the largest tiles.
        tiles = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                 (128, 128, 64, 8, 4), (128, 128, 64, 4, 3)]
    else:
        tiles = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
                 (128, 128, 64, 4, 3), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                 (64, 64, 64, 4, 5)]
    return [config(bm, bn, bk, 8, warps, stages) for bm, bn, bk, warps, stages in tiles]


def _set_tma_blocks(nargs):
    """Every config's pre-hook: the descriptors fetch tiles of the config's block shape. A
    pointer config never reads them, but their block shapes are part of the signature a kernel
    is compiled for: set the same way at every launch, each config compiles once."""
    if nargs["x_desc"] is None:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_TRANSPOSED"] else [bk, bn]


@functools.cache
def _has_tma(device_index):
    """Whether the GPU has the TMA copy engine (Hopper, sm_90, and newer); asked once per device,
    not on every launch."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_descriptors(x, w):
    """(x_desc, w_desc, w_transposed) through which the TMA copy engine can read x (M, K) and
    w (K, N), or None where it cannot: it needs Hopper or newer, a unit stride along rows
    whose starts are 16-byte aligned, rows that do not overlap (an expanded dy, stride 0, is
    read through pointers) and no empty dimension. w given as the transpose of a row-major
    (N, K) tensor (the forward's W^T) is described as that tensor. The block shapes start at
    [1, 1]; each config's `_set_tma_blocks` sets its own before the launch.
    """
    if x.is_cuda and not _has_tma(x.device.index):
        return None

    def readable(t):
        return (min(t.shape) > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0
                and (t.stride(0) * t.element_size()) % 16 == 0)
    if not readable(x):
        return None
    for w_transposed, stored in ((False, w), (True, w.t())):
        if readable(stored):
            return (TensorDescriptor.from_tensor(x, [1, 1]), TensorDescriptor.from_tensor(stored, [1, 1]),
                    w_transposed)
    return None


def _usable_configs(configs, named_args, **kwargs):
    """TMA configs only for calls that come with descriptors."""
    return [c for c in configs if named_args["TMA_READY"] or not c.kwargs["USE_TMA"]]


# Tuned once per (power-of-two bucket of M, N, K, dtypes, variant, TMA or not): a new sequence
# length reuses the bucket's winner instead of retuning. The variant is in the key because the
# backward's (dropout, dA) needs more registers than the forward and may win with another tile.
def _autotuned_gemm(configs):
    return triton.autotune(configs=configs, key=["M_BUCKET", "TMA_READY", "N", "K", "HAS_DROPOUT", "R_GRAD",
                                                 "DOT_PRECISION", "W_TRANSPOSED"],
                           prune_configs_by={"early_config_prune": _usable_configs},
                           reset_to_zero=["dr_ptr"])(_matmul_lowrank_kernel)


# Under the interpreter: the pointer config only (one config, no tuning).
_matmul_lowrank_tuned = _autotuned_gemm(_gemm_configs() + ([] if INTERPRET else _gemm_configs(tma=True)))


def _block_r(R):
    """Rank chunk for tl.dot: a power of two, at least 16 (tl.dot's minimum), at most 64."""
    return min(64, max(16, _next_power_of_2(R)))


def _m_bucket(M):
    return min(_next_power_of_2(M), 16384)


def _matmul_lowrank(x, w, bias, l, r, scale, p=0.0, seed=0, xin=None, out=None):
    """(out, dr): out = x @ w + bias + scale * [D] * (l @ r), and dr (R, N) = scale * l^T ([D] * xin)
    in fp32 when xin (M, N) is given, else None.

    x (M, K), w (K, N), l (M, R), r (R, N) in any strides; bias (N,) contiguous, or None. D, when p > 0, is
    the dropout mask of an (M, N) tensor drawn from seed (the backward's dx has x's shape).
    out: the (M, N) tensor to write, or None for a new one.
    """
    M, N, K, R = x.shape[0], w.shape[1], x.shape[1], l.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype) if out is None else out
    dr = torch.zeros((R, N), device=x.device, dtype=torch.float32) if xin is not None else None
    # Stand-in for the pointers whose flags are off. The autotuner zeroes dr_ptr before each
    # trial; every trial rewrites all of out, so out may stand in for it.
    xin_, dr_ = (xin, dr) if xin is not None else (out, out)
    precision = _dot_precision(x.dtype)
    # Full fp32 ("ieee") multiplies on the FMA units, which need no tiles from the copy engine.
    descriptors = None if precision == "ieee" else _tma_descriptors(x, w)
    x_desc, w_desc, w_transposed = descriptors or (None, None, False)
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)
    _matmul_lowrank_tuned[grid](
        x, w, bias if bias is not None else out, l, r, out, xin_, dr_, x_desc, w_desc,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        l.stride(0), l.stride(1), r.stride(0), r.stride(1),
        out.stride(0), out.stride(1), xin_.stride(0), xin_.stride(1), dr_.stride(0), dr_.stride(1),
        scale, _dropout_threshold(p), seed, _m_bucket(M), int(descriptors is not None),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, R_GRAD=xin is not None, DOT_PRECISION=precision,
        W_TRANSPOSED=w_transposed, BLOCK_R=_block_r(R))
    return out, dr


# ----------------------------------------------------------------------------------------------
# Shrink: xa (M, R) = (D * x) (M, K) @ A^T (K, R) / (1 - p)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "seed"])  # a new seed or rate must not mean a new compile
def _shrink_kernel(
    x_ptr, a_ptr, xa_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    keep_scale, threshold, seed,
    M_BUCKET,  # unused here; only the autotuner's cache key
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        if HAS_DROPOUT:
            keep = _keep_tile(seed, offs_m, k0, K, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0).to(x.dtype)
        a_t = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = _dot(x, a_t, acc, DOT_PRECISION)
    # The 1 / (1 - p) of inverted dropout is applied once to the sum, not to every element.
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(xa_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(xa_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


def _shrink_configs(interpreted=INTERPRET):
    """Autotuning candidates: (rows, K step, warps) per program; the interpreter gets one.

    The shrink runs on a GPU only with dropout (without, it is cuBLAS), and there it is bound
    by instruction issue as much as by memory: reading x takes 16 us at the flagship shape, the
    mask's Philox about as long (`benchmarks/lora_linear_notes.md`). The two pull apart. Many
    small programs keep many loads of x in flight, while each thread's fixed cost per K step
    (addresses, the hand-over of the masked tile to the tensor cores) is shared by fewer
    elements: compiled for sm_90, a K step costs 20 SASS instructions per element of x with 16
    elements per thread (16 rows, 4 warps), against 14-17 with 32 or more
    (`benchmarks/results/sm90-registers.md`). The H200 runs had 64 rows per program (one program
    per SM at 8192 rows) and then 16, but changed more than that in between, so which balance
    wins is left to the autotuner.
    """
    if interpreted:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps)
            for bm, bk, warps in [(16, 128, 4), (16, 128, 2), (16, 256, 2), (32, 128, 4), (32, 128, 2),
                                  (64, 128, 4)]]


def _autotuned_shrink(configs):
    return triton.autotune(configs=configs, key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "DOT_PRECISION", "BLOCK_R"])(
        _shrink_kernel)


_shrink_tuned = _autotuned_shrink(_shrink_configs())


def _shrink(x, lora_A, p, seed):
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    br = _block_r(R)
    grid = lambda meta: (_cdiv(M, meta["BLOCK_M"]), _cdiv(R, br))
    _shrink_tuned[grid](
        x, lora_A, xa, M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
        _keep_scale(p), _dropout_threshold(p), seed, _m_bucket(M), HAS_DROPOUT=p > 0,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=br)
    return xa


# ----------------------------------------------------------------------------------------------
# Few rows (decoding): y and xa in one launch
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "seed"])  # a new seed or rate must not mean a new compile
def _few_rows_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, partial_ptr, arrivals_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scale, keep_scale, threshold, seed,
    M_BUCKET,  # unused here; only the autotuner's cache key
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y = x W^T + b + s * xa B^T and xa = (D * x) A^T / (1 - p), for M of at most BLOCK_M rows.

    With few rows, y costs what reading W costs, and three launches (shrink, low-rank term,
    GEMM) would each pay a launch's latency on top. Here one launch does all: every program streams its
    (BLOCK_N, K / SPLIT_K) slice of W once and, in the same K loop, the same columns of x and A
    (from L2: they are small and every program reads them), so it ends with its share of both
    products, x W^T for its tile of y and xa for its rows.

    Split-K. A layer of N = 4096 outputs makes 64 tiles of 64 columns, too few programs to keep
    an H100's 132 SMs streaming W. So the K loop is split SPLIT_K ways (grid axis 2), and the
    partial sums meet the way CUTLASS's serial split-K and CUDA's threadFenceReduction sample
    have them meet, in the same launch: every program stores its partials to `partial_ptr`
    (fp32) and takes a ticket from its tile's counter in `arrivals_ptr`; the program that takes
    the last ticket adds the SPLIT_K partials, in split order (the same sum whichever arrives
    last), and writes the tile. It also sets the counter back to 0, so the next launch finds the
    counters as it needs them. With SPLIT_K = 1 none of this runs.

    The tile's epilogue then adds the low-rank term, s * xa B^T, and the bias; the tile of
    column block 0 also stores xa for the backward.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)  # the whole rank in one block
    if SPLIT_K > 1:
        # This program's share of the K loop: whole BLOCK_K steps, so no split reads a column
        # twice (with more splits than steps, the last ones have nothing to read and add zeros).
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
    else:
        k_begin, k_end = 0, K  # (compile-time bounds: the unsplit kernel as it was)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x W^T
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # (D * x) A^T
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w_t = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                      mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
        a_t = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_K, BLOCK_R)
        acc = _dot(x, w_t, acc, DOT_PRECISION)
        if HAS_DROPOUT:
            x = tl.where(_keep_tile(seed, offs_m, k0, K, threshold, BLOCK_M, BLOCK_K), x, 0.0).to(x.dtype)
        xa = _dot(x, a_t, xa, DOT_PRECISION)

    if SPLIT_K > 1:
        # Partials of tile t, split k: (BLOCK_M, BLOCK_N) of x W^T, then (BLOCK_M, BLOCK_R) of xa.
        tile = pid_m * tl.num_programs(0) + pid_n
        rows = tl.arange(0, BLOCK_M)
        slot_floats = BLOCK_M * (BLOCK_N + BLOCK_R)
        acc_at = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        xa_at = BLOCK_M * BLOCK_N + rows[:, None] * BLOCK_R + offs_r[None, :]
        slot = partial_ptr + (tile * SPLIT_K + pid_k).to(tl.int64) * slot_floats
        tl.store(slot + acc_at, acc)
        tl.store(slot + xa_at, xa)
        # Every thread's stores are issued before one thread takes the ticket, whose release
        # publishes them to the GPU; for the last program, its acquire makes the other programs'
        # partials visible to that thread.
        tl.debug_barrier()
        ticket = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        is_last = ticket == SPLIT_K - 1
    else:
        is_last = True
    if is_last:
        if SPLIT_K > 1:
            tl.debug_barrier()  # ... and to every thread of it, which reads after the acquire
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(SPLIT_K):
                # .cg: from L2, where the other SMs' stores are, never from this SM's L1
                slot = partial_ptr + (tile * SPLIT_K + k).to(tl.int64) * slot_floats
                acc += tl.load(slot + acc_at, cache_modifier=".cg")
                xa += tl.load(slot + xa_at, cache_modifier=".cg")
            tl.store(arrivals_ptr + tile, 0)
        if HAS_DROPOUT:
            xa = xa * keep_scale
        # xa is rounded to the input dtype before it meets B, as the separate shrink stores it: the
        # backward then sees the very xa the forward used.
        xa_rounded = xa.to(xa_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa_rounded,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
        b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)  # (BLOCK_R, BLOCK_N)
        acc += scale * _dot(xa_rounded, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# Each program holds all the rows and the whole rank: (BLOCK_M + BLOCK_N + BLOCK_R) x BLOCK_K
# 16-bit tiles per pipeline stage. These limits keep at least the 128-deep, 4-stage configs
# inside an H100's shared memory (`benchmarks/results/sm90-registers.md`); fp32 would double
# that, and decoding in fp32 is rare enough to leave to cuBLAS.
FEW_ROWS_MAX_M, FEW_ROWS_MAX_R = 32, 64


def _few_rows_configs(interpreted=INTERPRET):
    """Autotuning candidates; the interpreter gets one. Few programs run, so the tile that keeps the most loads of W in
    flight wins; a config whose tiles do not fit in shared memory fails to launch and the
    autotuner skips it. Splitting K multiplies the programs: wider column tiles, which read x
    and A (from L2) once for more columns of W, then still fill the GPU."""
    if interpreted:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=stages)
            for bn, bk, split, warps, stages in [
                (32, 128, 1, 4, 4), (32, 256, 1, 4, 3), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3),
                (16, 256, 1, 4, 4), (32, 512, 1, 8, 3),
                (64, 128, 2, 4, 4), (64, 128, 4, 4, 4), (64, 256, 4, 4, 3), (32, 256, 4, 4, 3),
                (128, 128, 4, 4, 3), (128, 128, 8, 8, 3)]]


# A split exists to give a layer with few column tiles enough programs: up to a few waves of an
# H100's 132 SMs, not more. Beyond, splitting only adds partials to write and read, and scratch
# to keep (a 128k-token vocabulary head has 1000 tiles of 128 columns).
SPLIT_K_MAX_PROGRAMS = 512


def _configs_for(configs, N):
    """The few-rows configs worth trying for N output columns: every unsplit one, and the split
    ones whose programs, cdiv(N, BLOCK_N) * SPLIT_K per row block, stay within
    SPLIT_K_MAX_PROGRAMS (all of them where none would be left). The autotuner prunes by it, and
    the scratch is sized by it."""
    kept = [c for c in configs
            if c.kwargs["SPLIT_K"] == 1 or _cdiv(N, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] <= SPLIT_K_MAX_PROGRAMS]
    return kept or configs


def _prune_few_rows_configs(configs, named_args, **kwargs):
    return _configs_for(configs, named_args["N"])


def _autotuned_few_rows(configs):
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "HAS_DROPOUT", "DOT_PRECISION", "BLOCK_R"],
                           prune_configs_by={"early_config_prune": _prune_few_rows_configs})(_few_rows_kernel)


_few_rows_tuned = _autotuned_few_rows(_few_rows_configs())


# Split-K scratch, per (device, stream): launches on one stream run one after another, so they
# may share it, and every launch leaves the counters at 0. A stream being captured into a CUDA
# graph gets scratch of its own at every call instead, its counters zeroed inside the graph (one
# small fill per replay): a graph may be replayed on any stream, beside other graphs.
_split_scratch: dict = {}


def _few_rows_scratch(device, floats, tiles):
    """(partials, arrivals): an fp32 buffer of at least `floats` elements for the split-K
    partials (never read before written) and at least `tiles` int32 counters, all 0; one-element
    stand-ins where no config splits (floats = 0: the kernel, compiled without the split, never
    reads them)."""
    if not floats:
        return _no_scratch(device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # (the raw stream handle, as triton's launcher reads it: torch.cuda.current_stream builds an object per call)
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None)
    partials, arrivals = (None, None) if capturing else _split_scratch.get(key, (None, None))
    if partials is None or partials.numel() < floats:
        partials = torch.empty(floats, device=device, dtype=torch.float32)
    if arrivals is None or arrivals.numel() < tiles:
        arrivals = torch.zeros(tiles, device=device, dtype=torch.int32)
    if not capturing:
        _split_scratch[key] = partials, arrivals
    return partials, arrivals


@functools.cache
def _no_scratch(device):
    return torch.empty(1, device=device, dtype=torch.float32), torch.zeros(1, device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=None)
def _few_rows_scratch_size(tuned, N, row_blocks, block_m, block_r):
    """(floats, tiles) of split-K scratch that any config of the autotuner `tuned` tried for N
    columns (`_configs_for`) may use: a partial of (block_m, BLOCK_N + block_r) floats per tile
    and split, and a counter per tile. (0, 0) where none splits."""
    splits = [(c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]) for c in _configs_for(tuned.configs, N)
              if c.kwargs["SPLIT_K"] > 1]
    floats = max((row_blocks * _cdiv(N, bn) * split * block_m * (bn + block_r) for bn, split in splits), default=0)
    return floats, max((row_blocks * _cdiv(N, bn) for bn, _ in splits), default=0)


def _few_rows(x, weight, bias, lora_A, lora_B, scale, p, seed, y=None):
    """(y, xa) for x (M, K) with M <= FEW_ROWS_MAX_M and rank <= FEW_ROWS_MAX_R, in one launch;
    y: the (M, N) tensor to write, or None for a new one."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    assert 1 <= M <= FEW_ROWS_MAX_M and R <= FEW_ROWS_MAX_R, \
        f"the few-rows kernel is built for 1..{FEW_ROWS_MAX_M} rows and rank <= {FEW_ROWS_MAX_R}"
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if y is None else y
    xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    block_m = max(16, _next_power_of_2(M))  # tl.dot needs 16 rows at least
    block_r = max(16, _next_power_of_2(R))
    row_blocks = _cdiv(M, block_m)
    partials, arrivals = _few_rows_scratch(x.device, *_few_rows_scratch_size(_few_rows_tuned, N, row_blocks, block_m,
                                                                             block_r))
    grid = lambda meta: (_cdiv(N, meta["BLOCK_N"]), row_blocks, meta["SPLIT_K"])
    _few_rows_tuned[grid](
        x, weight, bias if bias is not None else y, lora_A, lora_B, y, xa, partials, arrivals,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
        scale, _keep_scale(p), _dropout_threshold(p), seed, block_m,
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_R=block_r)
    return y, xa


# ----------------------------------------------------------------------------------------------
# Backward, low-rank part: dx_lr (M, K) = (D * (dxa A)) / (1 - p) and dA (R, K) = dxa^T (D * x) / (1 - p)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "seed"])  # a new seed or rate must not mean a new compile
def _lowrank_grad_kernel(
    dxa_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    M, K, R,
    stride_dxam, stride_dxar, stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
    stride_dar, stride_dak,
    keep_scale, threshold, seed,
    M_BUCKET,  # unused here; only the autotuner's cache key
    WRITE_DX: tl.constexpr,  # write dx's low-rank part:
    ADD_TO_DX: tl.constexpr,  # added onto the dy W that dx holds already, else stored (cuBLAS adds dy W after)
    SUM_DA: tl.constexpr,  # add this program's share of dA into the fp32 da
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """Columns [k0, k0 + BLOCK_K) of rows [m0, m0 + ROWS_PER_PROGRAM), BLOCK_M rows at a time.

    Both outputs need, at each tile of x's shape, the same mask and the same rows of dxa, so one
    pass draws and reads them once. dA sums over all M rows: each program keeps its share of
    that sum in registers and adds it to da once, at the end, so every element of dA takes
    M / ROWS_PER_PROGRAM atomic adds. (Run 3's pass, one tile per program, took M / 64: 8.4
    million fp32 atomics at the flagship shape, 128 on each address of dA.)
    """
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0)  # else the last tile would reach the next program's rows
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)  # the whole rank, padded to a power of two
    ra_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)  # (BLOCK_R, BLOCK_K)
    if WRITE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=ra_mask, other=0.0)  # (BLOCK_R, BLOCK_K): the same for every row
    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    row_start = pid_m * ROWS_PER_PROGRAM
    for m0 in range(row_start, min(row_start + ROWS_PER_PROGRAM, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        tile_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)  # (BLOCK_M, BLOCK_K)
        dxa = tl.load(dxa_ptr + offs_m[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
                      mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
        if HAS_DROPOUT:
            # The same seed and positions as the forward's shrink: the same mask.
            keep = _keep_tile(seed, offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        if SUM_DA:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=tile_mask, other=0.0)  # (BLOCK_M, BLOCK_K); rows past M are 0 and add nothing
            if HAS_DROPOUT:
                x = tl.where(keep, x, 0.0).to(x.dtype)
            da = _dot(tl.trans(dxa), x, da, DOT_PRECISION)
        if WRITE_DX:
            dx = _dot(dxa, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_PRECISION)
            if HAS_DROPOUT:
                dx = tl.where(keep, dx, 0.0)
            dx = dx * keep_scale
            dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
            if ADD_TO_DX:
                dx += tl.load(dx_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
    if SUM_DA:
        # Relaxed atomics: nothing in this launch reads da (the next kernel sees it whole), and
        # triton's default, acq_rel, would fence every one of them with memory barriers.
        tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, da * keep_scale,
                      mask=ra_mask, sem="relaxed")


def _lowrank_grad_configs(interpreted=INTERPRET):
    """Autotuning candidates: (rows per tile, rows per program, warps). More rows per program
    mean fewer atomic adds into dA but fewer programs to keep loads in flight: at the flagship
    shape, from 1024 programs with 64 adds per element of dA (128 rows each) to 128 with 8.
    Adding onto dx (DX_GEMM_FIRST) takes more registers: 64-row tiles with 4 warps then spill
    (`benchmarks/results/sm90-registers.md`), and the 8-warp ones are there for it. The
    interpreter gets one."""
    def config(bm, rows, warps):
        return triton.Config({"BLOCK_M": bm, "ROWS_PER_PROGRAM": rows}, num_warps=warps)
    if interpreted:
        return [config(32, 64, 4)]
    return [config(bm, rows, warps) for bm, rows, warps in [(64, 128, 4), (32, 256, 4), (64, 256, 4), (32, 512, 4),
                                                             (64, 512, 4), (64, 512, 8), (64, 1024, 4), (64, 1024, 8)]]


def _autotuned_lowrank_grad(configs, do_bench=None):
    """Tuned on the live tensors: da is zeroed before each trial, and dx, which a trial may add
    onto, is put back after it (a copy, made only while tuning). do_bench: the trials' timer,
    triton's by default (tests pass one that runs the trials under the interpreter)."""
    return triton.autotune(configs=configs, key=["M_BUCKET", "K", "BLOCK_R", "WRITE_DX", "ADD_TO_DX", "SUM_DA",
                                                 "HAS_DROPOUT", "DOT_PRECISION"],
                           reset_to_zero=["da_ptr"], restore_value=["dx_ptr"], do_bench=do_bench)(_lowrank_grad_kernel)


_lowrank_grad_tuned = _autotuned_lowrank_grad(_lowrank_grad_configs())


def _lowrank_grad_block_k(block_r):
    """Columns per program: dA's partial sum, a (BLOCK_R, BLOCK_K) fp32 tile, lives through the
    whole row loop, so the wider the rank the narrower the columns: 128 columns up to rank 32
    (2048 or 4096 floats), 4096 floats up to rank 256, then 16 columns, tl.dot's minimum."""
    return min(128, max(16, 4096 // block_r))


def _lowrank_grads(dxa, lora_A, x, p, seed, want_dx, want_da, add_to=None):
    """(dx, da): dx (M, K) = add_to + (D * (dxa A)) / (1 - p) in x's dtype if want_dx, written
    into add_to when it is given (it holds dy W) and into a new tensor otherwise (add_to = 0);
    da (r, K) = dxa^T (D * x) / (1 - p) in fp32 if want_da. None for the one not wanted. D is
    the mask the forward drew for x from seed. x (M, K) is read for da alone (None without it)."""
    M, (R, K) = dxa.shape[0], lora_A.shape
    dx = (add_to if add_to is not None else torch.empty((M, K), device=dxa.device, dtype=dxa.dtype)) if want_dx else None
    da = torch.zeros((R, K), device=dxa.device, dtype=torch.float32) if want_da else None
    # A stand-in for an output not wanted: never read or written by the kernel, but zeroed
    # and restored around the autotuner's trials, so not the other output (dx may hold dy W).
    unused = None if want_dx and want_da else torch.empty((1, 1), device=dxa.device, dtype=torch.float32)
    dx_, da_ = (dx if want_dx else unused), (da if want_da else unused)
    x = x if want_da else dx  # (a stand-in the kernel never reads)
    block_r = max(16, _next_power_of_2(R))
    block_k = _lowrank_grad_block_k(block_r)
    grid = lambda meta: (_cdiv(M, meta["ROWS_PER_PROGRAM"]), _cdiv(K, block_k))
    _lowrank_grad_tuned[grid](
        dxa, lora_A, x, dx_, da_, M, K, R,
        dxa.stride(0), dxa.stride(1), lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1),
        dx_.stride(0), dx_.stride(1), da_.stride(0), da_.stride(1),
        _keep_scale(p), _dropout_threshold(p), seed, _m_bucket(M),
        WRITE_DX=want_dx, ADD_TO_DX=want_dx and add_to is not None, SUM_DA=want_da, HAS_DROPOUT=p > 0,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_K=block_k, BLOCK_R=block_r)
    return dx, da


# ----------------------------------------------------------------------------------------------
# Dropout mask, for tests and debugging
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold", "seed"])  # a new seed or rate must not mean a new compile
def _dropout_mask_kernel(out_ptr, M, K, threshold, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, offs_m, tl.program_id(1) * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def _checked_seed(seed) -> int:
    """``seed`` as an int in [0, 2**31): an int, a numpy integer or an integer 0-d tensor."""
    try:
        value = operator.index(seed)  # (no float: 5.7 must not quietly become 5)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}") from None
    if isinstance(seed, bool) or not 0 <= value < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return value


def dropout_mask(seed, shape, p, device="cpu"):
    """The keep-mask D (bool, `shape`) that lora_linear draws for an x of `shape` with this
    seed and p (see `_keep_tile` for how each element's coin is drawn)."""
    seed = _checked_seed(seed)
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a dropout rate in [0, 1], got {p}")
    out = torch.empty(shape, device=device, dtype=torch.int8)
    K = shape[-1] if len(shape) else 1
    M = out.numel() // K if K else 0
    grid = (_cdiv(M, 32), _cdiv(K, 64))
    if out.numel():
        _dropout_mask_kernel[grid](out, M, K, _dropout_threshold(p), seed, BLOCK_M=32, BLOCK_K=64)
    return out.bool()


# ----------------------------------------------------------------------------------------------
# When to use our base GEMM
# ----------------------------------------------------------------------------------------------


# Whether shapes that our GEMM could run (`use_fused_base`) are given to it. Fusing saves one
# read and one write of y, about 5% of a large layer's time, so it pays only where our GEMM is
# at least ~95% as fast as cuBLAS. `bench_lora_linear.py --profile` measures that share at the
# issue's flagship shape (y and dx with their low-rank terms): on an H200 with triton 3.6 it was 84%
# without dropout and 76% with in run 3 (benchmarks/results/nvidia-h200-run3.md), where the cuBLAS
# route beat ours forward + backward (0.97 against 1.02 ms, and 1.20 against 1.50 ms at p = 0.1),
# 87% in run 4 (nvidia-h200-run4.md), and 87% / 77% in run 5 (nvidia-h200.md). So cuBLAS runs
# the base product by default; set this to True, or pass route="triton GEMM", to run ours (on a
# GPU where it measures >= 95%).
FUSE_BASE_GEMM = False


def use_fused_base(M, N, K, dtype=torch.bfloat16):
    """Whether x W^T runs in our kernel (its accumulator seeded with the low-rank term) rather
    than in cuBLAS, which adds it onto the low-rank term written first: only with FUSE_BASE_GEMM.

    Even then only where a tutorial-style kernel can hope to match cuBLAS: tensor cores, enough
    output tiles to fill the GPU and a reduction long enough to pipeline. Few rows (decoding,
    small batches) or thin matrices go elsewhere: the forward to the one-launch few-rows kernel
    where `use_few_rows` allows, the rest to cuBLAS, which has split-K and hand-tuned small-M
    kernels. So does full fp32 (no TF32), where tl.dot falls back to FMAs and half of our GEMM's
    configs spill (`benchmarks/results/sm90-registers.md`).
    """
    return FUSE_BASE_GEMM and M >= 256 and N >= 256 and K >= 256 and _dot_precision(dtype) == "tf32"


def use_few_rows(M, R, dtype=torch.bfloat16):
    """Whether the forward of a layer too small for our GEMM runs as one launch (`_few_rows`)
    rather than three (shrink, the low-rank term, cuBLAS's x W^T added onto it): decoding and
    small batches, 16-bit."""
    return 1 <= M <= FEW_ROWS_MAX_M and R <= FEW_ROWS_MAX_R and dtype in (torch.bfloat16, torch.float16)


ROUTES = ("triton GEMM", "few rows", "cuBLAS base")


def forward_path(M, N, K, R, dtype):
    """The route lora_linear's forward takes for x (M, K), W (N, K) and rank R, by name: one of
    ROUTES. (The backward's dx GEMM decides for itself, by `use_fused_base` on its own shape.)"""
    if use_fused_base(M, N, K, dtype):
        return "triton GEMM"
    return "few rows" if use_few_rows(M, R, dtype) else "cuBLAS base"


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, route):
    """(y, xa) for x (..., K): y (..., N) and xa (M, r), M the rows of x, down `route` (one of
    ROUTES, or None to choose by shape): the forward that LoraLinearFunction records for autograd
    and an inference call runs bare. y is allocated in its final shape and the kernels write its
    (M, N) view: a tensor of its own, not a view of one, which callers may modify in place."""
    K, N = x.shape[-1], weight.shape[0]
    M = x.shape[:-1].numel()
    x2 = x.reshape(M, K)  # a view whenever the leading dims allow; strides go to the kernels
    y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    y2 = y.view(M, N)
    route = route or forward_path(M, N, K, lora_A.shape[0], x.dtype)
    if route == "few rows":
        _, xa = _few_rows(x2, weight, bias, lora_A, lora_B, scaling, p, seed, y=y2)
        return y, xa
    # The shrink is ours only to draw the dropout mask in-kernel. Without dropout it is a plain
    # skinny matmul, which cuBLAS does as well as anything.
    xa = _shrink(x2, lora_A, p, seed) if p > 0 else x2 @ lora_A.t()  # (M, r)
    if route == "triton GEMM":
        _matmul_lowrank(x2, weight.t(), bias, xa, lora_B.t(), scaling, out=y2)
    else:
        # y starts as b + s * xa B^T, a thin product that only writes y, and cuBLAS then adds
        # x W^T onto it in place (beta = 1): it reads y in its epilogue while its tensor cores
        # keep it compute-bound, where adding the low-rank term after it would be a separate
        # pass that reads and writes all of y. (beta = 0 ignores the input: any tensor that
        # broadcasts to (M, N) stands in for a missing bias.)
        torch.addmm(bias if bias is not None else xa.new_empty(()), xa, lora_B.t(), beta=int(bias is not None),
                    alpha=scaling, out=y2)
        y2.addmm_(x2, weight.t())
    return y, xa


def _launch_context(t):
    """Where the kernels and the cuBLAS calls between them run: on t's GPU, which need not be
    the current one that triton launches on; and with autocast off, as they take the tensors'
    own dtype, one for all (an autocast bf16 matmul beside an fp32 one would not add up). Each
    only where it changes something: this is on every call's host path."""
    other_gpu = t.is_cuda and t.device.index != torch.cuda.current_device()
    autocast = torch.is_autocast_enabled(t.device.type)
    if not (other_gpu or autocast):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if other_gpu:
        stack.enter_context(torch.cuda.device(t.device))
    if autocast:
        stack.enter_context(torch.autocast(t.device.type, enabled=False))
    return stack


# The backward's order on the cuBLAS route. True: cuBLAS computes dy W first and the low-rank
# pass adds its part onto it, one more read of dx (9-15 us of GPU time at the flagship shape);
# but the GPU starts the backward's largest product while the host launches the rest. False:
# the pass writes its part of dx and cuBLAS adds dy W onto it last (beta = 1), so the GPU waits
# for every launch before it. On an H200 (run 5, `benchmarks/results/nvidia-h200.md`, both
# orders in one process) dy W first took the backward from 0.643 to 0.498 ms of do_bench's time
# at p = 0 and from 0.794 to 0.575 ms at p = 0.1, and its latency from an idle GPU from 1.03 to
# 0.81 and 1.01 to 0.69 ms. Read at the forward.
DX_GEMM_FIRST = True

# The backward's low-rank part without dropout, where cuBLAS computes dy W. True: dx's low-rank
# part and dA are two cuBLAS products (dx += dxa A, dA = dxa^T x): with no mask to draw, our pass
# would read and write the same bytes, and cuBLAS sums dA in a fixed order (no atomics: allowed
# under torch.use_deterministic_algorithms) straight into A's dtype (no fp32 buffer to zero, no
# cast): two launches where the pass takes three. False: our pass, as with dropout. Not yet timed
# on a GPU: the benchmark times both (`fused[p=0 pass in Triton]`). Read at the forward.
CUBLAS_WITHOUT_DROPOUT = True


def _dx_in_our_gemm(M, N, K, dtype, route):
    """Whether the backward's dx (M, K) = dy (M, N) W runs in our GEMM: a route given by the
    caller sends dx down the same way; else the dx GEMM, whose shape is not y's, decides by its own."""
    return use_fused_base(M, K, N, dtype) if route is None else route == "triton GEMM"


def is_deterministic(M, N, K, R, p, dtype=torch.bfloat16, route=None):
    """Whether lora_linear for x (M, K), W (N, K), rank R and dropout p (0 where the call does not
    train) gives the same bits in every run and process, as torch.use_deterministic_algorithms
    asks: only where cuBLAS computes everything, forward and backward, which is the cuBLAS route
    without dropout (`CUBLAS_WITHOUT_DROPOUT`). Our kernels are not: an autotuner picks their tiles
    by timing, and each tile sums in its own order; with dropout the backward also sums dA with
    atomic adds."""
    forward = route or forward_path(M, N, K, R, dtype)
    return (dropout_rate(p) == 0 and CUBLAS_WITHOUT_DROPOUT and forward == "cuBLAS base"
            and not _dx_in_our_gemm(M, N, K, dtype, route))


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T with W and b frozen. Saves xa and the seed, x where
    A trains (dA reads it), and references to W, A and B, which exist anyway: never the dropped
    copy of x."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, route):
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(x.shape[:-1].numel(), K)
        ctx.dx_in_our_gemm = _dx_in_our_gemm(x2.shape[0], N, K, x.dtype, route)
        ctx.dx_gemm_first, ctx.cublas_without_dropout = DX_GEMM_FIRST, CUBLAS_WITHOUT_DROPOUT
        with _launch_context(x):
            y, xa = _lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, route)
        # x is read back for dA alone (dx needs only the mask, which positions give): a frozen A
        # (LoRA-FA) saves xa (M, r) and no (M, K) tensor, as the reference does.
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, xa, weight, lora_A, lora_B)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape = scaling, p, seed, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        # The kernels' work is not recorded, so a backward that builds a graph (create_graph=True:
        # a gradient penalty, a Hessian-vector product) would give derivatives without the
        # low-rank terms. torch's once_differentiable refuses that only when dy itself requires
        # grad, not for d(sum y)/dx (dy all ones), whose dx still depends on A and B: refused
        # here wherever a gradient returned depends on something that requires grad (with A and
        # B frozen and dy a constant, dx = dy W + ... is a constant, and exact).
        if torch.is_grad_enabled() and (dy.requires_grad or ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            raise RuntimeError(
                "minipeft.kernels.lora_linear has no second derivative (its backward runs in kernels autograd does "
                "not record), and create_graph=True asks for one: run the layer on the reference path "
                "(LoraConfig(use_fused_kernels=False), or minipeft.kernels.set_enabled(False))")
        with _launch_context(dy):
            return LoraLinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, xa, weight, lora_A, lora_B = ctx.saved_tensors
        want_dx, want_da, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx, dA, dB = _lora_backward(dy, x2, xa, weight, lora_A, lora_B, ctx.scaling, ctx.p, ctx.seed, want_dx, want_da,
                                    want_db, ctx.dx_in_our_gemm, ctx.dx_gemm_first, ctx.cublas_without_dropout)
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        # No gradient for the frozen weight and bias, nor for scaling, p, seed and route.
        return dx, None, None, dA, dB, None, None, None, None


def _lora_backward(dy, x2, xa, weight, lora_A, lora_B, s, p, seed, want_dx, want_da, want_db,
                   dx_in_our_gemm, dx_gemm_first, cublas_without_dropout):
    """(dx (M, K), dA (r, K), dB (N, r)) for dy (..., N), each None where not wanted, from what the
    forward saved: x2 (M, K) (None where A is frozen), xa (M, r), the frozen W (N, K), A, B, and
    the seed of the dropout mask. The last three arguments: `_dx_in_our_gemm`'s answer,
    DX_GEMM_FIRST and CUBLAS_WITHOUT_DROPOUT, as the caller read them (the Function at its forward)."""
    N, K = weight.shape
    M = xa.shape[0]
    dy2 = dy.reshape(M, N)
    on_cublas = want_dx and not dx_in_our_gemm

    dx = torch.mm(dy2, weight) if on_cublas and dx_gemm_first else None  # (M, K): dy W first

    # dxa = s * dy B (M, r) and dB = s * dy^T xa (N, r), each one cuBLAS call: addmm with
    # beta = 0 never reads its first argument (a tensor of the result's shape) and applies
    # alpha = s in fp32 in the GEMM's epilogue, where a separate scaling would be a launch.
    dxa = torch.addmm(xa, dy2, lora_B, beta=0, alpha=s) if want_dx or want_da else None
    dB = torch.addmm(lora_B, dy2.t(), xa, beta=0, alpha=s) if want_db else None

    dA = None
    if want_dx and dx_in_our_gemm:
        # dx = dy W + (D / (1 - p)) * (dxa A): the same GEMM as y, the masked low-rank term
        # its accumulator's start; dA = dxa^T (D * x) / (1 - p) is summed in the same kernel (R_GRAD).
        dx, da = _matmul_lowrank(dy2, weight, None, dxa, lora_A, _keep_scale(p), p, seed, xin=x2 if want_da else None)
        dA = da.to(lora_A.dtype) if da is not None else None
    elif p == 0 and cublas_without_dropout:
        # No mask to draw: dx's low-rank part (added onto dy W, or written first) and dA are
        # two cuBLAS products (`CUBLAS_WITHOUT_DROPOUT`).
        if want_dx:
            dx = torch.mm(dxa, lora_A) if dx is None else dx.addmm_(dxa, lora_A)  # (M, K)
        dA = torch.mm(dxa.t(), x2) if want_da else None  # (r, K)
    elif want_dx or want_da:  # (dA alone: e.g. the first adapted layer, whose input needs no gradient)
        # One pass writes dx's masked low-rank part (or adds it onto dy W) and sums dA.
        dx, da = _lowrank_grads(dxa, lora_A, x2, p, seed, want_dx, want_da, add_to=dx)
        dA = da.to(lora_A.dtype) if da is not None else None
    if on_cublas and not dx_gemm_first:
        dx.addmm_(dy2, weight)  # dy W last, onto the low-rank part
    return dx, dA, dB


def refuse_if_not_deterministic(M, N, K, R, p, dtype, route):
    """Under torch.use_deterministic_algorithms(True), refuse a call that `is_deterministic` says
    is not (or warn, with warn_only=True)."""
    if not torch.are_deterministic_algorithms_enabled() or is_deterministic(M, N, K, R, p, dtype, route):
        return
    message = ("lora_linear runs Triton kernels here (with dropout, or on the few-rows or triton GEMM route), "
               "whose tiles an autotuner picks by timing and whose dA is summed with atomic adds, so the bits "
               "vary between runs; with torch.use_deterministic_algorithms(True) only the cuBLAS route without "
               "dropout runs (route='cuBLAS base'), or use the reference path (minipeft.kernels.set_enabled(False))")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=3)


def seed_tensor():
    """A new seed as a CPU int64 scalar, from torch's default CPU generator (not the default
    device's: reading a GPU tensor back would sync)."""
    return torch.randint(0, 2**31 - 1, (), device="cpu")


def draw_seed(p):
    """A seed for a call with dropout p (`seed_tensor`'s), and 0 without dropout (nothing to draw)."""
    return int(seed_tensor()) if p > 0 else 0


def _compiling():
    """Whether torch.compile is tracing this call, on a torch that can register custom ops (2.4 on)."""
    return hasattr(torch.library, "register_autograd") and torch.compiler.is_compiling()


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None, route=None):
    """Fused LoRA linear: x W^T + b + scaling * dropout(x) A^T B^T.

    x (..., K) any strides; weight (N, K) and bias (N,) or None, frozen; lora_A (r, K);
    lora_B (N, r); all one dtype (float32, bfloat16 or float16), accumulation in fp32.
    Returns y (..., N). Dropout (when training and dropout_p > 0) is drawn in the kernels from
    `seed`: an int in [0, 2**31), or None to draw one from torch's default CPU generator, which
    needs no GPU sync (torch.manual_seed makes runs repeatable; each such call advances that
    generator, where nn.Dropout would advance the GPU's). `dropout_mask(seed, x.shape, dropout_p)`
    is the mask a call used, dropping at `dropout_rate(dropout_p)`. Under
    torch.use_deterministic_algorithms(True) a call that our kernels would compute is refused
    (`is_deterministic`): only the cuBLAS route without dropout runs. A seed drawn while a CUDA
    graph is being captured is baked into the graph, so every replay drops the same elements:
    capture without dropout (inference). Gradients flow to x, lora_A and lora_B only: the weight and bias must not require grad (the backward
    never computes their gradients). `route` (one of ROUTES) sends the call down that route
    instead of the one `forward_path` picks by shape: for benchmarks and tests, which compare
    the routes. Under torch.compile the call is one custom op (`torch_compile.py`), whose seed,
    when not given, is drawn each time the compiled code runs.
    """
    grad = torch.is_grad_enabled()
    if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lora_linear treats weight and bias as frozen; they must not require grad "
                         "(use the reference LoRA path to train the base layer)")
    if isinstance(scaling, torch.Tensor) and scaling.requires_grad and grad:
        raise TypeError("lora_linear takes scaling as a constant and computes no gradient for it; pass a number, or "
                        "use the reference LoRA path to train it")
    if not x.is_cuda and not INTERPRET:
        raise ValueError("lora_linear runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)")
    if x.dim() == 0:
        raise ValueError("lora_linear takes x of shape (..., K), at least 1-D; got a 0-d tensor")
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    other = {name: str(t.dtype) for name, t in named.items() if t is not None and t.dtype != x.dtype}
    if other:
        raise TypeError(f"lora_linear needs one dtype for all tensors: x is {x.dtype}, but {other}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"lora_linear supports float32, bfloat16 and float16, not {x.dtype}")
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r, {K}), the rank first, for x (..., {K}); got "
                         f"{tuple(lora_A.shape)}" + (" (transposed?)" if lora_A.dim() == 2 and lora_A.shape[0] == K else ""))
    # The kernels index with these shapes and no bounds checks: refuse anything else up front.
    for name, t, want in [("weight", weight, (N, K)), ("lora_A", lora_A, (r, K)), ("lora_B", lora_B, (N, r)),
                          ("bias", bias, (N,))]:
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"lora_linear: {name} must have shape {want} for x (..., {K}), got {tuple(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device}, x on {x.device}; all must share one device")
    if not 0.0 <= float(dropout_p) <= 1.0 or (training and float(dropout_p) == 1.0):
        raise ValueError(f"dropout_p must be in [0, 1) (1 drops everything, leaving nothing to scale up), got {dropout_p}")
    seed = None if seed is None else _checked_seed(seed)
    if route is not None and route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES} or None (chosen by shape), got {route!r}")
    rows = math.prod(x.shape[:-1])
    if route == "few rows" and not use_few_rows(rows, r, x.dtype):
        raise ValueError(f"the few-rows route takes 1 to {FEW_ROWS_MAX_M} rows of bfloat16 or float16 and rank <= "
                         f"{FEW_ROWS_MAX_R}; got {rows} rows of {x.dtype}, rank {r}")
    # A rate below 2**-16 drops nothing (`dropout_rate`): no mask to draw, no seed.
    p = float(dropout_p) if training and dropout_rate(dropout_p) > 0 else 0.0
    bias = bias.contiguous() if bias is not None else None  # the GEMM reads the bias with stride 1
    if _compiling():
        # torch.compile cannot trace the kernels' host code (autotuners with hooks, scratch per
        # stream) nor read the deterministic-algorithms flags: the call is one opaque op in its
        # graph (kernels/torch_compile.py), which checks them when it runs. Its seed is drawn in
        # the graph, a random op of its own, so that two identical calls stay two calls.
        if p > 0:  # (as draw_seed draws it; without dropout no seed, and no CPU tensor in the graph)
            seed = seed_tensor() if seed is None else torch.tensor(seed, dtype=torch.int64, device="cpu")
        y, _ = torch.ops.minipeft.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), p,
                                              seed if p > 0 else None, route)
        return y
    refuse_if_not_deterministic(rows, N, K, r, p, x.dtype, route)
    if seed is None:
        seed = draw_seed(p)
    if not (torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)):
        # Nothing to differentiate (inference, decoding): the forward runs without autograd's
        # bookkeeping, which costs the host about as much as one more tensor operation (4 of
        # the 19 us of a small no-grad call on a 2-core CPU).
        with _launch_context(x):
            y, _ = _lora_forward(x, weight, bias, lora_A, lora_B, float(scaling), p, int(seed), route)
        return y
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), p, int(seed), route)


__all__ = ["lora_linear", "dropout_mask", "dropout_rate", "use_fused_base", "use_few_rows", "forward_path",
           "is_deterministic", "ROUTES", "LoraLinearFunction"]

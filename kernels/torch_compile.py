"""lora_linear under torch.compile: the fused function as two custom ops.

torch.compile traces Python into a graph, and it cannot trace the fused function's host code:
autotuners with hooks and their own benchmarking, scratch kept per CUDA stream, the checks of
torch's deterministic-algorithms flags. Registered with torch.library, the forward and the
backward become two opaque calls in the compiled graph. Each has a "fake" twin that gives its
outputs' shapes and dtypes without running, which is all the compiler needs to know. So a model
with fused LoRA layers compiles whole (fullgraph=True), and the compiled graph still runs these
kernels.

    minipeft::lora_linear           (x, W, b, A, B, s, p, seed, route) -> (y, xa)
    minipeft::lora_linear_backward  (dy, x, xa, W, A, B, s, p, seed, route, wants) -> (dx, dA, dB)

Only compiled code calls them (`lora_linear` checks `torch.compiler.is_compiling()`). An eager
call runs the autograd.Function directly, because each pass through the dispatcher costs host
time, and the fused calls are host-bound (`benchmarks/lora_linear_notes.md`).

The seed is an input: a CPU int64 scalar, which the host reads without a sync. `lora_linear`
draws it in the graph with the same torch.randint as an eager call. A seed drawn inside the op
would be invisible to the compiler, which takes the op for a pure function and merges identical
calls: two calls of one layer on one input (two views of a batch, as in SimCSE) would share one
mask. Without dropout there is no seed, so such a graph holds no CPU tensor (torch.compile's CUDA
graphs skip graphs that do). Inductor draws from its own generator (unless
torch._inductor.config.fallback_random), so, as with nn.Dropout, a compiled step's masks are not
an eager step's after the same torch.manual_seed. A CUDA graph replays what it captured, seed
included: as for `lora_linear`, capture without dropout.

The backward reads DX_GEMM_FIRST, CUBLAS_WITHOUT_DROPOUT and FUSE_BASE_GEMM when it runs, not
when the forward ran.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import fused_lora as impl

if hasattr(torch.library, "register_autograd"):  # torch 2.4 on; before it, torch.compile traces the Function

    @torch.library.custom_op("minipeft::lora_linear", mutates_args=())
    def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, p: float, seed: Optional[torch.Tensor],
                       route: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (..., N), xa (M, r)): the forward of `lora_linear`, after its deterministic check."""
        (N, K), r = weight.shape, lora_A.shape[0]
        impl.refuse_if_not_deterministic(x.shape[:-1].numel(), N, K, r, p, x.dtype, route)
        with impl._launch_context(x):
            return impl._lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, _int(seed), route)

    @lora_linear_op.register_fake
    def _(x, weight, bias, lora_A, lora_B, scaling, p, seed, route):
        rows = x.shape[:-1].numel()
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_A.shape[0]))

    @torch.library.custom_op("minipeft::lora_linear_backward", mutates_args=())
    def lora_linear_backward_op(dy: torch.Tensor, x: Optional[torch.Tensor], xa: torch.Tensor, weight: torch.Tensor,
                                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float,
                                seed: Optional[torch.Tensor], route: Optional[str], want_dx: bool, want_da: bool,
                                want_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx (..., K), dA (r, K), dB (N, r)) for dy (..., N); an empty tensor for each not wanted
        (a new one each: a custom op's outputs may not share memory). x, the forward's input, is
        read for dA alone (None where A is frozen)."""
        (N, K), rows = weight.shape, xa.shape[0]
        x2 = x.reshape(rows, K) if x is not None else None
        with impl._launch_context(dy):
            dx, dA, dB = impl._lora_backward(
                dy, x2, xa, weight, lora_A, lora_B, scaling, p, _int(seed), want_dx, want_da, want_db,
                impl._dx_in_our_gemm(rows, N, K, dy.dtype, route), impl.DX_GEMM_FIRST, impl.CUBLAS_WITHOUT_DROPOUT)
        return (dx.reshape(*dy.shape[:-1], K) if want_dx else dy.new_empty(0), dA if want_da else dy.new_empty(0),
                dB if want_db else dy.new_empty(0))

    @lora_linear_backward_op.register_fake
    def _(dy, x, xa, weight, lora_A, lora_B, scaling, p, seed, route, want_dx, want_da, want_db):
        (N, K), r = weight.shape, lora_A.shape[0]
        return (dy.new_empty((*dy.shape[:-1], K)) if want_dx else dy.new_empty(0),
                lora_A.new_empty((r, K)) if want_da else dy.new_empty(0),
                lora_B.new_empty((N, r)) if want_db else dy.new_empty(0))

    def _int(seed):
        return int(seed) if seed is not None else 0  # (a CPU tensor: no sync)

    def _setup_context(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, scaling, p, seed, route = inputs
        # x is read back for dA alone: a frozen A (LoRA-FA) keeps no (M, K) tensor alive.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, output[1], weight, lora_A, lora_B, seed)
        ctx.scaling, ctx.p, ctx.route = scaling, p, route

    def _backward(ctx, dy, _dxa):  # (xa is an output for the backward's sake, never used)
        x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
        want_dx, want_da, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx, dA, dB = lora_linear_backward_op(dy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.p, seed, ctx.route,
                                             want_dx, want_da, want_db)
        # No gradient for the frozen weight and bias, nor for scaling, p, seed and route.
        return (dx if want_dx else None, None, None, dA if want_da else None, dB if want_db else None,
                None, None, None, None)

    lora_linear_op.register_autograd(_backward, setup_context=_setup_context)

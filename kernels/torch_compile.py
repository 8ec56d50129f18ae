"""lora_linear under torch.compile: the fused function as two custom ops.

torch.compile traces Python into a graph, and it cannot trace the fused function's host code:
autotuners with hooks and their own benchmarking, scratch kept per CUDA stream, a seed drawn on
the host. Registered with torch.library, the forward and the backward become two opaque calls
in the compiled graph. Each has a "fake" twin that gives its outputs' shapes and dtypes without
running, which is all the compiler needs to know. So a model with fused LoRA layers compiles
whole (fullgraph=True), and the compiled graph still runs these kernels.

    minipeft::lora_linear           (x, W, b, A, B, s, p, seed, route) -> (y, xa, seed used)
    minipeft::lora_linear_backward  (dy, x, xa, W, A, B, s, p, seed used, route, wants) -> (dx, dA, dB)

Only compiled code calls them (`lora_linear` checks `torch.compiler.is_compiling()`). An eager
call runs the autograd.Function directly, because each pass through the dispatcher costs host
time, and the fused calls are host-bound (`benchmarks/lora_linear_notes.md`).

The forward draws the seed when it runs (seed -1) and returns it, so a compiled step drops new
elements on every call. The seed leaves as a CPU tensor (an empty one without dropout), and the
backward redraws the mask from it.
The op is tagged nondeterministic_seeded, so the compiler never runs it twice to save memory:
a second run would draw a different mask. A CUDA graph replays what it captured, seed included;
so, as for `lora_linear`, capture without dropout. The backward reads DX_GEMM_FIRST and
CUBLAS_WITHOUT_DROPOUT when it runs, not when the forward ran.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import fused_lora as impl

if hasattr(torch.library, "register_autograd"):  # torch 2.4 on; before it, torch.compile traces the Function

    def _seed_tensor(seed, p, device):
        """The seed a call used, for its backward: a CPU int64 scalar, which the host reads without a
        sync. Without dropout nothing was drawn, and it is an empty tensor on x's device, so that a
        graph without dropout holds no CPU tensor (torch.compile's CUDA graphs skip graphs that do)."""
        if p > 0:
            return torch.tensor(seed, dtype=torch.int64, device="cpu")
        return torch.empty(0, dtype=torch.int64, device=device)

    @torch.library.custom_op("minipeft::lora_linear", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
    def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, p: float, seed: int,
                       route: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y (..., N), xa (M, r), the seed used): the forward of `lora_linear`, the seed drawn if -1."""
        seed = impl.draw_seed(p) if seed < 0 else seed
        with impl._launch_context(x):
            y, xa = impl._lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, route)
        return y, xa, _seed_tensor(seed, p, x.device)

    @lora_linear_op.register_fake
    def _(x, weight, bias, lora_A, lora_B, scaling, p, seed, route):
        rows = x.shape[:-1].numel()
        return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_A.shape[0])),
                _seed_tensor(0, p, x.device))

    @torch.library.custom_op("minipeft::lora_linear_backward", mutates_args=())
    def lora_linear_backward_op(dy: torch.Tensor, x: Optional[torch.Tensor], xa: torch.Tensor, weight: torch.Tensor,
                                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, p: float,
                                seed: torch.Tensor, route: Optional[str], want_dx: bool, want_da: bool,
                                want_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx (..., K), dA (r, K), dB (N, r)) for dy (..., N); an empty tensor for each not wanted.
        x, the forward's input, is read for dA alone (None where A is frozen)."""
        (N, K), rows = weight.shape, xa.shape[0]
        x2 = x.reshape(rows, K) if x is not None else None
        with impl._launch_context(dy):
            dx, dA, dB = impl._lora_backward(
                dy, x2, xa, weight, lora_A, lora_B, scaling, p, int(seed) if p > 0 else 0, want_dx, want_da, want_db,
                impl._dx_in_our_gemm(rows, N, K, dy.dtype, route), impl.DX_GEMM_FIRST, impl.CUBLAS_WITHOUT_DROPOUT)
        none = dy.new_empty(0)
        return (dx.reshape(*dy.shape[:-1], K) if want_dx else none, dA if want_da else none,
                dB if want_db else none)

    @lora_linear_backward_op.register_fake
    def _(dy, x, xa, weight, lora_A, lora_B, scaling, p, seed, route, want_dx, want_da, want_db):
        (N, K), r = weight.shape, lora_A.shape[0]
        none = dy.new_empty(0)
        return (dy.new_empty((*dy.shape[:-1], K)) if want_dx else none,
                lora_A.new_empty((r, K)) if want_da else none, lora_B.new_empty((N, r)) if want_db else none)

    def _setup_context(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, scaling, p, _, route = inputs
        _, xa, seed = output
        # x is read back for dA alone: a frozen A (LoRA-FA) keeps no (M, K) tensor alive.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, xa, weight, lora_A, lora_B, seed)
        ctx.scaling, ctx.p, ctx.route = scaling, p, route

    def _backward(ctx, dy, _dxa, _dseed):  # (xa and the seed are outputs for the backward's sake, never used)
        x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
        want_dx, want_da, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx, dA, dB = lora_linear_backward_op(dy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.p, seed, ctx.route,
                                             want_dx, want_da, want_db)
        # No gradient for the frozen weight and bias, nor for scaling, p, seed and route.
        return (dx if want_dx else None, None, None, dA if want_da else None, dB if want_db else None,
                None, None, None, None)

    lora_linear_op.register_autograd(_backward, setup_context=_setup_context)

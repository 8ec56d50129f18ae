"""Registers and spills of the fused LoRA kernels on an H100 (sm_90), measured without a GPU.

Triton compiles for a target it is told about, and its wheel ships NVIDIA's `ptxas` and
`cuobjdump`: so the exact machine code a launch on an H100 would get can be built and inspected
on any machine. This script specialises every kernel the way a real launch at the benchmark's
shape specialises it (16-byte aligned pointers, integers divisible by 16 marked so, strides of
1 made constants), compiles it for sm_90 once per autotuning config, and reports:

- registers per thread (at most 255 on Hopper);
- spill stack, in bytes: values that did not fit in registers and live in local memory
  (off-chip, cached). A GEMM whose accumulator spills loses much of its speed, so a config
  that spills here should not win the autotuner's race on a GPU;
- shared memory, which with num_stages bounds how many programs share an SM;
- for the shrink, the instructions one thread issues per K step (its loop's length in SASS):
  drawing the dropout mask, it computes about as long as it reads.

It says nothing about time; `bench_lora_linear.py` measures that on a GPU.

    python benchmarks/kernel_registers.py            # writes results/sm90-registers.md
    python benchmarks/kernel_registers.py --no-write
    PYTHONPATH=/tmp/triton36 python benchmarks/kernel_registers.py --out results/sm90-registers-triton3.6.md

Register use depends on the triton version. The last line tables the triton that a GPU machine
may have instead (`pip install --no-deps --target /tmp/triton36 triton==3.6.0` first).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default; set to silence its warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft.kernels import fused_lora as fl  # noqa: E402

if fl.INTERPRET:
    sys.exit("unset TRITON_INTERPRET: under the interpreter there is no machine code to inspect")

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
M, K, N, R = 8192, 4096, 4096, 16  # the flagship shape: a 4096 x 4096 layer, r = 16


def compile_for_sm90(kernel, args, constexprs, num_warps=4, num_stages=3):
    """Machine code for `kernel` as a launch with these argument values would specialise it.

    args: name -> value for every runtime argument, in order. A value is a dtype string such
    as "*bf16" for a pointer (assumed 16-byte aligned, as torch allocations are) or
    "tensordesc<bf16[128, 64]>" for a TMA descriptor with its block shape, None, an int, or a
    float. Like triton's launcher, None and ints equal to 1 become compile-time constants and
    ints divisible by 16 get a divisibility hint (which lets loads vectorise).
    """
    names = kernel.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
            continue
        value = args[name]
        if value is None:
            signature[name], consts[(i,)] = "constexpr", None
        elif isinstance(value, str) and value.startswith("tensordesc"):
            signature[name] = value
        elif isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in kernel.do_not_specialize:
            signature[name], consts[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and name not in kernel.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def cuobjdump(compiled, *flags):
    """cuobjdump's report on the compiled kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([TOOLS / "cuobjdump", *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(compiled):
    """(registers per thread, spill stack bytes, dynamic shared memory bytes) from the cubin."""
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(compiled, "--dump-resource-usage")).groups()
    return int(regs), int(stack), compiled.metadata.shared


def loop_instructions(compiled):
    """Instructions in the body of a kernel's one loop (the shrink's K loop), in SASS.

    A loop ends in a branch back to its start; this counts from the branch's target to the
    branch, which is what each thread issues per trip. (Only for kernels with one loop: in the
    GEMM the r-chunk loops, the TMA barrier waits and the pipeliner's own code paths make
    "the" loop a matter of reading the listing.)
    """
    code = [(int(addr, 16), text) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);",
                                                               cuobjdump(compiled, "-sass"))]
    loops = [(int(target, 16), addr) for addr, text in code
             for target in re.findall(r"\bBRA\b.*?0x([0-9a-f]+)", text) if int(target, 16) < addr]
    assert len(loops) == 1, f"expected one loop, found {len(loops)}"
    (start, end), = loops
    return sum(1 for addr, _ in code if start <= addr <= end)


def gemm_args(dtype, backward, rank=R, config=None):
    """_matmul_lowrank_kernel's arguments for y (forward) or dx (backward) of the flagship layer.

    forward: x (M, K) @ W^T, l = xa (M, R), r = B^T (R, N), out = y (M, N).
    backward: dy (M, N) @ W, l = dxa (M, R), r = A (R, K), out = dx (M, K), xin = x, dr = dA.
    With a config, the TMA descriptors a launch on Hopper passes with it (with every config:
    see `_set_tma_blocks`); without, none.
    """
    p = f"*{dtype}"
    x_desc = w_desc = None
    if config is not None:
        bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        x_desc = f"tensordesc<{dtype}[{bm}, {bk}]>"
        w_desc = f"tensordesc<{dtype}[{bk}, {bn}]>" if backward else f"tensordesc<{dtype}[{bn}, {bk}]>"
    red, cols = (N, K) if backward else (K, N)  # reduction length, output columns
    w_strides = (cols, 1) if backward else (1, red)  # W (N, K) read as (K, N) in the forward
    r_strides = (cols, 1) if backward else (1, rank)
    return dict(
        x_ptr=p, w_ptr=p, bias_ptr=p, l_ptr=p, r_ptr=p, out_ptr=p, xin_ptr=p, dr_ptr="*fp32",
        x_desc=x_desc, w_desc=w_desc,
        M=M, N=cols, K=red, R=rank,
        stride_xm=red, stride_xk=1, stride_wk=w_strides[0], stride_wn=w_strides[1],
        stride_lm=rank, stride_lr=1, stride_rr=r_strides[0], stride_rn=r_strides[1],
        stride_om=cols, stride_on=1, stride_im=cols, stride_in=1, stride_drr=cols, stride_drn=1,
        scale=1.0, threshold=6553, seed=1234, M_BUCKET=M, TMA_READY=int(config is not None))


def gemm_rows(dtype, backward, dropout, precision="tf32", tma=False):
    """precision: tl.dot's for fp32 tiles; "ieee" is what fp32 gets unless torch allows TF32.
    tma: the configs that load through the TMA copy engine."""
    flags = dict(HAS_BIAS=not backward, HAS_DROPOUT=dropout, R_GRAD=backward,
                 DOT_PRECISION=precision, W_TRANSPOSED=not backward, BLOCK_R=fl._block_r(R))
    for config in fl._gemm_configs(tma=tma):
        compiled = compile_for_sm90(fl._matmul_lowrank_kernel, gemm_args(dtype, backward, config=config),
                                    {**flags, **config.kwargs}, config.num_warps, config.num_stages)
        tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        yield f"{tile}, {config.num_warps} warps, {config.num_stages} stages", resources(compiled)


def shrink_rows(dtype):
    """The shrink in each autotuning config, with the K loop's cost per element of x: with
    dropout the shrink is bound by issuing instructions as much as by reading x."""
    p = f"*{dtype}"
    for config in fl._shrink_configs():
        for dropout in (False, True):
            bm, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
            args = dict(x_ptr=p, a_ptr=p, xa_ptr=p, M=M, K=K, R=R, stride_xm=K, stride_xk=1, stride_ar=K,
                        stride_ak=1, stride_om=R, stride_or=1, keep_scale=1.0, threshold=6553, seed=1234, M_BUCKET=M)
            flags = dict(HAS_DROPOUT=dropout, DOT_PRECISION="tf32", BLOCK_R=fl._block_r(R), **config.kwargs)
            compiled = compile_for_sm90(fl._shrink_kernel, args, flags, config.num_warps, config.num_stages)
            loop = loop_instructions(compiled)
            per_element = loop * config.num_warps * 32 / (bm * bk)  # one K step covers bm x bk of x
            name = f"{bm}x{bk}, {config.num_warps} warps{', dropout' if dropout else ''}"
            yield name, (*resources(compiled), f"{loop} ({per_element:.1f} per element of x)")


def few_rows_args(dtype, dropout, rows=16, rank=R):
    """(arguments, flags) of _few_rows_kernel, the decoding forward, at `rows` rows of the flagship layer."""
    p = f"*{dtype}"
    args = dict(x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=p, b_ptr=p, y_ptr=p, xa_ptr=p, partial_ptr="*fp32",
                arrivals_ptr="*i32", M=rows, N=N, K=K, R=rank,
                stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=rank,
                stride_br=1, stride_ym=N, stride_yn=1, stride_xam=rank, stride_xar=1,
                scale=2.0, keep_scale=1.0, threshold=6553, seed=1234, M_BUCKET=rows)
    flags = dict(HAS_BIAS=True, HAS_DROPOUT=dropout, DOT_PRECISION="tf32", BLOCK_M=max(16, rows),
                 BLOCK_R=max(16, triton.next_power_of_2(rank)))
    return args, flags


def few_rows_rows(dtype, dropout, rows=16, rank=R):
    """The decoding forward in each autotuning config."""
    args, flags = few_rows_args(dtype, dropout, rows, rank)
    for config in fl._few_rows_configs():
        compiled = compile_for_sm90(fl._few_rows_kernel, args, {**flags, **config.kwargs},
                                    config.num_warps, config.num_stages)
        tile = f"{max(16, rows)}x{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}"
        split = f", K split {config.kwargs['SPLIT_K']} ways" if config.kwargs["SPLIT_K"] > 1 else ""
        yield f"{tile}{split}, {config.num_warps} warps, {config.num_stages} stages", resources(compiled)


def lowrank_grad_args(dtype, rank=R, add_to_dx=False):
    """(arguments, flags) of _lowrank_grad_kernel, the backward's low-rank pass, at the flagship
    layer with dropout: dx's masked low-rank part (stored, or with add_to_dx added onto the dy W
    that dx holds: DX_GEMM_FIRST) and dA."""
    p = f"*{dtype}"
    block_r = max(16, triton.next_power_of_2(rank))
    args = dict(dxa_ptr=p, a_ptr=p, x_ptr=p, dx_ptr=p, da_ptr="*fp32", M=M, K=K, R=rank,
                stride_dxam=rank, stride_dxar=1, stride_ar=K, stride_ak=1, stride_xm=K, stride_xk=1,
                stride_dxm=K, stride_dxk=1, stride_dar=K, stride_dak=1, keep_scale=1.0, threshold=6553, seed=1234,
                M_BUCKET=M)
    flags = dict(WRITE_DX=True, ADD_TO_DX=add_to_dx, SUM_DA=True, HAS_DROPOUT=True, DOT_PRECISION="tf32", BLOCK_R=block_r,
                 BLOCK_K=fl._lowrank_grad_block_k(block_r))
    return args, flags


def lowrank_grad_rows(dtype, rank=R, add_to_dx=False):
    """The backward's low-rank pass in each autotuning config."""
    args, flags = lowrank_grad_args(dtype, rank, add_to_dx)
    for config in fl._lowrank_grad_configs():
        compiled = compile_for_sm90(fl._lowrank_grad_kernel, args, {**flags, **config.kwargs}, config.num_warps,
                                    config.num_stages)
        bm, rows = config.kwargs["BLOCK_M"], config.kwargs["ROWS_PER_PROGRAM"]
        yield f"{bm}x{flags['BLOCK_K']}, {rows} rows per program, {config.num_warps} warps", resources(compiled)


def other_rows():
    """Every other variant a launch can ask for, each in one config: that it compiles at all is
    the point (the interpreter the tests use never runs triton's GPU code generation)."""
    one = fl._gemm_configs()[3]  # 128x128x64, 8 warps
    for dtype, precision in (("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
        flags = dict(HAS_BIAS=False, HAS_DROPOUT=True, R_GRAD=True,
                     DOT_PRECISION=precision, W_TRANSPOSED=False, BLOCK_R=16)
        compiled = compile_for_sm90(fl._matmul_lowrank_kernel, gemm_args(dtype, backward=True),
                                    {**flags, **one.kwargs}, one.num_warps, one.num_stages)
        name = f"{dtype}, {precision}" if dtype == "fp32" else dtype
        yield f"dx GEMM + dA, dropout, {name}, 128x128x64", resources(compiled)
    rank = 130  # three chunks of BLOCK_R = 64, the last one mostly padding
    flags = dict(HAS_BIAS=True, HAS_DROPOUT=False, R_GRAD=False, DOT_PRECISION="tf32",
                 W_TRANSPOSED=True, BLOCK_R=fl._block_r(rank))
    compiled = compile_for_sm90(fl._matmul_lowrank_kernel, gemm_args("bf16", backward=False, rank=rank),
                                {**flags, **one.kwargs}, one.num_warps, one.num_stages)
    yield f"y GEMM, r = {rank}, bf16, 128x128x64", resources(compiled)
    args = dict(out_ptr="*i8", M=M, K=K, threshold=6553, seed=1234)
    compiled = compile_for_sm90(fl._dropout_mask_kernel, args, dict(BLOCK_M=32, BLOCK_K=64))
    yield "_dropout_mask_kernel, 32x64", resources(compiled)


def table(title, rows, loop_column=False):
    """A markdown table of (config, (registers, spill, shared memory[, K loop])) rows."""
    header = ["config", "registers", "spill stack (bytes)", "shared memory (KiB)"]
    header += ["K loop (SASS instructions per thread)"] if loop_column else []
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, (regs, stack, smem, *loop) in rows:
        lines.append(" | ".join(["", name, str(regs), str(stack), f"{smem / 1024:.0f}", *loop, ""]).strip())
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sm90-registers.md",
                        help="the markdown file to write (default results/sm90-registers.md)")
    args = parser.parse_args()

    sections = [
        table("y = x W^T + b + s * xa B^T (forward GEMM), bf16", gemm_rows("bf16", backward=False, dropout=False)),
        table("y, float16", gemm_rows("fp16", backward=False, dropout=False)),
        table("y, float32 with torch.backends.cuda.matmul.allow_tf32 (TF32 tensor cores)",
              gemm_rows("fp32", backward=False, dropout=False)),
        table("y, float32 by default (full fp32, no tensor cores)",
              gemm_rows("fp32", backward=False, dropout=False, precision="ieee")),
        table("dx GEMM with dA summed in it, bf16, dropout 0", gemm_rows("bf16", backward=True, dropout=False)),
        table("dx GEMM with dA summed in it, bf16, dropout 0.1", gemm_rows("bf16", backward=True, dropout=True)),
        table("y with TMA loads, bf16", gemm_rows("bf16", backward=False, dropout=False, tma=True)),
        table("dx GEMM + dA with TMA loads, bf16, dropout 0.1",
              gemm_rows("bf16", backward=True, dropout=True, tma=True)),
        table("few rows: y and xa in one launch (decoding forward), M = 16, bf16", few_rows_rows("bf16", False)),
        table("few rows, M = 16, bf16, dropout 0.1", few_rows_rows("bf16", True)),
        table("few rows at its limits, M = 32, r = 64, bf16", few_rows_rows("bf16", False, rows=32, rank=64)),
        table("the shrink, bf16", shrink_rows("bf16"), loop_column=True),
        table("the backward's low-rank pass (dx_lr and dA), bf16, dropout 0.1", lowrank_grad_rows("bf16")),
        table("the backward's low-rank pass at r = 256, bf16, dropout 0.1", lowrank_grad_rows("bf16", rank=256)),
        table("the backward's low-rank pass adding onto dy W (DX_GEMM_FIRST), bf16, dropout 0.1",
              lowrank_grad_rows("bf16", add_to_dx=True)),
        table("other variants, one config each", other_rows()),
    ]
    report = (f"## Registers and spills on sm_90, compiled offline\n\n"
              f"`python benchmarks/kernel_registers.py`, triton {triton.__version__}, no GPU needed. "
              f"Flagship layer: M = {M}, K = N = {K}, r = {R}. One row per autotuning config.\n\n"
              + "\n".join(sections))
    print(report)
    if not args.no_write:
        from minipeft.atomic import atomic_write  # the fsynced write-and-rename every result file uses

        atomic_write(args.out, lambda f: f.write(report.encode()))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

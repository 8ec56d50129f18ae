"""The fused kernels compile for an H100 (sm_90), checked on a machine without a GPU.

The other kernel tests run through Triton's interpreter, which never reaches triton's GPU code
generation: a kernel can pass them and still fail to compile for a GPU. This test compiles
every kernel variant for sm_90 with the `ptxas` in triton's wheel (through
`benchmarks/kernel_registers.py`, in a child process without TRITON_INTERPRET).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_the_forward_gemm_does_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "benchmarks/kernel_registers.py", "--no-write"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]

    sections = dict(re.findall(r"### (.+?)\n(.*?)(?=\n### |\Z)", result.stdout, flags=re.S))
    assert len(sections) == 16, list(sections)

    def spilling(title, configs=9):
        """The autotuning configs of a table whose kernel spills registers to local memory."""
        rows = re.findall(r"\| (\S[^|]*?) \| (\d+) \| (\d+) \|", sections[title])  # (config, registers, spill)
        assert len(rows) == configs, rows
        return [config for config, _, spill in rows if int(spill) > 0]

    # The low-rank term seeds the accumulator, so no config keeps two fp32 tiles live.
    assert spilling("y = x W^T + b + s * xa B^T (forward GEMM), bf16") == []
    # The backward sums dA before the accumulator exists, so x's tile and acc are never both live.
    assert spilling("dx GEMM with dA summed in it, bf16, dropout 0") == []
    # The TMA configs (large tiles only) keep the forward in registers too.
    assert spilling("y with TMA loads, bf16", configs=6) == []
    # Decoding: the one-launch forward keeps x W^T and xa in registers in every config, split or not.
    assert spilling("few rows: y and xa in one launch (decoding forward), M = 16, bf16", configs=12) == []
    # The shrink, with and without the dropout mask, in every config.
    assert spilling("the shrink, bf16", configs=12) == []
    # The backward's low-rank pass, at the flagship rank and at 256 (narrower columns).
    assert spilling("the backward's low-rank pass (dx_lr and dA), bf16, dropout 0.1", configs=8) == []
    assert spilling("the backward's low-rank pass at r = 256, bf16, dropout 0.1", configs=8) == []
    # Adding onto dy W (DX_GEMM_FIRST) takes more registers: the 64-row tiles need 8 warps then.
    add = "the backward's low-rank pass adding onto dy W (DX_GEMM_FIRST), bf16, dropout 0.1"
    assert all(", 4 warps" in row and row.startswith("64x") for row in spilling(add, configs=8))


def ptx_instructions(compile_kernel, pattern):
    """The distinct PTX instructions matching the regex `pattern` in the kernel variant that the
    code `compile_kernel` compiles for sm_90 (it binds the PTX text to `ptx`), in a child process:
    triton's GPU code generation needs TRITON_INTERPRET unset."""
    script = "\n".join([
        "import re, sys",
        "sys.path.insert(0, 'benchmarks')",
        "import kernel_registers as kr",
        "from minipeft.kernels import fused_lora as fl",
        compile_kernel,
        f"print(sorted(set(re.findall({pattern!r}, ptx))))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return eval(result.stdout.strip().splitlines()[-1])  # noqa: S307  a list literal the child printed


@pytest.mark.slow
def test_split_k_partials_meet_through_a_gpu_scope_release_and_acquire():
    # A split config's programs store their partials, pass a barrier, and take a ticket with a
    # GPU-scope acquire-release atomic; the last one reads the partials from L2 (.cg), never
    # from a stale L1. (What the interpreter cannot check: it runs one program at a time.)
    found = ptx_instructions("""
config = next(c for c in fl._few_rows_configs() if c.kwargs["SPLIT_K"] == 4)
args, flags = kr.few_rows_args("bf16", dropout=False)
ptx = kr.compile_for_sm90(fl._few_rows_kernel, args, {**flags, **config.kwargs}, config.num_warps,
                          config.num_stages).asm["ptx"]
""", r"atom\.global\.gpu\.acq_rel\.add\.u32|ld\.global\.cg\.v4\.b32|bar\.sync")
    assert found == ["atom.global.gpu.acq_rel.add.u32", "bar.sync", "ld.global.cg.v4.b32"], found


@pytest.mark.slow
def test_a_ragged_edge_is_not_read_with_wide_loads():
    # The bias is read with unit stride across the last tile's columns. With N = 37 those run
    # past the edge and wrap, so no 32-bit (two bf16) or vector load may straddle them: such a
    # load at an odd address crashed the forward with "misaligned address" on an H200, when the
    # kernel still promised triton aligned blocks there (tl.multiple_of / tl.max_contiguous).
    loads = ptx_instructions("""
args = kr.gemm_args("bf16", backward=False)
args.update(N=37, stride_om=37, stride_im=37, stride_drr=37)  # a ragged last tile of odd width
flags = dict(HAS_BIAS=True, HAS_DROPOUT=False, R_GRAD=False, DOT_PRECISION="tf32", W_TRANSPOSED=True,
             BLOCK_R=16)
config = fl._gemm_configs()[-1]
ptx = kr.compile_for_sm90(fl._matmul_lowrank_kernel, args, {**flags, **config.kwargs}, config.num_warps,
                          config.num_stages).asm["ptx"]
""", r"ld\.global[.\w]*")
    assert loads and all(load.endswith(".b16") for load in loads), loads


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["low-rank pass", "dx GEMM"])
def test_da_is_summed_with_relaxed_reductions(kernel):
    # dA's fp32 atomics are read by no one in the launch: relaxed, they compile to
    # fire-and-forget reductions (red), where triton's default acq_rel gives atom.acq_rel and
    # memory barriers around each in the machine code.
    compile_kernel = {
        "low-rank pass": """
args, flags = kr.lowrank_grad_args("bf16")
config = fl._lowrank_grad_configs()[0]
ptx = kr.compile_for_sm90(fl._lowrank_grad_kernel, args, {**flags, **config.kwargs}, config.num_warps,
                          config.num_stages).asm["ptx"]
""",
        "dx GEMM": """
flags = dict(HAS_BIAS=False, HAS_DROPOUT=True, R_GRAD=True, DOT_PRECISION="tf32", W_TRANSPOSED=False, BLOCK_R=16)
config = fl._gemm_configs()[-1]
ptx = kr.compile_for_sm90(fl._matmul_lowrank_kernel, kr.gemm_args("bf16", backward=True),
                          {**flags, **config.kwargs}, config.num_warps, config.num_stages).asm["ptx"]
"""}[kernel]
    ops = ptx_instructions(compile_kernel, r"\b(?:atom|red)\.global[.\w]*")
    assert ops and all(op.startswith("red.global") and ".relaxed." in op for op in ops), ops

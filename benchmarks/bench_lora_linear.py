"""Benchmark: the fused LoRA linear against the frozen base layer, a plain PyTorch LoRA and peft.

For every shape, in one process and on the same random inputs, it times

    base     y = x W^T + b, W frozen (backward computes dx only)          the yardstick
    torch    x W^T + b + s * dropout(x) A^T B^T in plain PyTorch           F.linear, two thin matmuls
    peft     peft's LoRA layer (get_peft_model around a one-layer module)
    fused    minipeft.kernels.lora_linear                                   Triton

for the forward, the backward alone and forward + backward (median of triton.testing.do_bench,
in ms), shows each as a ratio to `base`, and records the peak memory of one forward + backward
beyond the inputs. The table goes to stdout and, as the section "lora_linear", to
benchmarks/results/<gpu>.md and .json (common.write_results: the device, the versions and the
command beside it).

    python benchmarks/bench_lora_linear.py                  # on a GPU: bf16, M in {16, 512, 8192}
    python benchmarks/bench_lora_linear.py --cases targets  # the issue's target shapes only, with verdicts
    python benchmarks/bench_lora_linear.py --quick          # smoke test, also on CPU (prints only)

`--cases targets` times the shapes the targets are set on (M = 8192 and M = 16, K = N = 4096,
r = 16), runs the fused function down each of its forward routes (our GEMM with the low-rank
epilogue; the one-launch few-rows kernel; cuBLAS's base product with the low-rank term added
after) so that the rules choosing them can be set from data, and ends with a table of each
target, the figure reached and whether it is met.
Results are written after every case, and `--time-budget` stops starting new cases after that
many seconds: a run cut short keeps what it measured.

On CPU the fused row needs TRITON_INTERPRET=1 (very slow, correctness only) and is skipped
otherwise; CPU timings say nothing about the GPU and are not results.
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, fp32 on CPU: checks that the script runs")
    ap.add_argument("--cases", choices=["all", "targets"], default="all",
                    help="all: the full sweep; targets: the target shapes, both fused paths and a verdict table")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new case after this many seconds (what was measured is kept)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results on a GPU; --quick writes nothing unless given); "
                         "the table becomes the 'lora_linear' section of <folder>/<device>.md and .json")
    return ap.parse_args()


# The targets, as (M, p, phase, metric, bound): phase is fwd, bwd or fwd+bwd; metric
# "x base" is the fused time over the frozen base layer's, "x faster than peft" peft's time over
# the fused one, "MiB below peft" peft's peak memory minus the fused one. K = N = 4096, r = 16.
TARGETS = [
    (8192, 0.1, "fwd", "x base", 1.07),
    (8192, 0.1, "bwd", "x base", 1.10),
    (8192, 0.1, "fwd+bwd", "x base", 1.08),
    (8192, 0.0, "fwd+bwd", "x faster than peft", 1.35),
    (8192, 0.1, "fwd+bwd", "x faster than peft", 1.5),
    (8192, 0.1, "fwd+bwd", "MiB below peft", 8192 * 4096 * 2 / 2**20),  # the dropped copy of x in bf16
    (16, 0.0, "fwd", "x base", 1.15),
]


def cases(quick, device, which="all"):
    """(M, K, N, r, p) tuples and the dtype."""
    if which == "targets":
        return sorted({(M, 4096, 4096, 16, p) for M, p, *_ in TARGETS}, reverse=True), torch.bfloat16
    if quick:
        # Two of the fused forward's routes: few rows (M = 16) and, fp32 being full fp32 here, cuBLAS base.
        return [(M, K, N, 8, p) for M, K, N in [(16, 64, 96), (256, 256, 256)] for p in (0.0, 0.1)], torch.float32
    shapes = [(4096, 4096), (4096, 11008)]
    return [(M, K, N, r, p) for M in (16, 512, 8192) for K, N in shapes for r in (8, 16, 64)
            for p in (0.0, 0.1)], torch.bfloat16


# ---------------------------------------------------------------------------------------------
# The four implementations: each builds a function x -> y from the same weights.
# ---------------------------------------------------------------------------------------------


def make_base(W, b, A, B, s, p):
    return lambda x: F.linear(x, W, b)


def make_torch_reference(W, b, A, B, s, p):
    def lora(x):
        y = F.linear(x, W, b)  # (..., N)
        xa = F.linear(x if p == 0 else F.dropout(x, p, training=True), A)  # (..., r)
        # y += s * xa B^T as one addmm on the flattened rows, without a temporary (M, N).
        return y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), B.t(), alpha=s).view(y.shape)
    return lora


def make_peft(W, b, A, B, s, p):
    from peft import LoraConfig, get_peft_model

    r, (N, K) = A.shape[0], W.shape
    holder = nn.Module()
    holder.proj = nn.Linear(K, N, bias=b is not None, device=W.device, dtype=W.dtype)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=s * r, lora_dropout=p, target_modules=["proj"]))
    layer = model.base_model.model.proj  # peft.tuners.lora.Linear
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        if b is not None:
            layer.base_layer.bias.copy_(b)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.to(W.dtype).train()
    return layer


def make_fused(W, b, A, B, s, p, route=None):
    from minipeft.kernels import lora_linear

    return lambda x: lora_linear(x, W, b, A, B, s, dropout_p=p, training=True, route=route)


IMPLEMENTATIONS = {"base": make_base, "torch": make_torch_reference, "peft": make_peft, "fused": make_fused}
# --cases targets: every route the fused function can take (lora_linear's route argument), to
# set the rules that choose between them from measurements.
FORCED_PATHS = {f"fused[{route}]": functools.partial(make_fused, route=route)
                for route in ("triton GEMM", "few rows", "cuBLAS base")}


def fused_runs_here(device):
    if device == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def median_ms(fn, device, params):
    """Median time of fn in ms; the gradients of params are reset before each call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=params, return_mode="median")
    times = []
    for _ in range(4):
        for t in params:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return common.median(times[1:])


def peak_mib(fn, device):
    """Peak memory of one call beyond what was allocated before it, in MiB (GPU only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(layer, x, dy, params, device):
    """Forward, backward alone (over a graph kept alive) and forward + backward."""
    forward = lambda: layer(x)  # noqa: E731  a training forward: it saves what the backward needs
    y = layer(x)
    backward = lambda: y.backward(dy, retain_graph=True)  # noqa: E731
    step = lambda: layer(x).backward(dy)  # noqa: E731
    times = {name: median_ms(fn, device, params) for name, fn in
             [("fwd", forward), ("bwd", backward), ("fwd+bwd", step)]}
    del y
    for t in params:
        t.grad = None
    times["peak_mib"] = peak_mib(step, device)
    return times


def run_case(M, K, N, r, p, dtype, device, impls):
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=g, device=device, dtype=dtype) * std  # noqa: E731
    x = randn(M, K).requires_grad_(True)
    W, b = randn(N, K, std=K**-0.5), randn(N)
    A, B = randn(r, K, std=K**-0.5), randn(N, r, std=r**-0.5)
    dy = randn(M, N)
    s = 2.0

    rows, outputs = [], {}
    for name in impls:
        A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        layer = {**IMPLEMENTATIONS, **FORCED_PATHS}[name](W, b, A_, B_, s, p)
        if isinstance(layer, nn.Module):  # peft: its own copies of A and B
            A_, B_ = (t for t in layer.parameters() if t.requires_grad)
        params = [x, A_, B_]
        with torch.no_grad():
            outputs[name] = layer(x).double()
        rows.append({"method": name, **measure(layer, x, dy, params, device)})
    # Correctness first, as in the Triton tutorials: without dropout every LoRA agrees.
    if p == 0:
        ref = outputs["torch"]
        for row in rows[2:]:  # peft and the fused rows
            row["rel_err_vs_torch"] = ((outputs[row["method"]] - ref).norm() / ref.norm()).item()
            tolerance = 5e-3 if dtype == torch.float32 else 2e-2  # fp32: TF32 where torch allows it
            if row["rel_err_vs_torch"] > tolerance:
                print(f"WARNING: {row['method']} differs from the torch reference by "
                      f"{row['rel_err_vs_torch']:.2e} at M={M} K={K} N={N} r={r}")
    base = rows[0]
    for row in rows:
        for key in ("fwd", "bwd", "fwd+bwd"):
            row[key + "_x_base"] = row[key] / base[key]
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(results):
    lines = ["| M | K -> N | r | p | method | fwd ms (x base) | bwd ms (x base) | fwd+bwd ms (x base) | peak MiB |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for case in results:
        for row in case["rows"]:
            cells = [f"{row[k]:.3f} ({row[k + '_x_base']:.2f})" for k in ("fwd", "bwd", "fwd+bwd")]
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            method = row["method"] + (f" ({case['fused_path']})" if row["method"] == "fused" else "")
            lines.append(f"| {case['M']} | {case['K']} -> {case['N']} | {case['r']} | {case['p']} | "
                         f"{method} | {' | '.join(cells)} | {peak} |")
    return "\n".join(lines)


def target_verdicts(results):
    """One row per target of TARGETS whose case was measured: the figure reached and the verdict.

    The fused function is judged by its own choice of path (row "fused"); the forced-path rows
    are for setting that choice, not for the verdict."""
    by_case = {(c["M"], c["K"], c["N"], c["r"], c["p"]): {row["method"]: row for row in c["rows"]} for c in results}
    verdicts = []
    for M, p, phase, metric, bound in TARGETS:
        rows = by_case.get((M, 4096, 4096, 16, p))
        if rows is None or "fused" not in rows:
            continue
        fused, peft = rows["fused"], rows.get("peft")
        if metric == "x base":
            value, met = fused[phase + "_x_base"], fused[phase + "_x_base"] <= bound
        elif metric == "x faster than peft":
            value = peft[phase] / fused[phase]
            met = value >= bound
        else:  # MiB below peft
            if fused["peak_mib"] is None:
                continue
            value = peft["peak_mib"] - fused["peak_mib"]
            met = value >= bound
        verdicts.append({"M": M, "p": p, "phase": phase, "metric": metric, "target": bound, "value": value, "met": met})
    return verdicts


def verdicts_markdown(verdicts):
    lines = ["| M | p | phase | figure | target | reached | met |", "|---:|---:|---|---|---:|---:|---|"]
    for v in verdicts:
        sign = "<=" if v["metric"] == "x base" else ">="
        lines.append(f"| {v['M']} | {v['p']} | {v['phase']} | {v['metric']} | {sign} {v['target']:.2f} | "
                     f"{v['value']:.3f} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines)


def autotuned_configs():
    """The base GEMM's autotuning winners so far: {tuning key: config}, as text."""
    import minipeft.kernels.fused_lora as impl

    return {str(key): str(config) for key, config in impl._matmul_lowrank_tuned.cache.items()}


def main():
    args = parse_args()
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        sys.exit("no GPU: run with --quick for a CPU smoke test")
    case_list, dtype = cases(args.quick, device, args.cases)
    impls = [name for name in IMPLEMENTATIONS if name != "fused" or fused_runs_here(device)]
    if "fused" not in impls:
        print("fused kernels skipped: no GPU (set TRITON_INTERPRET=1 to run them interpreted)")
    elif args.cases == "targets":
        impls += list(FORCED_PATHS)
    section = "lora_linear" if args.cases == "all" else "lora_linear (targets)"
    out = args.out if args.out is not None else (None if args.quick else common.RESULTS_DIR)

    from minipeft.kernels.fused_lora import forward_path, use_few_rows

    meta = {
        "dtype": str(dtype).removeprefix("torch."),
        "triton": _version("triton"),
        "timing": "median ms of triton.testing.do_bench (GPU) / of 3 calls (CPU); x base = ratio to base",
        "peak_mib": "torch.cuda.max_memory_allocated over one fwd+bwd, minus what was allocated before",
    }
    results = []
    for M, K, N, r, p in case_list:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {len(case_list) - len(results)} cases not run")
            meta["not_run"] = [list(c) for c in case_list[len(results):]]
            break
        # The few-rows kernel holds all of a program's rows and the whole rank at once: only
        # shapes it is built for can be sent down it.
        case_impls = [name for name in impls if name != "fused[few rows]" or use_few_rows(M, r, dtype)]
        rows = run_case(M, K, N, r, p, dtype, device, case_impls)
        path = forward_path(M, N, K, r, dtype)
        results.append({"M": M, "K": K, "N": N, "r": r, "p": p, "fused_path": path, "rows": rows})
        print(f"M={M} K={K} N={N} r={r} p={p}: " +
              ", ".join(f"{row['method']} {row['fwd+bwd']:.3f} ms" for row in rows), flush=True)
        if out is not None:  # after every case, so that a run cut short keeps what it measured
            write(device, section, meta, results, out, quiet=True)

    print()
    print(markdown(results))
    verdicts = target_verdicts(results)
    if verdicts:
        print()
        print(verdicts_markdown(verdicts))
    if out is not None:
        write(device, section, meta, results, out)


def write(device, section, meta, results, out, quiet=False):
    if device == "cuda":
        meta["autotuned"] = autotuned_configs()
    verdicts = target_verdicts(results)
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items() if k not in ("autotuned", "not_run"))
    text = f"{header}\n\n{markdown(results)}\n"
    if verdicts:
        text += f"\nTargets (fused, its own choice of path):\n\n{verdicts_markdown(verdicts)}\n"
    path = common.write_results(device, section, {"meta": meta, "cases": results, "targets": verdicts}, text,
                                results_dir=out)
    if not quiet:
        print(f"\nwrote {path} and {path.with_suffix('.json')}")


def _version(package):
    try:
        return __import__(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()

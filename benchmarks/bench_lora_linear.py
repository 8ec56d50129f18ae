"""Benchmark: the fused LoRA linear against the frozen base layer, a plain PyTorch LoRA and peft.

For every shape, in one process and on the same random inputs, it times

    base     y = x W^T + b, W frozen (backward computes dx only)          the yardstick
    torch    x W^T + b + s * dropout(x) A^T B^T in plain PyTorch           F.linear, two thin matmuls
    peft     peft's LoRA layer (get_peft_model around a one-layer module)
    fused    minipeft.kernels.lora_linear                                   Triton

for the forward, the backward alone and forward + backward, shows each as a ratio to `base`, and
records the peak memory of one forward + backward beyond the inputs. The table goes to stdout
and, as the section "lora_linear", to benchmarks/results/<gpu>.md and .json
(common.write_results: the device, the versions and the command beside it).

    python benchmarks/bench_lora_linear.py                  # on a GPU: bf16, M in {16, 512, 8192}
    python benchmarks/bench_lora_linear.py --cases targets  # the issue's target shapes only, with verdicts
    python benchmarks/bench_lora_linear.py --quick          # smoke test, also on CPU (prints only)

Timing. A GPU's clock moves with its power draw and temperature: on one H200 the same frozen
layer measured 0.344 ms in one case and 0.411 ms two cases later. So the methods are timed in
rounds: each round times every method once (the median of `triton.testing.do_bench`, L2
flushed before each call), in an order that flips every round, and a method's ratio to `base`
is taken within each round, where both saw the same clock. A row gives the median time, the
median ratio and, in brackets, the lowest and highest ratio over the rounds: a difference
inside that spread is noise.

Decoding (M <= 32) is also timed as it is deployed, from a CUDA graph: a no-grad forward
replayed without Python in between, so the row measures the GPU rather than the launch path
(eager, a frozen layer at M = 16 is ~20 us of host time for ~7 us of GPU work). The graph
cycles over several copies of the weights, more bytes than the L2 holds, so that every call
reads W from device memory as a real decoding step does.

`--cases targets` times the shapes the targets are set on (M = 8192 and M = 16, K = N = 4096,
r = 16), runs the fused function down each of its forward routes (our GEMM, its accumulator
seeded with the low-rank term; the one-launch few-rows kernel; cuBLAS adding its base product
onto the low-rank term) so that the rules choosing them can be set from data, and ends with a
table of each target, the figure reached and whether it is met.
Results are written after every case, and `--time-budget` stops starting new cases after that
many seconds: a run cut short keeps what it measured.

On CPU the fused row needs TRITON_INTERPRET=1 (very slow, correctness only) and is skipped
otherwise; CPU timings say nothing about the GPU and are not results.
"""

import argparse
import functools
import os
import re
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
    ap.add_argument("--time-budget", type=common.positive_int, default=None, metavar="SECONDS",
                    help="start no new case after this many seconds (what was measured is kept)")
    ap.add_argument("--rounds", type=common.positive_int, default=None,
                    help="timing rounds per case, the methods interleaved (default 5 on a GPU, 1 on the CPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also list the kernels of one forward + backward of each method, with their GPU "
                         "time, and its host operations, with theirs (torch.profiler): where the time over "
                         "the base goes")
    ap.add_argument("--no-graph", action="store_true",
                    help="skip the decoding cases' CUDA-graph timing (a replay that faults ends the process)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results on a GPU; --quick writes nothing unless given); "
                         "the table becomes the 'lora_linear' section of <folder>/<device>.md and .json")
    args = ap.parse_args()
    if args.quick and args.cases == "targets":
        ap.error("--quick runs tiny shapes, --cases targets the 8192 x 4096 ones: give one of them")
    return args


# The targets, as (M, p, phase, metric, bound): phase is fwd, bwd, fwd+bwd or fwd graph; metric
# "x base" is the fused time over the frozen base layer's, "x faster than peft" peft's time over
# the fused one, "MiB below peft" peft's peak memory minus the fused one. K = N = 4096, r = 16.
TARGETS = [
    (8192, 0.1, "fwd", "x base", 1.07),
    (8192, 0.1, "bwd", "x base", 1.10),
    (8192, 0.1, "fwd+bwd", "x base", 1.08),
    (8192, 0.0, "fwd+bwd", "x faster than peft", 1.35),
    (8192, 0.1, "fwd+bwd", "x faster than peft", 1.5),
    (8192, 0.1, "fwd+bwd", "MiB below peft", 8192 * 4096 * 2 / 2**20),  # the dropped copy of x in bf16
    (16, 0.0, "fwd", "x base", 1.15),  # eager: Python launches each call
    (16, 0.0, "fwd graph", "x base", 1.15),  # replayed from a CUDA graph, as decoding is deployed
]


def cases(quick, device, which="all"):
    """(M, K, N, r, p) tuples and the dtype."""
    if which == "targets":
        # Ascending M, as in the sweep (--profile takes the kernels at the largest M, after every case is timed).
        return sorted({(M, 4096, 4096, 16, p) for M, p, *_ in TARGETS}), torch.bfloat16
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


def make_minipeft_reference(W, b, A, B, s, p):
    """minipeft's LoRA layer on its pure-PyTorch reference path, the one the kernels are tested against."""
    import minipeft

    return lora_layer(minipeft, W, b, A, B, s, p, use_fused_kernels=False)


def make_peft(W, b, A, B, s, p):
    import peft

    return lora_layer(peft, W, b, A, B, s, p)


def lora_layer(library, W, b, A, B, s, p, **options):
    """``library``'s LoRA layer (peft's or minipeft's, built the same way) around a linear layer
    holding W and b, with the factors A and B, in W's dtype and training mode."""
    r, (N, K) = A.shape[0], W.shape
    holder = nn.Module()
    holder.proj = nn.Linear(K, N, bias=b is not None, device=W.device, dtype=W.dtype)
    config = library.LoraConfig(r=r, lora_alpha=s * r, lora_dropout=p, target_modules=["proj"], **options)
    layer = library.get_peft_model(holder, config).base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        if b is not None:
            layer.base_layer.bias.copy_(b)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.to(W.dtype).train()
    return layer


def make_fused(W, b, A, B, s, p, route=None, **library_settings):
    """The fused function down `route`. library_settings (fused_lora's module attributes, e.g.
    DX_GEMM_FIRST) stand in for the library's own during each call: the forward records
    DX_GEMM_FIRST and CUBLAS_WITHOUT_DROPOUT for the backward, and reads the few-rows autotuner."""
    import minipeft.kernels.fused_lora as impl

    def fused(x):
        if not library_settings:
            return impl.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True, route=route)
        defaults = {name: getattr(impl, name) for name in library_settings}
        vars(impl).update(library_settings)
        try:
            return impl.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True, route=route)
        finally:
            vars(impl).update(defaults)
    return fused


@functools.cache
def few_rows_unsplit():
    """The few-rows kernel tuned over its configs that do not split K: the kernel as it was
    before split-K, timed beside the library's."""
    import minipeft.kernels.fused_lora as impl

    return impl._autotuned_few_rows([c for c in impl._few_rows_configs() if c.kwargs["SPLIT_K"] == 1])


IMPLEMENTATIONS = {"base": make_base, "minipeft ref": make_minipeft_reference, "peft": make_peft, "fused": make_fused}
# --cases targets: every route the fused function can take (lora_linear's route argument), to
# set the rules that choose between them from measurements.
FORCED_PATHS = {f"fused[{route}]": functools.partial(make_fused, route=route)
                for route in ("triton GEMM", "few rows", "cuBLAS base")}
# ... and the backward's other order on the cuBLAS route: the low-rank pass first, dy W added
# onto it last (DX_GEMM_FIRST off), beside the library's (dy W first, the pass adding onto it);
FORCED_PATHS["fused[dx GEMM last]"] = functools.partial(make_fused, route="cuBLAS base", DX_GEMM_FIRST=False)
# ... and, without dropout, the backward's low-rank part in our pass rather than two cuBLAS products;
FORCED_PATHS["fused[p=0 pass in Triton]"] = functools.partial(make_fused, route="cuBLAS base",
                                                             CUBLAS_WITHOUT_DROPOUT=False)
# ... and decoding's kernel with K never split, beside the library's, whose autotuner may split it.
FORCED_PATHS["fused[few rows, K not split]"] = lambda W, b, A, B, s, p: make_fused(
    W, b, A, B, s, p, route="few rows", _few_rows_tuned=few_rows_unsplit())


def fused_runs_here(device):
    if device == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------

# do_bench's window per call of a timer: a round of the target cases (seven methods, three
# phases) then takes a few seconds, and five rounds fit a short GPU lease.
WARMUP_MS, REP_MS = 10, 25
# Decoding under a CUDA graph: copies of the weights the graph cycles over, so that they
# (4 x 32 MiB at 4096 x 4096 bf16) outgrow the L2 (50 MB on an H100, 60 MB on an H200), and
# calls per replay, so that one replay's launch is spread over many calls.
GRAPH_WEIGHT_COPIES, GRAPH_CALLS = 4, 25
DECODE_MAX_M = 32  # rows up to which a case without dropout is decoding and gets the graph timing


def eager_timer(fn, device, params):
    """A timer for fn: each call returns the median time of fn in ms, the gradients of params
    reset before every call of fn."""
    if device == "cuda":
        import triton.testing

        return lambda: triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=params,
                                               return_mode="median")

    def cpu_timer():
        times = []
        for _ in range(4):
            for t in params:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return common.median(times[1:])  # the first call pays one-off costs
    return cpu_timer


def graph_timer(forwards):
    """A timer for decoding: forwards (one no-grad forward per copy of the weights) are captured
    once into a CUDA graph, GRAPH_CALLS rounds of all of them; each call of the timer replays it
    ten times and returns the median time of one forward in ms.

    Each graph is warmed up and captured on a stream of its own. cuBLAS keeps one workspace per
    stream: warmed up on that stream, it comes from the ordinary allocator before the capture.
    Captured on torch's shared default capture stream instead, the first graph's capture
    allocates it in that graph's private pool and later graphs reuse it; releasing it then
    leaves a live graph pointing at freed memory (pytorch/pytorch#193402). Captured that way,
    the first GPU run of this timer replayed into an illegal memory access; captured this way,
    the next ran. The timer also keeps `forwards` alive: a replay reads the tensors they close
    over (e.g. peft's own copies of the weights).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for f in forwards:  # outside the capture: autotuning, compiling, the allocator's first blocks
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=side):
        for _ in range(GRAPH_CALLS):
            for f in forwards:
                f()
    calls = GRAPH_CALLS * len(forwards)

    def replay_ms(keep_alive=(forwards, side)):
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return common.median(times)
    return replay_ms


HOST_CALLS = 21  # calls per phase whose host time and latency are taken (the medians)


def host_and_latency_ms(fn, device, params):
    """(host, latency): the median ms of one call of fn, each call starting with the GPU idle
    (synchronised before it), from the call to its return (host) and to the GPU's end of its
    work (latency).

    do_bench queues its calls back to back. Where the GPU is the slower, the queue keeps it busy
    and each call takes its GPU time; where the host is, the GPU waits for each launch, and a
    call takes its host time up to its last launch plus the GPU work still to do after it: the
    order of the launches counts then (DX_GEMM_FIRST), as it does for the latency, what a call
    that finds the GPU idle takes (a training step that synchronises)."""
    host, latency = [], []
    for _ in range(HOST_CALLS):
        for t in params:
            t.grad = None
        common.sync(device)
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e3)
        common.sync(device)
        latency.append((time.perf_counter() - start) * 1e3)
    return common.median(host), common.median(latency)


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


def output_and_grads(layer, x, dy, params):
    """[y, then the gradient of each of params, or None] in float64, after one forward and
    backward with dy."""
    for t in params:
        t.grad = None
    y = layer(x)
    y.backward(dy)
    out = [y.detach().double(), *(None if t.grad is None else t.grad.double() for t in params)]
    for t in params:
        t.grad = None
    return out


def phases(layer, x, dy):
    """The three timed callables: forward, backward alone (over a graph kept alive), both."""
    y = layer(x)  # a training forward: it saves what the backward needs
    return {"fwd": lambda: layer(x),
            "bwd": lambda: y.backward(dy, retain_graph=True),
            "fwd+bwd": lambda: layer(x).backward(dy)}


def interleaved(timers, rounds):
    """{method: {phase: [ms of each round]}}: every round calls every method's timers once, in
    an order that flips every round, so that the clock's drift hits all methods alike."""
    samples = {name: {phase: [] for phase in by_phase} for name, by_phase in timers.items()}
    names = list(timers)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            for phase, timer in timers[name].items():
                samples[name][phase].append(timer())
    return samples


def summarise(samples, baseline="base"):
    """One row per method from `interleaved`'s samples: per phase the median ms, and the ratio
    to the baseline taken round by round: its median, lowest and highest."""
    rows = []
    for name, by_phase in samples.items():
        row = {"method": name}
        for phase, times in by_phase.items():
            if phase not in samples[baseline]:
                continue
            ratios = [t / b for t, b in zip(times, samples[baseline][phase])]
            row[phase] = common.median(times)
            row[phase + "_rounds"] = times
            row[phase + "_x_base"] = common.median(ratios)
            row[phase + "_x_base_range"] = [min(ratios), max(ratios)]
        rows.append(row)
    return rows


def run_case(M, K, N, r, p, dtype, device, impls, rounds, profile=False, graph=True):
    """The case's rows (every method's timings, peak memory, host time and latency); with
    ``profile``, also each row with what ``profile_kernels`` runs for it, after every case is timed."""
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=g, device=device, dtype=dtype) * std  # noqa: E731
    s = 2.0

    def weights():
        return randn(N, K, std=K**-0.5), randn(N), randn(r, K, std=K**-0.5), randn(N, r, std=r**-0.5)

    def build(name, W, b, A, B):
        """The method's layer and its trainable tensors (peft's layer holds its own copies of A and B)."""
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        layer = {**IMPLEMENTATIONS, **FORCED_PATHS}[name](W, b, A, B, s, p)
        if isinstance(layer, nn.Module):
            A, B = (t for t in layer.parameters() if t.requires_grad)
        return layer, [A, B]

    x = randn(M, K).requires_grad_(True)
    dy = randn(M, N)
    W, b, A, B = weights()
    decoding = graph and device == "cuda" and M <= DECODE_MAX_M and p == 0  # a decoding step runs without dropout
    copies = [weights() for _ in range(GRAPH_WEIGHT_COPIES - 1)] if decoding else []

    timers, outputs, steps, calls = {}, {}, {}, {}
    for name in impls:
        layer, lora_params = build(name, W, b, A, B)
        params = [x, *lora_params]
        outputs[name] = output_and_grads(layer, x, dy, params)
        calls[name] = phases(layer, x, dy)
        timers[name] = {phase: eager_timer(fn, device, params) for phase, fn in calls[name].items()}
        if decoding:
            layers = [layer] + [build(name, *c)[0] for c in copies]
            try:
                timers[name]["fwd graph"] = graph_timer([functools.partial(each, x) for each in layers])
            except RuntimeError as err:  # a method that cannot be captured loses this column, not the run
                print(f"WARNING: {name} could not be captured in a CUDA graph at M={M}: {err}")
        steps[name] = (lambda layer=layer: layer(x).backward(dy), lambda layer=layer: layer(x), params)

    # Correctness first, as in the Triton tutorials: without dropout every LoRA agrees, in y and
    # in the gradients of x, A and B that the backward columns time. (With dropout each method
    # draws its own mask; tests/test_kernels_cuda.py checks the fused one against float64.)
    errors = {}
    if p == 0:
        tolerance = 5e-3 if dtype == torch.float32 else 2e-2  # fp32: TF32 where torch allows it
        for name in impls[2:]:  # peft and the fused rows
            errors[name] = max(((t - ref).norm() / ref.norm()).item() for t, ref in zip(outputs[name], outputs["minipeft ref"]))
            if errors[name] > tolerance:
                print(f"WARNING: {name} differs from minipeft's reference path by {errors[name]:.2e} (y, dx, dA or dB) "
                      f"at M={M} K={K} N={N} r={r}")

    rows = summarise(interleaved(timers, rounds))
    for row in rows:
        step, forward, params = steps[row["method"]]
        for t in params:
            t.grad = None
        row["peak_mib"] = peak_mib(step, device)
        measured = {phase: host_and_latency_ms(fn, device, params) for phase, fn in calls[row["method"]].items()}
        row["host_ms"] = {phase: host for phase, (host, _) in measured.items()}
        row["latency_ms"] = {phase: latency for phase, (_, latency) in measured.items()}
        if row["method"] in errors:
            row["rel_err_vs_reference"] = errors[row["method"]]
    return rows, [(row, *steps[row["method"]]) for row in rows] if profile else []


def profile_kernels(profiled, device):
    """Each profiled row's host time (``row["host_profile"]``), and its kernels
    (``row["kernels"]``) where asked, once every case is timed: a profiler session can leave
    CUPTI attached, which slows the launches of whatever is timed after it. profiled holds
    (row, with_kernels, decoding, step, forward, params)."""
    for row, with_kernels, decoding, step, forward, params in profiled:
        if with_kernels:
            # The forward alone is profiled too, so that each kernel's time splits into forward
            # and backward (y's GEMM and dx's share a kernel name).
            fwd_us = {name: us for name, _, us in kernel_times(forward, params, device)}
            row["kernels"] = [(name, calls, us, fwd_us.get(name, 0.0))
                              for name, calls, us in kernel_times(step, params, device)]
        row["host_profile"] = {"forward + backward": host_profile(step, params, device)}
        if decoding:  # a forward without autograd, all host time
            row["host_profile"]["no-grad forward"] = host_profile(torch.no_grad()(forward), params, device)


def host_profile(step, params, device, steps=10):
    """Where a step's host time goes, the steps queued back to back as do_bench queues them (no
    sync between): {"host_ms": per step until the last step returns, "wall_ms": until its GPU
    work ends, "gpu_ms": the GPU's kernels, copies and fills per step (None on the CPU),
    "outside_ops_ms": per step, host time inside no traced operation, "ops": [(host operation,
    calls per step, its own us per step)], slowest first}.

    host_ms near wall_ms means the GPU waits for the host; an operation whose own time is far
    above a launch's (a few us) is where the host waits, on an allocation or a sync. What no
    operation covers is Python: the layer's own, autograd's, and Triton's launcher up to its
    driver call, which the profiler does not trace (the untraced share of a step, host_ms less
    the time of its outermost operations). The final sync, which waits for the queued GPU work,
    is left out. The profiler's bookkeeping adds to every operation, so these compare methods;
    the host column of the timing table times them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(2):  # warm-up, as in kernel_times
        step()
    common.sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            for t in params:
                t.grad = None
            step()
        host = time.perf_counter() - start
        with record_function(FINAL_SYNC):
            common.sync(device)
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if not getattr(e, "is_user_annotation", False) and e.name != FINAL_SYNC]
    sync_start = min((e.time_range.start for e in prof.events() if e.name == FINAL_SYNC), default=float("inf"))
    ops, gpu_us, traced_us = {}, 0.0, 0.0
    for e in events:
        if e.device_type.name == "CUDA":
            gpu_us += e.self_device_time_total
        elif e.time_range.start < sync_start:
            if e.cpu_parent is None:  # an outermost operation (the backward's run on autograd's thread)
                traced_us += e.cpu_time_total
            if e.self_cpu_time_total > 0:
                calls, us = ops.get(e.name, (0, 0.0))
                ops[e.name] = (calls + 1, us + e.self_cpu_time_total)
    return {"host_ms": host * 1e3 / steps, "wall_ms": wall * 1e3 / steps,
            "gpu_ms": gpu_us / steps / 1e3 if device == "cuda" else None,
            "outside_ops_ms": max(0.0, host * 1e3 - traced_us / 1e3) / steps,
            "ops": sorted(((name, calls / steps, us / steps) for name, (calls, us) in ops.items()),
                          key=lambda op: -op[2])[:HOST_OPS_KEPT]}


FINAL_SYNC = "host_profile: the final sync"
HOST_OPS_KEPT = 25  # the slowest host operations a host profile keeps


def kernel_times(step, params, device, steps=5):
    """[(kernel, calls per step, us per step)] of step, slowest first: the device's kernels on a
    GPU (with their GPU time), the operators on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm-up: autotuning and allocations stay out of the profile
        step()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            for t in params:
                t.grad = None
            step()
        common.sync(device)
    kernels = []
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if us > 0 and (device == "cpu" or event.device_type.name == "CUDA"):
            kernels.append((event.key, event.count / steps, us / steps))
    return sorted(kernels, key=lambda k: -k[2])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

PHASES = ("fwd", "bwd", "fwd+bwd", "fwd graph")


def cell(row, phase):
    """'ms · ratio [lowest-highest]' for one phase of a row, '-' where it was not timed."""
    if phase not in row:
        return "-"
    lo, hi = row[phase + "_x_base_range"]
    return f"{row[phase]:.3f} · {row[phase + '_x_base']:.2f} [{lo:.2f}-{hi:.2f}]"


def markdown(results):
    lines = ["| M | K -> N | r | p | method | fwd | bwd | fwd+bwd | fwd, CUDA graph | host ms: fwd / bwd / fwd+bwd "
             "| latency ms: fwd / bwd / fwd+bwd | peak MiB | error vs minipeft ref |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in results:
        for row in case["rows"]:
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            error = f"{row['rel_err_vs_reference']:.1e}" if "rel_err_vs_reference" in row else "-"
            host, latency = (" / ".join(f"{row[key][phase]:.3f}" for phase in PHASES if phase in row.get(key, {})) or "-"
                             for key in ("host_ms", "latency_ms"))
            method = row["method"] + (f" ({case['fused_path']})" if row["method"] == "fused" else "")
            lines.append(f"| {case['M']} | {case['K']} -> {case['N']} | {case['r']} | {case['p']} | {method} | "
                         + " | ".join(cell(row, phase) for phase in PHASES) + f" | {host} | {latency} | {peak} | {error} |")
    return "\n".join(lines)


# cuBLAS names its GEMM kernels after the code that built them (nvjet, cutlass, xmma, ..._gemm_...).
CUBLAS_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma", re.IGNORECASE)


def phase_us(kernel, phase):
    """A profiled kernel's us per step in phase "fwd", "bwd" or "fwd+bwd"; kernel is (name,
    calls, us per forward + backward, us per forward)."""
    _, _, total, fwd = kernel
    return {"fwd": fwd, "bwd": total - fwd, "fwd+bwd": total}[phase]


def gemm_speed(case, phase="fwd+bwd"):
    """(our GEMM's us, cuBLAS's us, cuBLAS / ours) in one phase of a profiled case, or None:
    `_matmul_lowrank_kernel` (y in the forward, dx with dA in the backward, low-rank terms and all) in
    a row whose GEMMs are ours (`fused[triton GEMM]`, or `fused` where that is its own route)
    against the frozen layer's GEMMs. Fusing the low-rank term into the GEMM pays only if this
    GEMM keeps about 95% of cuBLAS's speed (the issue's rule; `FUSE_BASE_GEMM` in
    kernels/fused_lora.py)."""
    rows = {row["method"]: row for row in case["rows"] if "kernels" in row}
    own_route_is_ours = case.get("fused_path") == "triton GEMM"
    ours_row = rows.get("fused[triton GEMM]") or (rows.get("fused") if own_route_is_ours else None)
    if "base" not in rows or ours_row is None:
        return None
    ours = sum(phase_us(k, phase) for k in ours_row["kernels"] if "_matmul_lowrank_kernel" in k[0])
    cublas = sum(phase_us(k, phase) for k in rows["base"]["kernels"] if CUBLAS_GEMM.search(k[0]))
    return (ours, cublas, cublas / ours) if ours and cublas else None


def kernels_markdown(results, top=8):
    """Per profiled case and method, its `top` kernels by time per forward + backward and its
    `top` host operations, and our GEMM's speed against cuBLAS's."""
    lines = []
    for case in results:
        for row in case["rows"]:
            where = f"{row['method']} at M={case['M']} K={case['K']} N={case['N']} r={case['r']} p={case['p']}"
            if "kernels" in row:
                total = sum(us for _, _, us, _ in row["kernels"])
                lines += [f"\n{where}: {total:.1f} us of kernels per forward + backward\n",
                          "| kernel | calls | us | of which forward | share |", "|---|---:|---:|---:|---:|"]
                lines += [f"| `{name[:90]}` | {calls:g} | {us:.1f} | {fwd:.1f} | {us / total:.0%} |"
                          for name, calls, us, fwd in row["kernels"][:top]]
            for what, host in row.get("host_profile", {}).items():
                gpu = ("" if host["gpu_ms"] is None else f", {host['wall_ms']:.3f} ms to the end of its GPU work "
                       f"({host['gpu_ms']:.3f} ms on the GPU: busy {host['gpu_ms'] / host['wall_ms']:.0%})")
                outside = host.get("outside_ops_ms")  # (not in results written before it was)
                untraced = "" if outside is None else f"; {outside:.3f} ms of it in no operation (Python, launchers)"
                lines += [f"\n{where}, its host: {host['host_ms']:.3f} ms per {what} queued back to back{gpu}"
                          f"{untraced}\n",
                          "| host operation | calls | own us |", "|---|---:|---:|"]
                lines += [f"| `{name[:90]}` | {calls:g} | {us:.1f} |" for name, calls, us in host["ops"][:top]]
        speed = {phase: gemm_speed(case, phase) for phase in ("fwd", "bwd", "fwd+bwd")}
        if all(speed.values()):
            ours, cublas, ratio = speed["fwd+bwd"]
            (y_ours, y_cublas, y_ratio), (dx_ours, dx_cublas, dx_ratio) = speed["fwd"], speed["bwd"]
            lines.append(f"\nOur GEMM (y and dx, with the low-rank term and dA): {ours:.1f} us against "
                         f"cuBLAS's {cublas:.1f} us in the frozen layer: {ratio:.0%} of cuBLAS's speed "
                         f"(fusing pays above ~95%); y {y_ours:.1f} us against {y_cublas:.1f} ({y_ratio:.0%}), "
                         f"dx {dx_ours:.1f} us against {dx_cublas:.1f} ({dx_ratio:.0%}).")
    return "\n".join(lines)


def target_verdicts(results):
    """One row per target of TARGETS whose case was measured: the figure reached (the median
    over the rounds, and its lowest and highest) and the verdict, on the median.

    The fused function is judged by its own choice of path (row "fused"); the forced-path rows
    are for setting that choice, not for the verdict."""
    by_case = {(c["M"], c["K"], c["N"], c["r"], c["p"]): {row["method"]: row for row in c["rows"]} for c in results}
    verdicts = []
    for M, p, phase, metric, bound in TARGETS:
        rows = by_case.get((M, 4096, 4096, 16, p))
        if rows is None or "fused" not in rows or phase not in rows["fused"]:
            continue
        fused, peft = rows["fused"], rows.get("peft")
        if metric == "x base":
            value, spread = fused[phase + "_x_base"], fused[phase + "_x_base_range"]
            met = value <= bound
        elif metric == "x faster than peft":
            ratios = [a / b for a, b in zip(peft[phase + "_rounds"], fused[phase + "_rounds"])]
            value, spread = common.median(ratios), [min(ratios), max(ratios)]
            met = value >= bound
        else:  # MiB below peft
            if fused["peak_mib"] is None:
                continue
            value, spread = peft["peak_mib"] - fused["peak_mib"], None
            met = value >= bound
        verdicts.append({"M": M, "p": p, "phase": phase, "metric": metric, "target": bound, "value": value,
                         "spread": spread, "met": met})
    return verdicts


def verdicts_markdown(verdicts):
    lines = ["| M | p | phase | figure | target | reached (median) | lowest-highest over rounds | met |",
             "|---:|---:|---|---|---:|---:|---|---|"]
    for v in verdicts:
        sign = "<=" if v["metric"] == "x base" else ">="
        spread = "-" if v["spread"] is None else f"{v['spread'][0]:.3f}-{v['spread'][1]:.3f}"
        lines.append(f"| {v['M']} | {v['p']} | {v['phase']} | {v['metric']} | {sign} {v['target']:.2f} | "
                     f"{v['value']:.3f} | {spread} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines)


def autotuned_configs():
    """Each autotuned kernel's winners so far: {kernel: {tuning key: config}}, as text."""
    import minipeft.kernels.fused_lora as impl

    tuned = {"base GEMM": impl._matmul_lowrank_tuned, "few rows": impl._few_rows_tuned, "shrink": impl._shrink_tuned,
             "low-rank grad": impl._lowrank_grad_tuned}
    return {name: {str(key): str(config) for key, config in kernel.cache.items()} for name, kernel in tuned.items()}


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

    from minipeft.kernels.fused_lora import forward_path, use_few_rows, use_fused_base

    rounds = args.rounds or (5 if device == "cuda" else 1)

    meta = {
        "dtype": str(dtype).removeprefix("torch."),
        "triton": _version("triton"),
        "timing": (f"{rounds} rounds, the methods interleaved; in each, the median ms of triton.testing.do_bench "
                   f"(GPU) or of 3 calls (CPU); a cell is 'median ms · median ratio to base [lowest-highest ratio]', "
                   f"the ratio taken within each round"),
    }
    if device == "cuda":
        meta |= {
            "fwd graph": (f"no-grad forward replayed from a CUDA graph over {GRAPH_WEIGHT_COPIES} copies of the "
                          f"weights (decoding cases, M <= {DECODE_MAX_M}, p = 0)"),
            "peak_mib": "torch.cuda.max_memory_allocated over one fwd+bwd, minus what was allocated before",
            "host_ms": (f"median over {HOST_CALLS} calls of the time from a call to its return, the GPU idle at the "
                        f"start: where it nears the GPU time, the GPU waits for the host"),
            "latency_ms": f"the same {HOST_CALLS} calls, from the call to the end of its GPU work",
        }
    else:  # (what a GPU run's header says of these columns does not apply)
        meta = {"run": ("a CPU smoke test of the script, not a measurement: tiny shapes, CPU timings say nothing "
                        "of the GPU kernels this benchmark is for" + ("" if "fused" in impls else
                                                                       "; the fused kernels were not run (no GPU)")),
                **meta}
    results, profiled = [], []  # profiled: (row, its calls), kernel-profiled after every case is timed
    for M, K, N, r, p in case_list:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {len(case_list) - len(results)} cases not run")
            meta["not_run"] = [list(c) for c in case_list[len(results):]]
            break
        # The few-rows kernel holds all of a program's rows and the whole rank at once: only
        # shapes it is built for can be sent down it.
        case_impls = [name for name in impls if not name.startswith("fused[few rows") or use_few_rows(M, r, dtype)]
        case_impls = [name for name in case_impls if name != "fused[p=0 pass in Triton]" or p == 0]  # (else the same)
        # Nor is the library's own route timed twice, where its backward's dx goes the same way too.
        path = forward_path(M, N, K, r, dtype)
        if use_fused_base(M, N, K, dtype) == use_fused_base(M, K, N, dtype):
            case_impls = [name for name in case_impls if name != f"fused[{path}]"]
        # The kernels are profiled at the largest shape only (that is where the targets are), the
        # host at every shape (decoding's is all host time).
        with_kernels = M == max(c[0] for c in case_list)
        rows, later = run_case(M, K, N, r, p, dtype, device, case_impls, rounds, args.profile,
                               graph=not args.no_graph)
        profiled += [(row, with_kernels, M <= DECODE_MAX_M, *calls) for row, *calls in later]
        results.append({"M": M, "K": K, "N": N, "r": r, "p": p, "fused_path": path, "rows": rows})
        print(f"M={M} K={K} N={N} r={r} p={p}: " +
              ", ".join(f"{row['method']} {row['fwd+bwd']:.3f} ms" for row in rows), flush=True)
        if out is not None:  # after every case, so that a run cut short keeps what it measured
            write(device, section, meta, results, out, quiet=True)

    profile_kernels(profiled, device)
    print()
    print(markdown(results))
    verdicts = target_verdicts(results)
    if verdicts:
        print()
        print(verdicts_markdown(verdicts))
    if args.profile:
        print(kernels_markdown(results))
    if out is not None:
        write(device, section, meta, results, out)


def write(device, section, meta, results, out, quiet=False):
    if device == "cuda":
        meta["autotuned"] = autotuned_configs()
    verdicts = target_verdicts(results)
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items() if k not in ("autotuned", "not_run"))
    if meta.get("not_run"):
        header += "\n- not run (time budget spent): " + ", ".join(
            f"M={M} {K} -> {N} r={r} p={p}" for M, K, N, r, p in meta["not_run"])
    text = f"{header}\n\n{markdown(results)}\n"
    if verdicts:
        text += f"\nTargets (fused, its own choice of path):\n\n{verdicts_markdown(verdicts)}\n"
    if any("kernels" in row or "host_profile" in row for case in results for row in case["rows"]):
        text += ("\nKernels and host operations per forward + backward (torch.profiler):\n"
                 f"{kernels_markdown(results)}\n")
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

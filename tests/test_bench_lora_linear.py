"""The kernel benchmark's own arithmetic: interleaved rounds, ratios taken within a round, the
verdicts, our GEMM against cuBLAS's from the profile, and the CUDA-graph timer's bookkeeping
(against a stand-in for torch.cuda).

A mistake here costs a GPU session or, worse, prints a wrong ratio; the GPU itself is not needed
to check any of it.
"""

import contextlib
import importlib.util
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lora_linear", ROOT / "benchmarks" / "bench_lora_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_flip_the_order_of_the_methods(bench):
    calls = []
    timers = {name: {"fwd": lambda name=name: calls.append(name) or 1.0} for name in ("base", "peft", "fused")}
    samples = bench.interleaved(timers, rounds=3)
    assert calls == ["base", "peft", "fused", "fused", "peft", "base", "base", "peft", "fused"]
    assert samples == {name: {"fwd": [1.0, 1.0, 1.0]} for name in timers}


def test_ratios_are_taken_within_each_round(bench):
    # The clock halves its speed in round 2: every time doubles, the ratios stay.
    samples = {"base": {"fwd": [1.0, 2.0, 1.0]}, "fused": {"fwd": [1.1, 2.4, 1.3]}}
    base, fused = bench.summarise(samples)
    assert base["fwd_x_base"] == 1.0 and base["fwd_x_base_range"] == [1.0, 1.0]
    assert fused["fwd"] == 1.3  # the median time
    assert fused["fwd_x_base"] == pytest.approx(1.2)  # median of 1.1, 1.2 and 1.3; the ratio of medians is 1.3
    assert fused["fwd_x_base_range"] == pytest.approx([1.1, 1.3])
    assert fused["fwd_rounds"] == [1.1, 2.4, 1.3]


def test_verdicts_use_the_median_and_report_the_spread(bench):
    def row(method, fwd, peak):
        r = {"method": method, "peak_mib": peak}
        r.update(bench.summarise({"base": {"fwd+bwd": [1.0, 1.0, 1.0]}, method: {"fwd+bwd": fwd}})[1])
        return r
    case = {"M": 8192, "K": 4096, "N": 4096, "r": 16, "p": 0.0,
            "rows": [row("fused", [1.0, 1.0, 1.0], 129), row("peft", [1.3, 1.5, 1.4], 192)]}
    (verdict,) = bench.target_verdicts([case])  # the only target at p = 0: x faster than peft
    assert verdict["phase"] == "fwd+bwd" and verdict["metric"] == "x faster than peft"
    assert verdict["value"] == pytest.approx(1.4) and verdict["spread"] == pytest.approx([1.3, 1.5])
    assert verdict["met"]  # 1.4 >= 1.35


def test_gemm_speed_compares_our_gemm_with_cublas_in_the_frozen_layer(bench):
    # Kernel names as torch.profiler reports them on an H200 (cuBLAS's, then ours), each with its
    # us per forward + backward and the part of it in the forward.
    base = {"method": "base", "kernels": [
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", 1, 350.0, 0.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", 1, 340.0, 340.0),
        ("void at::native::vectorized_elementwise_kernel<4>", 1, 30.0, 0.0)]}
    fused = {"method": "fused", "kernels": [
        ("_matmul_lowrank_kernel", 2, 800.0, 380.0), ("_shrink_kernel", 1, 20.0, 20.0),
        ("nvjet_hsh_64x32_64x16_2x1_v_bz_TNN", 2, 40.0, 0.0)]}
    case = {"M": 8192, "K": 4096, "N": 4096, "r": 16, "p": 0.1, "fused_path": "triton GEMM", "rows": [base, fused]}
    ours, cublas, ratio = bench.gemm_speed(case)
    assert (ours, cublas) == (800.0, 690.0)  # the elementwise kernel and the thin cuBLAS GEMMs are not counted
    assert ratio == pytest.approx(690 / 800)
    assert bench.gemm_speed(case, "fwd") == pytest.approx((380.0, 340.0, 340 / 380))  # y
    assert bench.gemm_speed(case, "bwd") == pytest.approx((420.0, 350.0, 350 / 420))  # dx
    text = bench.kernels_markdown([case])
    assert "86% of cuBLAS's speed" in text and "y 380.0 us against 340.0 (89%)" in text
    assert "dx 420.0 us against 350.0 (83%)" in text
    assert bench.gemm_speed({**case, "rows": [base]}) is None  # no fused row profiled
    # Where the fused function takes cuBLAS's route, its one _matmul_lowrank_kernel is the thin
    # pass over dx, not a GEMM: only the forced route's row says how fast our GEMM is.
    thin = {"method": "fused", "kernels": [("_matmul_lowrank_kernel", 1, 74.0, 0.0),
                                           ("nvjet_sm90_tst_256x128", 2, 690.0, 345.0)]}
    assert bench.gemm_speed({**case, "fused_path": "cuBLAS base", "rows": [base, thin]}) is None
    forced = {**fused, "method": "fused[triton GEMM]"}
    assert bench.gemm_speed({**case, "fused_path": "cuBLAS base", "rows": [base, thin, forced]})[0] == 800.0


class FakeCuda:
    """Enough of torch.cuda for graph_timer: a graph records the calls made while capturing and
    makes them again on replay; every forward call takes 2 ms of a fake clock the events read."""

    def __init__(self):
        self.clock = 0.0
        self.capturing = None

    def forward(self, calls):
        def f():
            assert not torch.is_grad_enabled(), "decoding is timed without autograd"
            if self.capturing is not None:
                self.capturing.append(f)
            else:
                self.clock += 2.0
            calls.append(1)
        return f

    def patch(self, monkeypatch):
        fake = self

        class Graph:
            def __init__(self):
                self.calls = []

            def replay(self):
                for f in self.calls:
                    fake.clock += 2.0

        @contextlib.contextmanager
        def graph(g, stream=None):
            fake.capture_stream = stream
            fake.capturing = g.calls
            yield
            fake.capturing = None

        def stream(s):
            fake.warmup_stream = s
            return contextlib.nullcontext()

        class Event:
            def __init__(self, enable_timing):
                self.time = None

            def record(self):
                self.time = fake.clock

            def elapsed_time(self, end):
                return end.time - self.time

        class Stream:
            def wait_stream(self, other):
                pass

        for name, value in {"CUDAGraph": Graph, "graph": graph, "Event": Event, "Stream": Stream,
                            "current_stream": Stream, "stream": stream,
                            "synchronize": lambda: None}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_graph_timer_reports_the_time_of_one_forward(bench, monkeypatch):
    fake = FakeCuda()
    fake.patch(monkeypatch)
    calls = []
    forwards = [fake.forward(calls) for _ in range(3)]  # one per copy of the weights
    replay_ms = bench.graph_timer(forwards)
    # Each forward ran once before the capture, then GRAPH_CALLS times inside it.
    assert len(calls) == 3 * (1 + bench.GRAPH_CALLS)
    assert replay_ms() == pytest.approx(2.0)  # each replay makes all its calls: time / calls
    # Captured on the stream it was warmed up on (cuBLAS's workspace for that stream then
    # predates the capture), not on torch's shared default capture stream.
    assert fake.capture_stream is not None and fake.capture_stream is fake.warmup_stream


def test_host_time_and_latency_start_each_call_with_an_idle_gpu_and_fresh_gradients(bench, monkeypatch):
    events = []
    monkeypatch.setattr(bench.common, "sync", lambda device: events.append("sync"))
    x = torch.zeros(2, requires_grad=True)
    x.grad = torch.ones(2)

    def call():
        assert x.grad is None  # reset before every call, as do_bench's grad_to_none does
        events.append("call")
        x.grad = torch.ones(2)

    host, latency = bench.host_and_latency_ms(call, "cuda", [x])
    # Synchronised before each call (the GPU idle) and after it (the end of its GPU work).
    assert events == ["sync", "call", "sync"] * bench.HOST_CALLS
    assert 0.0 <= host <= latency


def test_the_host_profile_counts_each_steps_operations_with_fresh_gradients(bench):
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8)
    seen = []

    def step():  # two matmuls and a backward per step
        seen.append(x.grad is None)
        (x @ w @ w).sum().backward()

    profiled = bench.host_profile(step, [x], "cpu", steps=4)
    ops = {name: calls for name, calls, _ in profiled["ops"]}
    # Per step, not per profile: two matmuls forward, and backward one through each (w needs none).
    assert ops["aten::mm"] == 4
    assert seen[2:] == [True] * 4  # after the warm-up, each profiled step starts without a gradient
    assert 0 < profiled["host_ms"] <= profiled["wall_ms"] and profiled["gpu_ms"] is None
    assert [us for *_, us in profiled["ops"]] == sorted((us for *_, us in profiled["ops"]), reverse=True)
    assert len(profiled["ops"]) <= bench.HOST_OPS_KEPT
    # A case profiled for its host alone (decoding's) still gets its table, named by its case.
    case = {"M": 16, "K": 8, "N": 8, "r": 2, "p": 0.0,
            "rows": [{"method": "fused", "host_profile": {"forward + backward": profiled}}]}
    text = bench.kernels_markdown([case])
    assert "fused at M=16 K=8 N=8 r=2 p=0.0, its host: " in text and "per forward + backward queued" in text
    assert "| `aten::mm` | 4 |" in text and "us of kernels" not in text


def test_the_host_profile_tells_the_host_time_no_operation_covers(bench):
    # Python between operations (a launcher's own work, here a sleep) is in no traced operation.
    x, w = torch.randn(8, 8), torch.randn(8, 8)

    def step():
        time.sleep(0.002)
        return x @ w

    profiled = bench.host_profile(step, [], "cpu", steps=4)
    assert 1.8 <= profiled["outside_ops_ms"] <= profiled["host_ms"]
    case = {"M": 16, "K": 8, "N": 8, "r": 2, "p": 0.0,
            "rows": [{"method": "fused", "host_profile": {"no-grad forward": profiled}}]}
    assert f"{profiled['outside_ops_ms']:.3f} ms of it in no operation" in bench.kernels_markdown([case])


def test_the_host_profile_leaves_out_the_final_sync(bench, monkeypatch):
    # The sync after the steps waits for all their GPU work: not an operation of the steps.
    monkeypatch.setattr(bench.common, "sync", lambda device: torch.ones(64, 64) @ torch.ones(64, 64))
    x = torch.randn(8, 8)
    profiled = bench.host_profile(lambda: x + 1, [], "cpu", steps=3)
    ops = {name: calls for name, calls, _ in profiled["ops"]}
    assert ops["aten::add"] == 1
    assert "aten::mm" not in ops and "aten::matmul" not in ops and bench.FINAL_SYNC not in ops


def test_the_dx_gemm_last_variant_sets_its_order_only_for_its_own_calls(bench, monkeypatch):
    # The forced variant sets the library's DX_GEMM_FIRST for its forward (which records it for
    # the backward) and puts it back, even when the call raises.
    import minipeft.kernels.fused_lora as impl

    default, seen = impl.DX_GEMM_FIRST, []

    def lora_linear(*args, **kwargs):
        seen.append(impl.DX_GEMM_FIRST)
        if len(seen) == 3:
            raise RuntimeError("a failing call")

    monkeypatch.setattr(impl, "lora_linear", lora_linear)
    last = bench.FORCED_PATHS["fused[dx GEMM last]"](*(None,) * 4, 2.0, 0.0)
    library = bench.make_fused(*(None,) * 4, 2.0, 0.0)
    last(None), library(None)
    with pytest.raises(RuntimeError):
        last(None)
    assert default and seen == [False, default, False] and impl.DX_GEMM_FIRST == default

"""lora_linear and fused LoRA layers under torch.compile (kernels/torch_compile.py).

The kernels run on CPU tensors through Triton's interpreter. The compiled function must compile
whole (fullgraph=True), hold the fused call as one op, and compute what the eager call computes,
dropout mask included (same seed, same bits).
"""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
from torch import nn

import minipeft
import minipeft.kernels as kernels
import minipeft.tuners.lora as lora

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter"),
    pytest.mark.skipif(not hasattr(torch.library, "register_autograd"), reason="custom ops need torch 2.4"),
]

OP = "minipeft.lora_linear"  # (how a dynamo graph names the op)

# (route, dropout p, dtype): each route of the forward, with and without dropout.
CASES = [("cuBLAS base", 0.0, torch.float32), ("cuBLAS base", 0.1, torch.float32),
         ("few rows", 0.1, torch.bfloat16), ("triton GEMM", 0.1, torch.float32)]


def tensors(route, dtype, bias=True, K=32, N=48, r=4):
    """x (2, M/2, K) (few rows for the few-rows route), W, b, A, B; x, A and B require grad."""
    torch.manual_seed(0)
    M = 8 if route == "few rows" else 64
    x = torch.randn(2, M // 2, K, dtype=dtype, requires_grad=True)
    W, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype) if bias else None
    A = torch.randn(r, K, dtype=dtype, requires_grad=True)
    B = torch.randn(N, r, dtype=dtype, requires_grad=True)
    return x, W, b, A, B


def output_and_grads(fn, x, A, B):
    """fn(x), and the gradients of x, A and B for the loss sum(y^2) (y's own values weight dy)."""
    x.grad = A.grad = B.grad = None
    y = fn(x)
    y.float().square().sum().backward()
    return [y.detach(), x.grad, A.grad, B.grad]


class GraphRecorder:
    """A torch.compile backend that runs the graph dynamo captured as is and notes its ops."""

    def __init__(self):
        self.ops = []

    def __call__(self, graph_module, example_inputs):
        self.ops += [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]
        return graph_module.forward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route,p,dtype", CASES)
def test_ops_pass_torch_opcheck(route, p, dtype, bias):
    # opcheck runs each op eagerly, under fake tensors (the shapes, dtypes and devices its fake
    # gives against the real outputs), through autograd, and through AOT dispatch; the backward
    # for every set of gradients wanted (those not wanted are empty tensors, each its own).
    x, W, b, A, B = tensors(route, dtype, bias)
    seed = torch.tensor(5) if p > 0 else None
    torch.library.opcheck(torch.ops.minipeft.lora_linear.default, (x, W, b, A, B, 2.0, p, seed, route))
    y, xa = torch.ops.minipeft.lora_linear(x, W, b, A, B, 2.0, p, seed, route)
    dy = torch.randn_like(y)
    for wants in itertools.product([False, True], repeat=3):
        if any(wants):
            torch.library.opcheck(torch.ops.minipeft.lora_linear_backward.default,
                                  (dy, x.detach(), xa.detach(), W, A.detach(), B.detach(), 2.0, p, seed, route, *wants))


@pytest.mark.parametrize("route,p,dtype", CASES)
def test_compiled_call_is_one_op_and_equals_the_eager_call(route, p, dtype):
    x, W, b, A, B = tensors(route, dtype)

    def call(x):
        return kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=p, seed=5, route=route)

    eager = output_and_grads(call, x, A, B)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    compiled = output_and_grads(torch.compile(call, backend=recorder, fullgraph=True), x, A, B)
    assert recorder.ops.count(OP) == 1, recorder.ops
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inductor_compiles_around_the_op():
    # The whole stack: AOT autograd splits forward and backward (the backward op in the
    # backward graph) and inductor generates code around both ops.
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)

    def step(x):
        return torch.relu(kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, seed=5)) * 3

    eager = output_and_grads(step, x, A, B)
    torch._dynamo.reset()
    compiled = output_and_grads(torch.compile(step, fullgraph=True), x, A, B)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_call_draws_its_seed_when_it_runs():
    # seed=None: a compiled call draws from torch's CPU generator when it runs, as an eager call
    # does (so the same generator state gives the same mask), and not once at compile time.
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)

    def call(x):
        return kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for state in (1, 2):
        torch.manual_seed(state)
        eager = output_and_grads(call, x, A, B)
        torch.manual_seed(state)
        for got, want in zip(output_and_grads(compiled, x, A, B), eager, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(compiled(x), compiled(x))  # a new mask on every call


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_seed_is_drawn_in_the_graph_only_with_dropout(p):
    # With dropout the seed is a random op of the graph (a CPU scalar, read without a sync);
    # without, the graph holds no CPU tensor, which would keep torch.compile's CUDA graphs off.
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    torch.compile(lambda x: kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=p), backend=recorder, fullgraph=True)(x)
    assert ("<built-in method randint of type object at" in " ".join(recorder.ops)) == (p > 0), recorder.ops


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_two_calls_in_one_graph_draw_two_masks(backend):
    # One layer run twice on one input (two views of a batch, as SimCSE does): two masks, as in
    # eager. (An op that drew its own seed would look pure to the compiler, which merges the calls.)
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)

    def two_views(x):
        return (kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5)
                - kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.5)).abs().sum()

    torch._dynamo.reset()
    compiled = torch.compile(two_views, backend=backend, fullgraph=True)
    assert two_views(x) > 0 and compiled(x) > 0
    compiled(x).backward()  # (and the backward, through both)
    assert A.grad.abs().sum() > 0


def test_frozen_A_saves_no_input():
    # LoRA-FA: dA is not wanted, so x (M, K) is not kept for the backward (as in the eager Function).
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)
    A.requires_grad_(False)
    y, _ = torch.ops.minipeft.lora_linear(x, W, b, A, B, 2.0, 0.1, torch.tensor(7), None)
    assert not any(t is not None and t.numel() == x.numel() for t in y.grad_fn.saved_tensors)
    eager = kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, seed=7)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, B), dy)
    for got, want in zip(grads, torch.autograd.grad(eager, (x, B), dy), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("warn_only", [False, True])
def test_deterministic_algorithms_are_checked_when_the_compiled_call_runs(warn_only):
    # The flags are not traceable; the op reads them when it runs, and refuses (or warns) as an eager call does.
    x, W, b, A, B = tensors("cuBLAS base", torch.float32)
    call = torch.compile(lambda x: kernels.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, seed=5), backend="aot_eager",
                         fullgraph=True)
    torch._dynamo.reset()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        with pytest.warns(UserWarning, match="deterministic") if warn_only else \
                pytest.raises(RuntimeError, match="deterministic"):
            call(x)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", ["recorder", "aot_eager"])
@pytest.mark.parametrize("variant", ["plain", "lora_bias", "LoRA-FA"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_lora_model_runs_the_fused_op(monkeypatch, dropout, variant, backend):
    # The layer's whole route (LoraLinear._fused_path_applies, then the kernels), on CPU tensors:
    # a model compiles whole, each adapted layer one op, with no warning from dynamo; through AOT
    # autograd too. LoRA-FA (A frozen) on an input that needs no gradient leaves the backward two
    # of its three gradients to skip.
    monkeypatch.setattr(lora, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    config = minipeft.LoraConfig(r=4, target_modules=["0", "2"], lora_dropout=dropout, init_lora_weights=False,
                                 lora_bias=variant == "lora_bias")
    model = minipeft.get_peft_model(model, config).train()
    for name, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and not (variant == "LoRA-FA" and "lora_A" in name))
    x = torch.randn(4, 16, requires_grad=variant != "LoRA-FA")
    params = [p for p in model.parameters() if p.requires_grad]

    def outputs(fn):
        for p in params:
            p.grad = None
        x.grad = None
        torch.manual_seed(3)
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad, *(p.grad for p in params)]

    eager = outputs(model)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = outputs(torch.compile(model, backend=recorder if backend == "recorder" else backend, fullgraph=True))
    if backend == "recorder":
        assert recorder.ops.count(OP) == 2, recorder.ops
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if dropout == 0:  # and that is the reference's function
        kernels.set_enabled(False)
        try:
            for got, want in zip(eager, outputs(model), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        finally:
            kernels.set_enabled(True)

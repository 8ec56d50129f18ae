"""The float64 reference the fused LoRA kernels are checked against, shared by the interpreter
tests (test_kernels.py, CPU tensors) and the compiled ones (test_kernels_cuda.py, a GPU).

Importing this module imports triton (through minipeft.kernels): set TRITON_INTERPRET first
where the kernels are to be interpreted.
"""

import contextlib

import torch
import torch.nn.functional as F

import minipeft.kernels as kernels
import minipeft.kernels.fused_lora as impl

# Measured worst cases over ragged shapes are about 7e-8, 7e-3 and 4e-4; these leave ~2x headroom.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1.5e-2, torch.float16: 1e-3}


def rel_err(actual, expected, magnitude=None):
    """||actual - expected|| / ||magnitude||, 0 when both are zero (e.g. everything dropped).

    ``magnitude`` defaults to ``expected``. For sums that may cancel, pass the same sum taken
    over absolute values: the textbook bound for a rounded dot product is
    |fl(a . b) - a . b| <= eps * (|a| . |b|), so that is the scale an error is measured on.
    """
    diff = (actual.double() - expected).norm()
    scale = (expected if magnitude is None else magnitude).norm().clamp_min(1e-30)
    return (diff / scale).item() if diff > 0 else 0.0


def reference(x, weight, bias, lora_A, lora_B, scaling, mask, p, xa_dtype=torch.float64):
    """y = x W^T + b + s * (D * x / (1 - p)) A^T B^T in float64; mask None means no dropout, p the
    rate the mask drops at (``kernels.dropout_rate``).

    The kernels store xa = (D * x / (1 - p)) A^T in the input dtype (it is saved for the
    backward), so the reference rounds xa there too (straight-through, the gradient stays
    float64). Without that, a sum like s * xa B^T over r = 130 terms that nearly cancel can
    differ from float64 by more than bf16's tolerance for reasons that are not the kernels'.
    """
    x_drop = x if mask is None else x * mask / (1 - kernels.dropout_rate(p))  # the rate the mask drops at
    xa = F.linear(x_drop, lora_A)
    xa = xa + (xa.to(xa_dtype).double() - xa).detach()
    return F.linear(x, weight, bias) + scaling * F.linear(xa, lora_B)


def make_inputs(lead, K, N, r, dtype, bias=True, layout="contiguous", seed=0, device="cpu"):
    """Inputs scaled so that every term of y is O(1). layout: contiguous, strided or transposed.

    Drawn on the CPU, so every device gets the same numbers, then moved; the strided and
    transposed views are taken after the move, so x keeps its layout on the device.
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    if layout == "strided":  # every other column of a wider tensor
        x = randn(*lead, 2 * K)[..., ::2]
    elif layout == "transposed":  # K is the slowest axis in memory
        x = randn(K, *lead).movedim(0, -1)
    else:
        x = randn(*lead, K)
    # Scaled in float64 before the cast, as the tests have always drawn them.
    scaled = lambda t, scale: (torch.randn(*t, generator=g, dtype=torch.float64) * scale).to(device, dtype)  # noqa: E731
    weight = scaled((N, K), K**-0.5)
    b = scaled((N,), 1.0) if bias else None
    lora_A = scaled((r, K), K**-0.5)
    lora_B = scaled((N, r), r**-0.5)  # nonzero (unlike LoRA's init) so that every gradient is tested
    return x, weight, b, lora_A, lora_B


@contextlib.contextmanager
def tf32_allowed(allowed, api="legacy"):
    """cuBLAS's TF32 switch set to ``allowed`` inside, restored after: through
    torch.backends.cuda.matmul.allow_tf32 (``api="legacy"``) or its fp32_precision ("new"), after
    which torch refuses to read allow_tf32 until fp32_precision is put back."""
    matmul = torch.backends.cuda.matmul
    name, value = ("allow_tf32", allowed) if api == "legacy" else ("fp32_precision", "tf32" if allowed else "ieee")
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


# lora_linear's routes (fused_lora.ROUTES): our GEMM with the low-rank term, the one-launch
# few-rows kernel (1 to 32 rows, rank <= 64, 16-bit), cuBLAS's base product with our low-rank
# kernels. A test that names one sends the call down it (lora_linear's route argument).
PATHS = list(impl.ROUTES)


def check_against_reference(lead, K, N, r, dtype, bias, layout, p, scaling, path, needs_grad="x A B",
                            device="cpu", tol=None):
    """Forward and the gradients asked for against the float64 reference, relative to the scale
    of each sum, with lora_linear sent down route `path` (None: its own choice by shape). tol
    defaults to TOL[dtype]."""
    x, weight, b, lora_A, lora_B = make_inputs(lead, K, N, r, dtype, bias, layout, device=device)
    for name, t in zip("x A B".split(), (x, lora_A, lora_B)):
        t.requires_grad_(name in needs_grad.split())
    seed = 1234

    y = kernels.lora_linear(x, weight, b, lora_A, lora_B, scaling, dropout_p=p, seed=seed, route=path)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y.backward(dy)

    # The reference uses the kernels' own mask, so values match element for element.
    mask = kernels.dropout_mask(seed, x.shape, p, x.device).double() if p > 0 else None
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B))
    y64 = reference(x64, weight.double(), None if b is None else b.double(), A64, B64, scaling, mask, p, dtype)
    y64.backward(dy.double())
    # The same function of |inputs| with |dy|: the scale of every sum above, cancellation aside.
    abs_in = [t.detach().double().abs().requires_grad_(True) for t in (x, lora_A, lora_B)]
    y_abs = reference(abs_in[0], weight.double().abs(), None if b is None else b.double().abs(), abs_in[1],
                      abs_in[2], scaling, mask, p)
    y_abs.backward(dy.double().abs())
    x_abs, A_abs, B_abs = abs_in

    assert y.shape == (*lead, N) and y.dtype == dtype
    tol = TOL[dtype] if tol is None else tol
    assert rel_err(y, y64, y_abs) < tol, "y"
    for name, t, t64, t_abs in [("dx", x, x64, x_abs), ("dA", lora_A, A64, A_abs), ("dB", lora_B, B64, B_abs)]:
        if t.requires_grad:
            assert rel_err(t.grad, t64.grad, t_abs.grad) < tol, name
        else:
            assert t.grad is None, name
    assert weight.grad is None and (b is None or b.grad is None)

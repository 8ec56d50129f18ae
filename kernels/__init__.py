"""Fused Triton kernels for the LoRA hot path, shipped as `minipeft.kernels`.

Functions of tensors only; they know nothing of configs or models. The LoRA layer calls
`lora_linear` for CUDA tensors when `is_available() and enabled()` and its adapter is one LoRA
without DoRA (with or without lora_bias) on a frozen nn.Linear that no subclass, own forward or
hook changes (`LoraLinear._fused_path_applies` has the whole rule), and otherwise runs its
pure-PyTorch reference, which computes the same function (with dropout, each draws its own masks).

    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, seed=None, route=None)
    dropout_mask(seed, shape, p, device)   the keep-mask a call with that seed used (for tests)
    dropout_rate(p)                        the rate it drops at: p rounded down to a multiple of 2**-16
    forward_path(M, N, K, R, dtype)        which kernels the forward runs for that shape
    is_deterministic(M, N, K, R, p, dtype) whether a call gives the same bits in every run (cuBLAS alone)
    is_available()                         triton can be imported
    set_enabled(flag) / enabled()          global switch, on by default

Under torch.compile, lora_linear is one custom op in the compiled graph (`torch_compile.py`).

Under TRITON_INTERPRET=1 (set before triton is first imported) the kernels also run on CPU
tensors, slowly; that is how the tests check them on machines without a GPU.
"""

# Whether triton can be imported, looked up once: the LoRA layer asks on every forward, and a plain
# constant is also what torch.compile traces without complaint (it warns at cached functions).
try:
    import triton  # noqa: F401
    _TRITON = True
except ImportError:
    _TRITON = False
_enabled = True


def is_available() -> bool:
    """Whether triton can be imported, i.e. whether the fused kernels can run at all."""
    return _TRITON


def enabled() -> bool:
    """The global switch (default on). The LoRA layer checks it before taking the fused path."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fused kernels on or off for every LoRA layer, e.g. to compare against the reference."""
    global _enabled
    _enabled = bool(flag)


if is_available():
    from .fused_lora import dropout_mask, dropout_rate, forward_path, lora_linear, is_deterministic
    from . import torch_compile  # noqa: F401  (registers lora_linear's custom ops, for torch.compile)
else:
    def _needs_triton(name):
        def unavailable(*args, **kwargs):
            raise RuntimeError(f"minipeft.kernels.{name} needs triton; check minipeft.kernels.is_available()")
        return unavailable

    lora_linear, dropout_mask, dropout_rate, forward_path, is_deterministic = (
        _needs_triton(n) for n in ("lora_linear", "dropout_mask", "dropout_rate", "forward_path", "is_deterministic"))

__all__ = ["lora_linear", "dropout_mask", "dropout_rate", "forward_path", "is_deterministic", "is_available",
           "enabled", "set_enabled"]

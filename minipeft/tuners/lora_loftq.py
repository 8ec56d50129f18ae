"""LoftQ (Li et al. 2023): LoRA started on what quantizing the base weight loses.

QLoRA quantizes W to Q (4-bit NF4, or int8) and starts LoRA at ``B = 0``, so training begins
from the quantized model, whose error ``W - Q`` may be large. LoftQ instead chooses Q and the
adapter together, so that ``Q + s B A`` is close to W, by alternating two steps T times
(``loftq_iter``), from ``R_0 = 0``:

    Q_t   = deq(quant(W - R_{t-1}))           quantize what the low-rank part does not hold
    R_t   = SVD_r(W - Q_t)                     the best rank-r approximation of what Q_t misses

and sets ``s B A = R_T`` (split as PiSSA splits its factors: ``B = U_r sqrt(S_r / s)``,
``A = sqrt(S_r / s) V_r^T``) and the base weight to ``Q_T``. The base is stored on the
quantization grid already, so a model saved after this and loaded with bitsandbytes in that
many bits computes with exactly Q_T (``quantized.round_trip``: quantizing Q_T gives it back).
For that, Q is quantized from the weight's own dtype (a bf16 model's blocks have bf16 maxima);
the SVD runs in float32.

A saved LoftQ adapter loads onto either base. Onto the full-precision one, loading runs LoftQ
again, which with ``loftq_iter > 1`` gives Q only up to the SVD's rounding (another thread
count, another device): the dependable way is to save the base model after LoftQ, load it
quantized, and load the adapter onto it, where its layers are taken for Q as they are.

For an nn.Linear, as peft has it. Unlike peft, the scaling is honoured (peft assigns R_T's
factors as B and A, so that ``Q + s B A = Q + s R_T``, which is LoftQ's only for s = 1), and
the quantization runs on the CPU too (peft asks for a GPU).
"""

from __future__ import annotations

import torch

from .quantized import round_trip


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, scaling: float, bits: int, iterations: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0 (r, in), B0 (out, r), Q)`` for ``weight`` (out, in) in float32, float16 or bfloat16:
    the factors in float32, Q (the base weight to keep) in the weight's dtype, on its grid; and
    ``Q + s B0 A0`` approximates the weight (module docstring)."""
    stored, weight = weight.dtype, weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        quantized = round_trip((weight - low_rank).to(stored), bits).float()
        U, S, Vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        low_rank = (U * S) @ Vh
    root = (S / scaling).sqrt()  # (r,)
    return root[:, None] * Vh, U * root, quantized.to(stored)

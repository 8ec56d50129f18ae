"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen, and B's gradient projected so that B's step
moves the weight as close as it can to where full fine-tuning's step would.

    optimizer = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=2e-4)

Freezing A. A layer adapted by ``W + s B A`` (A: (r, in), B: (out, r)) with A frozen at its
random init trains half the parameters, and needs no activation kept for A's gradient: the
backward stores ``z = A x`` (r wide) instead of ``x`` (in wide). That is the memory LoRA-FA
saves.

Projecting B's gradient. With A fixed, a step ``dB`` changes the weight by ``s dB A``, a matrix
whose rows lie in the row space of A. Full fine-tuning would step by ``-g_W`` (``g_W`` = dL/dW).
The step of B that comes closest, ``min ||s dB A - g_W||_F``, is the least-squares solution

    dB = (1 / s) g_W A^T (A A^T)^-1 = (1 / s^2) g_B (A A^T)^-1      since  g_B = dL/dB = s g_W A^T

so LoRA-FA replaces B's gradient ``g_B`` (out, r) by ``g_B (A A^T)^-1 / s^2`` (an r x r inverse
per layer, cheap) and hands that to Adam. ``(A A^T + 1e-8 I)`` is pseudo-inverted, as in the
reference code, which keeps a rank-deficient A from blowing up.

The optimizer is AdamW as transformers first wrote it (the reference code builds on it): ``eps``
added to ``sqrt(v)`` before the bias correction, which scales the step instead, and the weight
decay applied after the step, ``p <- p - lr wd p``. Every other trainable parameter (a head
trained whole, biases, B's own bias with ``lora_bias``) takes plain steps of it.

Differences from peft's ``create_lorafa_optimizer`` (same arguments, same steps):

* the projection runs in the adapter's dtype; peft runs it under bfloat16 autocast wherever
  bfloat16 is available (CPUs included), rounding B's gradient to 8 bits of mantissa;
* the state is kept per parameter, so the optimizer's ``state_dict`` saves and loads (a run
  resumes); peft keys it by name strings, which ``state_dict`` cannot hold;
* A is read from each B's own layer, not paired by the order of the names (with ``lora_bias``,
  peft pairs A with B's bias and fails); LoRA on embeddings
  (whose A starts at zero, so ``A A^T`` is singular: peft's step is then ``1e8`` times its
  gradient), on grouped convolutions, on a mixture of experts' stacked parameters (a pair per
  expert) and with DoRA (whose update is not ``s B A``) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from ..tuners.lora import LoraConv, LoraEmbedding, LoraLayer
from ..tuners.lora_parameter import LoraParameter
from .loraplus import check_number

PSEUDO_INVERSE_RIDGE = 1e-8  # the reference code's ``delta``


class LoraFAOptimizer(Optimizer):
    """AdamW (transformers' original form, module docstring) whose LoRA B matrices step along
    their projected gradient. ``projections``: ``{B: (A, s)}``, each B of ``params`` with the A and
    scale of its layer; the other parameters take plain AdamW steps."""

    def __init__(
        self,
        params: Iterable,
        projections: dict[nn.Parameter, tuple[torch.Tensor, float]] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        check_number("lr", lr, "a number >= 0", lambda v: v >= 0)
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, "in [0, 1)", lambda v: 0 <= v < 1)
        check_number("eps", eps, "a number >= 0", lambda v: v >= 0)
        check_number("weight_decay", weight_decay, "a number >= 0", lambda v: v >= 0)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))
        self.projections = dict(projections or {})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p in self.projections:
                    grad = projected_gradient(grad, *self.projections[p])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def projected_gradient(grad_b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``g_B (A A^T)^-1 / s^2`` (module docstring). ``grad_b``: B's gradient as B is stored ((out, r),
    or a convolution's (out, r, 1, ...)); ``a``: A (r, in), or a convolution's (r, in, *kernel)."""
    a = a.reshape(a.shape[0], -1).to(grad_b.dtype)  # (r, in * kernel): a convolution's A as a matrix
    gram = a @ a.T  # (r, r)
    inverse = torch.linalg.pinv(gram + PSEUDO_INVERSE_RIDGE * torch.eye(a.shape[0], dtype=gram.dtype, device=gram.device))
    rows = grad_b.reshape(grad_b.shape[0], -1)  # (out, r)
    return (rows @ inverse / scaling**2).reshape(grad_b.shape)


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> LoraFAOptimizer:
    """LoRA-FA over ``model``'s trainable parameters: the A of every active LoRA adapter frozen
    (``requires_grad=False``), each B stepped along its projected gradient with its layer's own
    scale, everything else plain AdamW (betas 0.9, 0.999; eps 1e-6).

    peft's signature: ``r``, ``lora_alpha`` and ``use_rslora`` are checked against the adapters
    (each layer's scale is read from the layer itself, rank_pattern and alpha_pattern included).
    """
    check_number("lr", lr, "a number >= 0", lambda v: v >= 0)
    check_number("weight_decay", weight_decay, "a number >= 0", lambda v: v >= 0)
    projections = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or layer.disable_adapters:
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.r:
                continue
            _check_layer(name, layer, adapter)
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a.requires_grad_(False)
            projections[b] = (a, layer.scaling[adapter])
    if not projections:
        raise ValueError("LoRA-FA projects the gradients of LoRA's B matrices, and the model has no active LoRA "
                         "adapter on a linear or convolutional layer")
    _check_settings(model, r, lora_alpha, use_rslora)
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(params, projections, lr=lr, weight_decay=weight_decay)


def _check_layer(name: str, layer: LoraLayer, adapter: str) -> None:
    """Refuse what the projection does not describe (module docstring)."""
    if isinstance(layer, LoraEmbedding):
        raise ValueError(f"LoRA-FA freezes A, and LoRA on the embedding {name!r} starts its A at zero: it would never "
                         "train. Leave embeddings out of target_modules (or train them with another optimizer)")
    if layer.use_dora.get(adapter):
        raise ValueError(f"LoRA-FA projects B's gradient for the update s B A; {name!r} uses DoRA, whose update "
                         "rescales W + s B A row by row. Use use_dora=False")
    if isinstance(layer, LoraConv) and getattr(layer.get_base_layer(), "groups", 1) > 1:
        raise ValueError(f"LoRA-FA's projection is for a B that mixes all of A's rows; {name!r} is a grouped "
                         "convolution, whose B is grouped too")
    if isinstance(layer, LoraParameter) and layer.num_experts > 1:
        raise ValueError(f"LoRA-FA's projection is for one B A; {name!r} holds a pair per expert "
                         f"({layer.num_experts}), which would need one projection each (not implemented)")


def _check_settings(model: nn.Module, r: int, lora_alpha: float, use_rslora: bool | None) -> None:
    """``r``, ``lora_alpha`` and ``use_rslora`` must be those of the active adapters' configs, where
    the model has configs (a PeftModel): a mismatch means the caller thinks of another adapter."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for adapter in getattr(model, "active_adapters", []):
        config = configs.get(adapter)
        wrong = [(k, given, getattr(config, k)) for k, given in (("r", r), ("lora_alpha", lora_alpha),
                 ("use_rslora", use_rslora)) if given is not None and getattr(config, k, given) != given]
        if wrong:
            said = ", ".join(f"{k}={given!r} (its config: {held!r})" for k, given, held in wrong)
            raise ValueError(f"create_lorafa_optimizer got {said} for adapter {adapter!r}; pass the config's values "
                             "(each layer's scale is read from the layer)")

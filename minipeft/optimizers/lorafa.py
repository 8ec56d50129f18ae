"""LoRA-FA (Zhang et al. 2023): LoRA with A frozen, and B's gradient projected so that B's step
moves the weight as close as it can to where full fine-tuning's step would.

    optimizer = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=2e-4)

Freezing A. A layer adapted by ``W + s B A`` (A: (r, in), B: (out, r)) with A frozen at its
random init trains only B's ``r out`` of the ``r (in + out)`` parameters, and needs no activation
kept for A's gradient: the backward stores ``z = A x`` (r wide) instead of ``x`` (in wide). That
is the memory LoRA-FA saves.

Projecting B's gradient. With A fixed, a step ``dB`` changes the weight by ``s dB A``, a matrix
whose rows lie in the row space of A. Full fine-tuning would step by ``-g_W`` (``g_W`` = dL/dW).
The step of B that comes closest, ``min ||s dB A - g_W||_F``, is the least-squares solution

    dB = (1 / s) g_W A^T (A A^T)^-1 = (1 / s^2) g_B (A A^T)^-1      since  g_B = dL/dB = s g_W A^T

so LoRA-FA replaces B's gradient ``g_B`` (out, r) by ``g_B (A A^T)^-1 / s^2`` and hands that to
Adam. The r x r inverse is computed once per layer (A does not change) and in float32 at least:
``(A A^T + 1e-8 I)`` pseudo-inverted, as in the reference code (the pseudo-inverse leaves out the
directions a rank-deficient A lacks, instead of dividing by nearly zero).

The optimizer is AdamW as transformers first wrote it (the reference code builds on it): the
step is ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``, so ``eps`` meets the uncorrected
``sqrt(v)`` (torch's AdamW adds it to the corrected one), and the weight decay comes after the
step, ``p <- p - lr wd p``. Every other trainable parameter (a head trained whole, biases, B's own
bias with ``lora_bias``) takes plain AdamW steps.

``create_lorafa_optimizer`` freezes A in the model, so a training loop that builds its own
optimizer afterwards trains B alone without the projection (as the paper's first version did);
``minipeft.train.train`` builds this optimizer with ``TrainConfig(lorafa=True)``.

Differences from peft's ``create_lorafa_optimizer`` (same arguments, same steps on float32 models):

* the projection runs in float32 at least; peft runs it under bfloat16 autocast wherever
  bfloat16 is available (CPUs included), rounding B's gradient to 8 bits of mantissa;
* the state is kept per parameter, so the optimizer's ``state_dict`` saves and loads (a run
  resumes); peft keys it by name strings, which ``state_dict`` cannot hold;
* A is read from each B's own layer, not paired by the order of the names: with ``lora_bias``,
  peft pairs A with B's bias and fails; on a ``Conv2d``, peft's shapes do not match;
* refused: LoRA on embeddings (whose A starts at zero, so ``A A^T`` is singular: peft's step is
  then ``1e8`` times its gradient), on grouped convolutions, on a mixture of experts' stacked
  parameters (a pair per expert), and DoRA (whose update is not ``s B A``);
* ``r``, ``lora_alpha`` and ``use_rslora``, which peft no longer reads, are checked against the
  config when one adapter is active.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from ..config import check_number
from ..tuners.lora import LoraConv, LoraEmbedding, LoraLayer
from ..tuners.lora_parameter import LoraParameter

PSEUDO_INVERSE_RIDGE = 1e-8  # the reference code's ``delta``


class LoraFAOptimizer(Optimizer):
    """AdamW (transformers' original form, module docstring) whose LoRA B matrices step along
    their projected gradient. ``projections``: ``{B: (A, s)}``, each B of ``params`` with the A and
    scale of its layer, A frozen and not among ``params``; the other parameters (also those added
    later by ``add_param_group``) take plain AdamW steps."""

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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.projections = dict(projections or {})
        optimized = {p for group in self.param_groups for p in group["params"]}
        moving = [tuple(a.shape) for a, _ in self.projections.values() if a in optimized or a.requires_grad]
        if moving:
            raise ValueError(f"LoRA-FA's projection holds A fixed, but A {moving[0]} would train (it is among the "
                             "parameters, or requires grad); freeze it (create_lorafa_optimizer does)")
        self._inverses: dict[nn.Parameter, tuple[int, torch.Tensor]] = {}  # B -> (A's version, (A A^T)^-1)

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
                    grad = self._projected(p, grad)
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

    def _projected(self, b: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        a, scaling = self.projections[b]
        version, inverse = self._inverses.get(b, (None, None))
        if version != a._version:  # (computed again only if A was changed in place)
            inverse = gram_inverse(a)
            self._inverses[b] = (a._version, inverse)
        return projected_gradient(grad, inverse, scaling)


def gram_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(A A^T + 1e-8 I)^+`` (r, r), in float32 at least. ``a``: A (r, in), or a convolution's
    (r, in, *kernel), taken as the matrix (r, in * kernel)."""
    a = a.reshape(a.shape[0], -1)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    ridge = PSEUDO_INVERSE_RIDGE * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.pinv(a @ a.T + ridge)


def projected_gradient(grad_b: torch.Tensor, inverse: torch.Tensor, scaling: float) -> torch.Tensor:
    """``g_B (A A^T)^-1 / s^2`` (module docstring), in ``grad_b``'s dtype. ``grad_b``: B's gradient
    as B is stored ((out, r), or a convolution's (out, r, 1, ...)); ``inverse``: ``gram_inverse(A)``."""
    rows = grad_b.reshape(grad_b.shape[0], -1).to(inverse.dtype)  # (out, r)
    return (rows @ inverse / scaling**2).reshape(grad_b.shape).to(grad_b.dtype)


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> LoraFAOptimizer:
    """LoRA-FA over ``model``'s trainable parameters: the A of every active LoRA adapter frozen
    (``requires_grad=False``, in the model), each B stepped along its projected gradient with its
    layer's own scale, everything else plain AdamW (betas 0.9, 0.999; eps 1e-6).

    peft's signature: ``r``, ``lora_alpha`` and ``use_rslora`` are checked against the config when
    one adapter is active (each layer's scale is read from the layer itself, rank_pattern and
    alpha_pattern included). Everything is checked before any A is frozen.
    """
    projections = lorafa_projections(model)
    _check_settings(model, r, lora_alpha, use_rslora)
    freeze_a(projections)
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(params, projections, lr=lr, weight_decay=weight_decay)


def lorafa_projections(model: nn.Module) -> dict[nn.Parameter, tuple[nn.Parameter, float]]:
    """``{B: (A, s)}`` for every active LoRA adapter of ``model``, each layer checked for what the
    projection describes (A is not frozen yet: ``freeze_a``)."""
    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)]
    if layers and all(layer.disable_adapters for _, layer in layers):
        raise ValueError("the model's adapters are disabled (inside `with model.disable_adapter()`?): build the "
                         "LoRA-FA optimizer where they are enabled")
    projections = {}
    for name, layer in layers:
        for adapter in layer.active_adapters:
            if adapter in layer.r:
                _check_layer(name, layer, adapter)
                projections[layer.lora_B[adapter].weight] = (layer.lora_A[adapter].weight, layer.scaling[adapter])
    if not projections:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "adapter_layer_names")})
        raise ValueError("LoRA-FA projects the gradients of LoRA's B matrices, and the model has no active LoRA "
                         "adapter on a linear or convolutional layer"
                         + (f" (its adapter layers: {kinds})" if kinds else ""))
    if not any(b.requires_grad for b in projections):
        raise ValueError("the active LoRA adapters are frozen (loaded for inference? PeftModel.from_pretrained(..., "
                         "is_trainable=True) loads one to train): LoRA-FA would train none of their B matrices")
    return projections


def freeze_a(projections: dict[nn.Parameter, tuple[nn.Parameter, float]]) -> None:
    """LoRA-FA's A stays as initialised: no gradient, no optimizer state, no input kept for it."""
    for a, _ in projections.values():
        a.requires_grad_(False)


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
    """With one adapter active and a config for it (a PeftModel), ``r``, ``lora_alpha`` and
    ``use_rslora`` must be the config's: a mismatch means the caller thinks of another adapter."""
    configs, active = getattr(model, "peft_config", None), getattr(model, "active_adapters", [])
    if not isinstance(configs, dict) or len(active) != 1 or active[0] not in configs:
        return
    config = configs[active[0]]
    given = {"r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora}
    wrong = {key: value for key, value in given.items() if value is not None and value != getattr(config, key, value)}
    if wrong:
        said = ", ".join(f"{key}={value!r} (its config: {getattr(config, key)!r})" for key, value in wrong.items())
        raise ValueError(f"create_lorafa_optimizer got {said} for adapter {active[0]!r}; pass the config's values "
                         "(each layer's scale is read from the layer)")

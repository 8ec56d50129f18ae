"""LoRA+ (Hayou, Ghosh and Yu, 2024): LoRA's B matrices learn with a larger step than its A.

    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)

The idea. LoRA adapts a frozen ``W`` (out x in) by ``s * B A`` with ``A``: (r, in) and
``B``: (out, r). The two factors are far from symmetric: ``A`` reads the layer's input, a
vector of width ``n = in`` (hundreds to thousands), while ``B`` reads ``z = A x``, a vector of
width ``r`` (a handful). Adam moves every entry of a matrix by about its learning rate ``eta``
(the update is ``m / sqrt(v)``, of size one per entry, times ``eta``). Roughly, how far does
that move the layer's output?

    A -> A + dA, |dA_ij| ~ eta_A:  dz = dA x sums n aligned terms,  |dz| ~ n * eta_A
    B -> B + dB, |dB_ij| ~ eta_B:  dy = dB z sums r terms,           |dy| ~ r * eta_B

For both factors to change the features by an amount that neither vanishes nor explodes as
the model gets wider, ``eta_A`` must shrink like ``1/n`` while ``eta_B`` stays of order one:
the best ratio ``eta_B / eta_A`` grows with the width. One learning rate for both (plain LoRA)
means either ``A`` steps right and ``B`` crawls (slow feature learning; ``B`` starts at zero,
so the adapter barely leaves it), or ``B`` steps right and ``A`` is unstable. LoRA+ keeps
``lr`` for ``A`` and gives ``B`` ``lr * loraplus_lr_ratio``. The width's constant is not known,
so the ratio is a hyper-parameter; the authors suggest starting near 16, with ``lr`` a little
below the usual LoRA one.

The same argument covers every trainable *vector* (a bias, a norm's gain, DoRA's
magnitude): it scales or shifts the output directly, like ``B`` with a fan-in of one, so it
gets ``B``'s step too. (The rule goes by shape, as peft's: a convolution's DoRA magnitude is
stored (1, out, 1, ...), not as a vector, so it gets ``A``'s.) LoRA on an embedding is looked up by token id, not multiplied with a
dense input, so the argument does not carry over; its tables get a learning rate of their own,
``loraplus_lr_embedding``.

The groups, as peft's ``create_loraplus_optimizer`` builds them (same order, same members):

    group        members                                            lr              weight_decay
    A            LoRA A, and every other trainable matrix           lr              wd
    embedding    the A and B tables of LoRA embedding layers        lr_embedding    wd
    B            LoRA B, and every trainable vector                 lr * ratio      wd
    B, no decay  the members of B that are biases or in a LayerNorm lr * ratio      0

with ``wd = loraplus_weight_decay``. A parameter's role is read from the module that holds it
(a ``LoraLayer``'s ``lora_B`` dict, a ``LoraEmbedding``'s tables, an ``nn.LayerNorm``; a bias is
a parameter registered as ``bias``), where peft searches names for "lora_B" and "bias": the two
agree on every model whose names do not hold those words by chance. As in peft (and
transformers' Trainer), only ``nn.LayerNorm`` counts as a norm, so an RMSNorm gain decays.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.optim import Optimizer

from ..config import check_number
from ..tuners.lora import LoraEmbedding, LoraLayer

# peft's default: LoRA on an embedding barely moves unless asked to
LORAPLUS_LR_EMBEDDING = 1e-6


def lora_factor_kinds(model: nn.Module) -> dict[int, str]:
    """The LoRA factors of ``model``'s LoRA layers, by ``id`` of the parameter: ``"A"``, ``"B"``
    (B's bias too, with ``lora_bias``) or ``"embedding"`` (either table of a LoRA embedding).
    Read from the modules that hold them, not from parameter names."""
    factors = {}
    for m in model.modules():
        if isinstance(m, LoraEmbedding):
            factors.update((id(p), "embedding") for p in (*m.lora_embedding_A.values(), *m.lora_embedding_B.values()))
        elif isinstance(m, LoraLayer):
            factors.update((id(p), "A") for p in m.lora_A.parameters())
            factors.update((id(p), "B") for p in m.lora_B.parameters())
    return factors


def loraplus_roles(model: nn.Module) -> dict[str, str]:
    """The LoRA+ role of each trainable parameter of ``model``, by name, in the model's order:
    ``"B"`` (LoRA B matrices and every vector), ``"embedding"`` (LoRA embedding tables) or
    ``"A"`` (LoRA A matrices and every other matrix).

    A ValueError, saying what the model has instead, when nothing is trainable or no LoRA B is.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimize")
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    factors = lora_factor_kinds(model)
    embedding = {i for i, kind in factors.items() if kind == "embedding"}
    lora_b = {i for i, kind in factors.items() if kind == "B"}

    roles = {}
    for name, p in trainable.items():
        if id(p) in embedding:
            roles[name] = "embedding"
        elif id(p) in lora_b or p.dim() == 1:
            roles[name] = "B"
        else:
            roles[name] = "A"
    if not any(id(p) in lora_b or id(p) in embedding for p in trainable.values()):
        raise ValueError(f"LoRA+ sets the learning rate of LoRA's B matrices, but this model trains none: "
                         f"{_what_there_is(lora_layers, list(trainable))}")
    return roles


_WITHOUT = "train without LoRA+ (a plain optimizer; loraplus_lr_ratio=None in a TrainConfig)"


def _what_there_is(lora_layers: dict[str, LoraLayer], trainable: list[str]) -> str:
    """Why no trainable LoRA B was found, for the error: what the model holds instead."""
    names = ", ".join(trainable[:4]) + (f" (and {len(trainable) - 4} more)" if len(trainable) > 4 else "")
    if lora_layers:
        return (f"its LoRA layers ({', '.join(list(lora_layers)[:3])}{', ...' if len(lora_layers) > 3 else ''}) "
                f"are frozen, and what trains is {names}. Make the adapter trainable (is_trainable=True when "
                f"loading it), or {_WITHOUT}")
    if any("lora_B" in n for n in trainable):
        return (f"it has parameters named like LoRA's ({names}) but no minipeft LoRA layer; a model adapted by "
                "peft takes peft.optimizers.create_loraplus_optimizer")
    return (f"it has no LoRA layer, and what trains is {names}. Add a LoRA adapter (get_peft_model or "
            f"inject_adapter_in_model with a LoraConfig), or {_WITHOUT}")


def _no_decay(model: nn.Module) -> set[int]:
    """Ids of the parameters LoRA+ keeps from decaying when they take B's step: biases and
    everything inside an ``nn.LayerNorm`` (decay would pull a gain towards 0; its neutral value
    is 1). Matrices of the A group decay whatever they are, as in peft."""
    ids = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False) if name == "bias"}
    ids |= {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    return ids


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING,
    loraplus_weight_decay: float = 0.0,
    **kwargs,
) -> Optimizer:
    """An ``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s four groups (module
    docstring): LoRA B matrices and vectors at ``lr * loraplus_lr_ratio``, LoRA A matrices and
    other matrices at ``lr``, LoRA embedding tables at ``loraplus_lr_embedding``.

    model: a PeftModel, or any nn.Module with minipeft LoRA layers in it (inject_adapter_in_model).
    optimizer_cls: the optimizer class, e.g. ``torch.optim.AdamW``.
    lr: the learning rate of A. loraplus_lr_ratio: ``eta_B / eta_A``, > 0 (LoRA+ means > 1).
    loraplus_weight_decay: the weight decay of every group but the biases and LayerNorm vectors.
        It is the only decay setting: each group states its own, so a ``weight_decay`` keyword,
        which would go to ``optimizer_cls`` and be overridden by them all, is refused.
    kwargs: passed to ``optimizer_cls`` (``betas``, ``eps``, ...).

    The arguments, groups and their order are peft's, so code written for peft runs unchanged and
    the two optimizers' state dicts load into each other. peft additionally keeps bitsandbytes'
    8-bit optimizers at 32 bits for embeddings; minipeft does not depend on bitsandbytes.
    """
    if isinstance(optimizer_cls, Optimizer) or not callable(optimizer_cls):
        raise TypeError(f"optimizer_cls must be an optimizer class such as torch.optim.AdamW (it is called with the "
                        f"groups), not {optimizer_cls!r}")
    check_number("lr", lr, "a number >= 0", lambda v: v >= 0)
    check_number("loraplus_lr_ratio", loraplus_lr_ratio, "a number > 0 (LoRA+ means > 1, e.g. 16)",
                  lambda v: v > 0)
    check_number("loraplus_lr_embedding", loraplus_lr_embedding, "a number >= 0", lambda v: v >= 0)
    check_number("loraplus_weight_decay", loraplus_weight_decay, "a number >= 0", lambda v: v >= 0)
    if "weight_decay" in kwargs:
        raise TypeError(f"weight_decay={kwargs['weight_decay']!r} would be ignored: every LoRA+ group sets its own "
                        "decay. Pass loraplus_weight_decay instead (biases and LayerNorm vectors never decay)")

    roles = loraplus_roles(model)
    no_decay = _no_decay(model)
    groups = {  # peft's order, empty groups kept: the two libraries' optimizer state dicts line up
        "A": {"params": [], "lr": lr, "weight_decay": loraplus_weight_decay},
        "embedding": {"params": [], "lr": loraplus_lr_embedding, "weight_decay": loraplus_weight_decay},
        "B": {"params": [], "lr": lr * loraplus_lr_ratio, "weight_decay": loraplus_weight_decay},
        "B, no decay": {"params": [], "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if name in roles:
            role = "B, no decay" if roles[name] == "B" and id(p) in no_decay else roles[name]
            groups[role]["params"].append(p)
    return optimizer_cls(list(groups.values()), lr=lr, **kwargs)

"""AdaLoRA's rank allocator: which singular-value triplets to keep, step by step.

The budget is the number of triplets kept over all adapted layers. It starts at
``b0 = sum of init_r`` (every triplet), and ends at ``bT = target_r * layers``, shrinking on a
cubic schedule between step ``tinit`` and step ``T - tfinal`` (``T = total_step``):

    b(t) = b0                                        t <= tinit          (warm-up)
    b(t) = bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3      (pruning, every deltaT steps)
    b(t) = bT                                        t > T - tfinal      (fine-tuning, pattern fixed)

How much a triplet matters is its sensitivity: for every entry w of P, E and Q, ``I = |w * dL/dw|``
(the first-order change of the loss if w went to zero; taken, as in peft, with the weight after
the optimizer step and the gradient of the step), smoothed over steps, times its uncertainty:

    Ibar = beta1 Ibar + (1 - beta1) I         U = beta2 U + (1 - beta2) |I - Ibar|         s(w) = Ibar U

and a triplet's score is ``s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki)``. At each pruning step the
scores of all layers' triplets are ranked together and every triplet at or below the
(b0 - b(t))-th smallest gets E_i = 0; which ones survive is recorded in the config's
``rank_pattern``. This is peft's RankAllocator, step for step (its tests compare the two), except
where peft raises because no triplet is to be pruned (the budget has not shrunk yet): nothing is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..targeting import logical_name
from .adalora import MASK_SUFFIX, AdaLoraConfig, SVDLinear


class RankAllocator:
    """The budget schedule and the importance statistics of one training AdaLoRA adapter."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        self.config, self.adapter_name = config, adapter_name
        self.layers = {f"{logical_name(model, name)}{MASK_SUFFIX}": layer for name, layer in model.named_modules()
                       if isinstance(layer, SVDLinear) and adapter_name in layer.lora_E}
        self.initial_budget = sum(layer.r[adapter_name] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset_importance()

    def is_active(self) -> bool:
        """Whether its adapter is the one the layers apply."""
        return any(self.adapter_name in layer.active_adapters for layer in self.layers.values())

    def reset_importance(self) -> None:
        self.smoothed: dict[tuple[str, str], torch.Tensor] = {}  # Ibar, per (layer, factor)
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # U

    def state_dict(self) -> dict:
        """What a resumed run needs: the statistics and the pattern so far (plain types, by name)."""
        return {"smoothed": {f"{key}|{factor}": t for (key, factor), t in self.smoothed.items()},
                "uncertainty": {f"{key}|{factor}": t for (key, factor), t in self.uncertainty.items()},
                "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed = {tuple(name.rsplit("|", 1)): t for name, t in state["smoothed"].items()}
        self.uncertainty = {tuple(name.rsplit("|", 1)): t for name, t in state["uncertainty"].items()}
        self.config.rank_pattern = state["rank_pattern"]

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep at ``step``, whether this step prunes)."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold this step's ``|w * grad|`` into Ibar and U (after backward, before zero_grad)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, layer in self.layers.items():
            for factor in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, factor)[self.adapter_name]
                if p.grad is None:
                    raise RuntimeError(
                        f"update_and_allocate found no gradient on {key[:-len(MASK_SUFFIX)]}.{factor}: call it after "
                        "loss.backward() and before optimizer.zero_grad()"
                    )
                importance = (p * p.grad).abs()
                smoothed = self.smoothed.get((key, factor), torch.zeros_like(p))
                uncertainty = self.uncertainty.get((key, factor), torch.zeros_like(p))
                smoothed = beta1 * smoothed + (1 - beta1) * importance
                self.smoothed[key, factor] = smoothed
                self.uncertainty[key, factor] = beta2 * uncertainty + (1 - beta2) * (importance - smoothed).abs()

    def triplet_scores(self, key: str) -> torch.Tensor:
        """(r,): each triplet's s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki)."""
        score = {f: self.smoothed[key, f] * self.uncertainty[key, f] for f in ("lora_A", "lora_B", "lora_E")}
        # Summed in peft's order, (Q + P) then E: the same floats, so ties break the same way.
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E for every triplet scored at or below the (b0 - budget)-th smallest score; the
        surviving triplets, per layer."""
        if not self.smoothed:
            raise RuntimeError(
                "AdaLoRA's allocation needs the importance of at least one step before it prunes: call "
                "update_and_allocate on every step, from the first (tinit and tfinal leave one before the final pruning)"
            )
        scores = {key: self.triplet_scores(key) for key in self.layers}
        drop = self.initial_budget - budget
        if drop <= 0:
            return {key: [True] * len(s) for key, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop).values.item()
        pattern = {}
        for key, score in scores.items():
            keep = score > threshold
            self.layers[key].lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[key] = keep.tolist()
        return pattern

    @contextlib.contextmanager
    def as_saved(self) -> Iterator[None]:
        """The adapter as its checkpoint holds it, for the block: between pruning steps the optimizer
        moves pruned singular values again, and a checkpoint drops them. Afterwards they are back,
        as training left them (their importance feeds the next pruning)."""
        pattern = self.config.rank_pattern
        if not pattern:
            yield
            return
        values = {key: layer.lora_E[self.adapter_name].detach().clone() for key, layer in self.layers.items()}
        self.mask_to_pattern(pattern)
        try:
            yield
        finally:
            with torch.no_grad():
                for key, layer in self.layers.items():
                    layer.lora_E[self.adapter_name].copy_(values[key])

    @torch.no_grad()
    def mask_to_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Zero E again where ``pattern`` pruned (the optimizer moves pruned entries in the fine-tuning steps)."""
        for key, keep in pattern.items():
            E = self.layers[key].lora_E[self.adapter_name]
            E.masked_fill_(~torch.tensor(keep, device=E.device).view(-1, 1), 0.0)


def update_and_allocate(allocator: RankAllocator, step: int) -> None:
    """One training step of the allocator (peft's ``update_and_allocate``): before ``T - tfinal``
    fold in the importances and prune on schedule; at ``T - tfinal`` prune to the final budget and
    fix the pattern; after it, keep the pruned triplets at zero."""
    config = allocator.config
    final = config.total_step - config.tfinal
    if step < final:
        allocator.update_importance()
        budget, prunes = allocator.budget(step)
        if prunes:
            config.rank_pattern = allocator.mask_to_budget(budget)
    elif step == final:  # the last pruning, on the scores so far (peft folds this step's gradients in no more)
        config.rank_pattern = allocator.mask_to_budget(allocator.budget(step)[0])
        allocator.reset_importance()
    elif config.rank_pattern:
        allocator.mask_to_pattern(config.rank_pattern)


def attach_allocator(peft_model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> None:
    """The registry's ``after_add``: an AdaLoRA adapter that trains gets an allocator, kept by the
    model that holds the layers (``peft_model.base_model``, peft's place for it). One loaded with
    its ranks allocated (a rank_pattern) fine-tunes at those ranks: its layers are no longer init_r
    wide, which the allocator's masks and budget are laid over."""
    if not config.inference_mode and not config.rank_pattern:
        allocators = peft_model.base_model.rank_allocators
        allocators[adapter_name] = RankAllocator(peft_model.get_base_model(), config, adapter_name)

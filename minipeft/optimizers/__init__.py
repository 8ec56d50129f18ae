"""Optimizers made for LoRA: LoRA+ (a larger step for B, ``loraplus.py``) and LoRA-FA (A frozen,
B's gradient projected, ``lorafa.py``)."""

from .lorafa import LoraFAOptimizer, create_lorafa_optimizer, freeze_a, lorafa_projections
from .loraplus import LORAPLUS_LR_EMBEDDING, create_loraplus_optimizer, lora_factor_kinds, loraplus_roles

__all__ = [
    "LORAPLUS_LR_EMBEDDING",
    "LoraFAOptimizer",
    "create_lorafa_optimizer",
    "create_loraplus_optimizer",
    "freeze_a",
    "lora_factor_kinds",
    "lorafa_projections",
    "loraplus_roles",
]

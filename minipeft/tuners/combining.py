"""What combining adapters into a new one shares, whatever the method (``add_weighted_adapter``:
LoRA's in ``lora_combine.py``, (IA)^3's in ``ia3.py``).

The new adapter's config names what the sources name together: their targets united (as peft
writes them), and every module some source trains whole (``modules_to_save``). Such a module
comes along as the trained copy of the one source that trains it; two sources training it is an
error, since which copy to keep would be a guess (``TrainedCopies.copy_of``).
"""

from __future__ import annotations

from torch import nn

from .base import ModulesToSaveWrapper


def joined_targets(values: list) -> list[str] | str | None:
    """Several configs' target fields as one, as peft joins them: lists of names united (sorted),
    regexes joined into one alternation (one regex kept as it is); None where the forms mix."""
    if all(isinstance(v, list) for v in values):
        return sorted(set().union(*values))
    if all(isinstance(v, str) for v in values):
        patterns = list(dict.fromkeys(values))
        return patterns[0] if len(patterns) == 1 else "|".join(f"({p})" for p in patterns)
    return None


def saved_modules(configs: list) -> list[str] | None:
    """Every module some config trains whole, in first-seen order (None for none, peft's default)."""
    return list(dict.fromkeys(m for c in configs for m in c.modules_to_save or [])) or None


def trained_heads(model: nn.Module, sources: list[str]) -> list[tuple[ModulesToSaveWrapper, str]]:
    """``(wrapper, source)`` for each module trained whole by one of ``sources``: the copy the
    combined adapter takes (a ValueError where two sources train the same module)."""
    heads = [(wrapper, wrapper.copy_of(sources, name)) for name, wrapper in model.named_modules()
             if isinstance(wrapper, ModulesToSaveWrapper)]
    return [(wrapper, source) for wrapper, source in heads if source is not None]


def copy_trained_heads(heads: list[tuple[ModulesToSaveWrapper, str]], adapter_name: str) -> None:
    """Give adapter ``adapter_name`` (already in each wrapper) the trained copy of its source."""
    for wrapper, source in heads:
        copies = wrapper.modules_to_save
        copies[adapter_name].load_state_dict(copies[source].state_dict())

"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train the normalisation layers alone.

A normalisation layer computes ``y = gamma * normalise(x) + beta``; its scale ``gamma`` and
shift ``beta`` (d numbers each) set the scale and offset of every feature the next layer reads.
LN tuning trains just those, in every normalisation layer, and freezes everything else: about
0.01-0.1% of a transformer's parameters, for one ``2 d`` pair per layer norm.

Each adapter trains its own copy of the targeted module (``ln_tuning_layers[name]``), so the
original stays as it was and adapters can be switched or disabled, as with ``modules_to_save``
(``TrainedCopies`` in ``base.py``). Any module can be targeted; by default, the layers peft's table
names for the model's architecture (``architecture_targets.LN_TUNING``), and on any other model
every normalisation layer minipeft finds. Merging has nothing to add up: as in peft, a
merged adapter's copy takes the layer's place, one adapter at a time.

Checkpoints, as peft's: the copy's state under ``<layer>.ln_tuning_layers.`` (``weight``,
``bias``; a batch norm's running statistics too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config import PeftConfig, PeftType
from ..targeting import candidate_names, innermost, is_under, name_matches
from .architecture_targets import LN_TUNING, from_table
from .base import TrainedCopies, _merge_numbers, layers_a_copy_would_copy


@dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning's settings, with peft's field names.

    target_modules: the modules whose copies train (names exact or as a dotted suffix, or a
        full-match regex); by default those of peft's table for the architecture, else every
        normalisation layer (``default_targets``).
    exclude_modules: never adapted, even when matched.
    modules_to_save: modules trained whole beside them (a classifier head).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LN_TUNING


class LNTuningLayer(TrainedCopies):
    """A targeted module and, per adapter, its trained copy ``ln_tuning_layers[name]``."""

    adapter_layer_names = ("ln_tuning_layers",)
    adapter_key_name = copies_name = "ln_tuning_layers"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    # -- merging, peft's way: the merged adapter's copy runs in the layer's place ------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Let the adapter's copy run in the layer's place, whichever adapter is active (nothing is
        added up, so ``safe_merge`` has nothing to check)."""
        names = self._check_mergeable(adapter_names)
        if len(self.merged_adapters) + len(names) > 1:
            raise ValueError(
                f"LN tuning merges one adapter into a layer (its copy takes the layer's place); asked to merge {names} "
                f"with {self.merged_adapters} merged already. Unmerge first, or merge one adapter"
            )
        for name in names:
            self.merged_adapters.append(name)
            self.merge_number[name] = next(_merge_numbers)

    def unmerge_newest(self) -> None:
        self.merge_number.pop(self.merged_adapters.pop())

    def module_in_use(self) -> nn.Module:
        """The merged adapter's copy, else the active adapter's, else the original."""
        return self.copies()[self.merged_adapters[-1]] if self.merged_adapters else super().module_in_use()

    def forward(self, *args, **kwargs):
        self.unmerge_if_disabled()
        return super().forward(*args, **kwargs)

    def unwrap(self, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
        """Merging: the chosen adapter's copy (after unmerging another, as peft does); else an
        adapter merged before stays (its copy), or the original."""
        if not merge and self.merged_adapters:
            return self.copies()[self.merged_adapters[-1]]
        return super().unwrap(merge, adapter_names)


def is_normalisation(module: nn.Module) -> bool:
    """A layer norm, RMS norm, group norm or batch norm with parameters to train: torch's own, or
    a model's class named that way (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    named = type(module).__name__.lower().endswith("norm")
    return (isinstance(module, torch_norms) or named) and any(True for _ in module.parameters(recurse=False))


def default_targets(model: nn.Module, config: LNTuningConfig) -> list[str] | str:
    """peft's names for the model's architecture, or, for a model peft's table does not know,
    every normalisation layer in it."""
    return from_table(LN_TUNING)(model, config) or normalisation_layers(model)


def normalisation_layers(model: nn.Module) -> list[str] | str:
    """The default targets: every normalisation layer in ``model`` (wrapped by adapters already or
    not; a norm inside another is its copy's business), named as peft's table names them, by
    their last segments (``input_layernorm``), unless those would also select other modules:
    then as a regex of their full names (a list entry matches as a dotted suffix too)."""
    candidates = candidate_names(model)  # {real name: logical name}
    names = candidates.values()
    norms = [logical for real, logical in candidates.items() if is_normalisation(innermost(model.get_submodule(real)))]
    norms = [n for n in norms if not any(n.startswith(outer + ".") for outer in norms)]
    if not norms:
        raise ValueError(
            f"LN tuning found no normalisation layer in {type(model).__name__} (a LayerNorm, RMSNorm, GroupNorm or "
            "BatchNorm with parameters); name the modules to train with LNTuningConfig(target_modules=[...])"
        )
    last_segments = sorted({n.rsplit(".", 1)[-1] for n in norms})
    exact = {n for n in names if name_matches(n, last_segments)} == set(norms)
    return last_segments if exact else "|".join(re.escape(n) for n in norms)


def check_target(target: nn.Module, config: LNTuningConfig, key: str) -> None:
    """A target must have parameters, and hold no other adapter's layers: its copy would copy them
    too (and save their tensors under this adapter's name), as ``modules_to_save`` refuses."""
    if not any(True for _ in target.parameters()):
        raise ValueError(f"cannot apply LN tuning to {key!r}: this {type(target).__name__} has no parameters to train")
    inside = layers_a_copy_would_copy(target, LNTuningLayer)
    if inside:
        wrapper = target.get_submodule(inside[0])
        raise ValueError(
            f"cannot apply LN tuning to {key!r}: adapter(s) {wrapper.adapter_names} already sit inside it "
            f"({type(wrapper).__name__} {f'at {inside[0]!r}' if inside[0] else 'on the module itself'}), and a "
            "trained copy would copy them too. Target the normalisation layers themselves"
        )


def check_targets_apart(model: nn.Module, config: LNTuningConfig, targets: list[str]) -> None:
    """No target inside another: the outer one's copy holds the inner one already."""
    for name in targets:
        outer = [other for other in targets if other != name and is_under(name, [other])]
        if outer:
            raise ValueError(
                f"LN tuning targets {name!r} inside {outer[0]!r}, whose trained copy holds it already; target one of "
                "the two"
            )


def wrap_module(target: nn.Module, adapter_name: str, config: LNTuningConfig, key: str) -> LNTuningLayer:
    """Build the LN-tuning wrapper for ``target`` (the module named ``key``) with one adapter."""
    check_target(target, config, key)
    layer = LNTuningLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train the normalisation layers alone.

A normalisation layer computes ``y = gamma * normalise(x) + beta``; its scale ``gamma`` and
shift ``beta`` (d numbers each) set the scale and offset of every feature the next layer reads.
LN tuning trains just those, in every normalisation layer, and freezes everything else: about
0.01-0.1% of a transformer's parameters, for one ``2 d`` pair per layer norm.

Each adapter trains its own copy of the targeted module (``ln_tuning_layers[name]``), so the
original stays as it was and adapters can be switched or disabled, as with ``modules_to_save``
(``TrainedCopies`` in ``base.py``). Any module can be targeted; by default minipeft targets
every normalisation layer it finds (peft looks the names up in a table per architecture, which
lists the same layers for the models both know). Merging has nothing to add: the merged model
is the original with the adapter's copies in place of the layers.

Checkpoints, as peft's: ``<layer>.ln_tuning_layers.weight`` (and ``.bias``) per targeted layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import PeftConfig, PeftType
from ..targeting import candidate_names, innermost
from .base import TrainedCopies


@dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning's settings, with peft's field names.

    target_modules: the modules whose copies train (names exact or as a dotted suffix, or a
        full-match regex); by default every normalisation layer (``normalisation_layers``).
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


def is_normalisation(module: nn.Module) -> bool:
    """A layer norm, RMS norm, group norm or batch norm with parameters to train: torch's own, or
    a model's class named that way (``LlamaRMSNorm``, ``T5LayerNorm``, ...)."""
    torch_norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    named = type(module).__name__.lower().endswith("norm")
    return (isinstance(module, torch_norms) or named) and any(True for _ in module.parameters(recurse=False))


def normalisation_layers(model: nn.Module) -> list[str]:
    """The default targets: the names (last segments, as peft's table lists them) of every
    normalisation layer in ``model``, wrapped by adapters already or not."""
    found = sorted({logical.rsplit(".", 1)[-1] for real, logical in candidate_names(model).items()
                    if is_normalisation(innermost(model.get_submodule(real)))})
    if not found:
        raise ValueError(
            f"LN tuning found no normalisation layer in {type(model).__name__} (a LayerNorm, RMSNorm, GroupNorm or "
            "BatchNorm with parameters); name the modules to train with LNTuningConfig(target_modules=[...])"
        )
    return found


def wrap_module(target: nn.Module, adapter_name: str, config: LNTuningConfig, key: str) -> LNTuningLayer:
    """Build the LN-tuning wrapper for ``target`` (the module named ``key``) with one adapter."""
    if not any(True for _ in target.parameters()):
        raise ValueError(f"cannot apply LN tuning to {key!r}: this {type(target).__name__} has no parameters to train")
    layer = LNTuningLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer

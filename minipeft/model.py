"""PeftModel: a pretrained model plus named adapters, with peft's user-facing API.

The wrapped model sits at ``peft_model.base_model.model`` so that parameter names read
``base_model.model.<path>...`` exactly as in peft, and state dicts move between the two
libraries unchanged. Attributes the PeftModel does not have (``config``, ``generate``, ...)
fall through to the wrapped model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn

from . import checkpoint, injection
from .config import PeftConfig, TaskType
from .targeting import CLASSIFIER_HEAD_NAMES
from .tuners import AdapterLayer, ModulesToSaveWrapper, method_for, virtual_tokens


class AdaptedModel(nn.Module):
    """Holds the user's model as ``.model`` (peft's ``LoraModel`` plays this role)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A base model with one or more named adapters; ``get_peft_model`` builds one."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = AdaptedModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str = adapter_name
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- adapters by name ---------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a new adapter; it becomes active only when it is the first one (as in peft)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        config = copy.deepcopy(peft_config)
        if config.task_type == TaskType.SEQ_CLS and hasattr(config, "modules_to_save"):
            # Classification heads are new: they must train and be saved with the adapter.
            extra = [n for n in CLASSIFIER_HEAD_NAMES if n not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.get_base_model(), "config", None), "name_or_path", None) or None
        first = not self.peft_config
        if config.is_prompt_learning:
            # Virtual tokens live beside the model (self.prompt_encoder) and reach it through hooks.
            method_for(config).attach(self, adapter_name, config)
        else:
            injection.inject_adapter_in_model(config, self.get_base_model(), adapter_name, activate=first)
        self.peft_config[adapter_name] = config
        if not first:
            # Keep the current adapter active everywhere, including the new wrappers.
            self.set_adapter(self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Activate one adapter in every layer; only it trains (unless loaded for inference)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        if config.is_prompt_learning:
            virtual_tokens.set_active(self, adapter_name, trainable=not config.inference_mode)
        else:
            if "prompt_encoder" in self._modules:
                self.prompt_encoder.set_adapter(adapter_name)  # no virtual tokens while a layer adapter runs
            base = self.get_base_model()
            for name, other in self.peft_config.items():  # biases trained by the adapter that was active
                if name != adapter_name and not other.is_prompt_learning:
                    injection.set_biases_trainable(base, other, name, trainable=False)
            injection.set_adapter(base, [adapter_name], trainable=not config.inference_mode)
            if not config.inference_mode:
                injection.set_biases_trainable(base, config, adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {list(self.peft_config)}")
        if self.peft_config[adapter_name].is_prompt_learning:
            virtual_tokens.delete(self, adapter_name)
        else:
            injection.delete_adapter(self.get_base_model(), adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block."""
        layers = [layer for _, layer in injection.adapter_layers(self.get_base_model())]
        layers += [self.prompt_encoder] if "prompt_encoder" in self._modules else []
        before = [layer.disable_adapters for layer in layers]  # restored as found: nested blocks work
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, before):
                layer.disable_adapters = flag

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights (undo with ``unmerge_adapter``).

        ``safe_merge``: merge into copies first and raise a ValueError naming the adapter and the
        layer if any weight would hold NaN or inf. Every layer is checked before any is written,
        so a failed merge leaves the model as it was.
        """
        for _, layer, here in self._merge_plan(adapter_names, safe_merge, already_merged="error"):
            layer.merge(here)

    def unmerge_adapter(self) -> None:
        for _, layer in injection.adapter_layers(self.get_base_model()):
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The base model with the active (or given) adapters folded in and no minipeft module left.

        ``adapter_names`` merges several adapters at once: ``W + sum_i s_i B_i A_i``. A module
        trained whole (``modules_to_save``) comes back as the copy of the adapter being merged.
        ``safe_merge`` as in ``merge_adapter``: on failure the PeftModel is left as it was.
        ``progressbar`` is accepted for peft's signature and ignored (merging takes no time to watch).
        """
        if "prompt_encoder" in self._modules:
            raise TypeError("virtual tokens (prompt/prefix tuning) are not weights and cannot be merged; use unload()")
        plan = self._merge_plan(adapter_names, safe_merge, already_merged="keep")
        copies = [(name, here) for name, layer, here in plan if isinstance(layer, ModulesToSaveWrapper) and len(here) > 1]
        if copies:
            name, here = copies[0]
            raise ValueError(f"adapters {here} each train their own copy of {name!r}; merge_and_unload can keep only one")
        return injection.unload(self.get_base_model(), merge=True, adapter_names=adapter_names)

    def _merge_plan(
        self, adapter_names: list[str] | None, safe_merge: bool, already_merged: str
    ) -> list[tuple[str, AdapterLayer, list[str]]]:
        """``(layer name, wrapper, adapters to merge there)`` for every wrapper that holds one of
        ``adapter_names`` (default: the active adapter). Checks all that can fail before anything
        is merged: unknown names, adapters that are not linear maps of a weight, adapters merged
        already (``already_merged``: "error", or "keep" them merged) and, with ``safe_merge``,
        weights that would hold NaN or inf."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names is a list of names, got the string {adapter_names!r}")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown}; existing adapters: {list(self.peft_config)}")
        prompt = [n for n in names if self.peft_config[n].is_prompt_learning]
        if prompt:
            raise TypeError(f"adapter(s) {prompt} add virtual tokens, which are not weights and cannot be merged")
        plan = []
        for layer_name, layer in injection.adapter_layers(self.get_base_model()):
            here = [n for n in names if n in layer.adapter_names]
            twice = [n for n in here if n in layer.merged_adapters]
            if twice and already_merged == "error":
                raise ValueError(f"adapter(s) {twice} already merged into {layer_name!r}; unmerge_adapter() first")
            here = [n for n in here if n not in layer.merged_adapters]
            if here:
                plan.append((layer_name, layer, here))
        blocking = sorted({type(layer).__name__ for _, layer, _ in plan if not layer.mergeable})
        if blocking:
            raise TypeError(
                f"cannot merge adapter(s) {names}: {blocking} adapters are not linear maps of a weight, so they "
                "cannot be merged; call unload() to remove them without merging"
            )
        if safe_merge:
            for layer_name, layer, here in plan:
                layer.check_merge_is_finite(here, layer_name)
        return plan

    def unload(self) -> nn.Module:
        """The base model with every adapter removed, unmerged."""
        if "prompt_encoder" in self._modules:
            self.prompt_encoder.remove_hooks()
        return injection.unload(self.get_base_model(), merge=False)

    # -- parameters ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- checkpoints (peft's layout; the work is in checkpoint.py) ----------------------------
    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None) -> None:
        """Write adapter_config.json + adapter_model.safetensors; non-default adapters in subfolders."""
        checkpoint.save_pretrained(self, save_directory, selected_adapters)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a checkpoint folder (inactive, frozen unless ``is_trainable``)."""
        checkpoint.load_adapter(self, model_id, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False):
        """Wrap ``model`` with the adapter saved in folder ``model_id`` (frozen unless ``is_trainable``)."""
        return checkpoint.from_pretrained(cls, model, model_id, adapter_name, is_trainable)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; only the adapter trains."""
    return PeftModel(model, peft_config, adapter_name)

"""PeftModel: a pretrained model plus named adapters, with peft's user-facing API.

The wrapped model sits at ``peft_model.base_model.model`` so that parameter names read
``base_model.model.<path>...`` exactly as in peft, and state dicts move between the two
libraries unchanged. Attributes the PeftModel does not have (``config``, ``generate``, ...)
fall through to the wrapped model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

from torch import nn

from . import checkpoint, injection
from .config import PeftConfig, PeftType, TaskType
from .targeting import CLASSIFIER_HEAD_NAMES
from .tuners import AdapterLayer, ModulesToSaveWrapper, lora, method_for, virtual_tokens


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
        base = self.get_base_model()
        # Trained biases are base-model parameters, shared by all adapters: whatever the method
        # of the new adapter, those the others train stop first (the new one's may start again).
        for name, other in self.peft_config.items():
            if name != adapter_name:
                injection.set_biases_trainable(base, other, name, trainable=False)
        if config.is_prompt_learning:
            virtual_tokens.set_active(self, adapter_name, trainable=not config.inference_mode)
        else:
            if "prompt_encoder" in self._modules:
                self.prompt_encoder.set_adapter(adapter_name)  # no virtual tokens while a layer adapter runs
            injection.set_adapter(base, [adapter_name], trainable=not config.inference_mode)
            if not config.inference_mode:
                injection.set_biases_trainable(base, config, adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing adapters: {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        base = self.get_base_model()
        # Its trained biases are found through its config and wrappers, so before either goes;
        # they are frozen only once the deletion has succeeded (a merged adapter refuses).
        params = dict(base.named_parameters())
        biases = [params[name] for name in injection.trained_biases(base, config, adapter_name)]
        if config.is_prompt_learning:
            virtual_tokens.delete(self, adapter_name)
        else:
            injection.delete_adapter(base, adapter_name)
        del self.peft_config[adapter_name]
        for p in biases:
            p.requires_grad_(False)
        if self.peft_config:
            # Also when another adapter stays active: a bias both trained is trainable again.
            survivor = self.active_adapter if self.active_adapter in self.peft_config else next(iter(self.peft_config))
            self.set_adapter(survivor)

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
        for name, layer, here in plan:
            if isinstance(layer, ModulesToSaveWrapper) and len(here) > 1:
                raise ValueError(f"adapters {here} each train their own copy of {name!r}; merge_and_unload keeps one")
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

    # -- combining LoRA adapters --------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add LoRA adapter ``adapter_name`` whose update is ``sum_i weights[i] * s_i B_i A_i`` over
        ``adapters`` (weights may be negative), per layer; the math is in ``lora.combine``.

        combination_type: "cat" (exact; rank = the sum of the ranks), "svd" (the exact sum cut to
        rank ``svd_rank``, default the largest rank; ``svd_clamp``: clip the factors to that
        quantile; ``svd_full_matrices`` / ``svd_driver``: for ``torch.linalg.svd``) or "linear"
        (A and B mixed separately: cheap, approximate, equal ranks only). A single adapter is
        always combined "linear", which is exact for one. The new adapter has scaling 1
        (r = lora_alpha = its rank) and is added inactive and frozen like any second adapter:
        ``set_adapter(adapter_name)`` to use it. ``density`` and ``majority_sign_method`` belong to
        peft's ties/dare types, which minipeft does not implement; they are accepted and unused.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        if not adapters or len(weights) != len(adapters):
            raise ValueError(f"give one weight per adapter: got adapters {adapters} and weights {weights}")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; existing adapters: {list(self.peft_config)}")
        types = {a: self.peft_config[a].peft_type for a in adapters}
        other = {a: t.value for a, t in types.items() if t != PeftType.LORA}
        if other:
            raise TypeError(f"add_weighted_adapter combines LoRA adapters only; {other} are not LoRA")
        sources = [(a, self.peft_config[a]) for a in adapters]
        combination_type, rank = lora.combined_rank(sources, combination_type, svd_rank)

        base = self.get_base_model()
        layers = {name: layer for name, layer in injection.adapter_layers(base)
                  if isinstance(layer, lora.LoraLayer) and any(a in layer.r for a in adapters)}
        heads = {name: [a for a in dict.fromkeys(adapters) if a in layer.modules_to_save]
                 for name, layer in injection.adapter_layers(base) if isinstance(layer, ModulesToSaveWrapper)}
        for name, have in heads.items():
            if len(have) > 1:
                raise ValueError(f"adapters {have} each train their own copy of {name!r}; a combination keeps one")
        # Every new factor is computed before the model changes: an error leaves it as it was.
        factors = {
            name: lora.combine(
                [(*layer.lora_factors(a), w * layer.scaling[a]) for a, w in zip(adapters, weights) if a in layer.r],
                combination_type, rank, svd_clamp, svd_full_matrices, svd_driver,
            )
            for name, layer in layers.items()
        }
        config = dataclasses.replace(
            sources[0][1], r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
            modules_to_save=list(dict.fromkeys(m for _, c in sources for m in c.modules_to_save or [])) or None,
            **self._combined_targets([c for _, c in sources], list(layers)),
        )
        self.add_adapter(adapter_name, config)
        try:
            for name, (A, B) in factors.items():
                layers[name].set_lora_factors(adapter_name, A, B)
            for name, have in heads.items():  # a trained head comes along from the one source that has it
                if have:
                    copies = base.get_submodule(name).modules_to_save
                    copies[adapter_name].load_state_dict(copies[have[0]].state_dict())
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _combined_targets(self, configs: list[PeftConfig], layer_names: list[str]) -> dict:
        """target_modules for a combined adapter: the union of the sources' (as peft writes it) when
        that selects exactly the layers holding a source, else those layers by full name (e.g. when
        the sources' layers_to_transform differ), so that the saved config reloads where it was."""
        targets = [c.target_modules for c in configs]
        union = None
        if all(isinstance(t, list) for t in targets):
            union = sorted(set().union(*targets))
        elif all(isinstance(t, str) for t in targets):
            patterns = list(dict.fromkeys(targets))
            union = patterns[0] if len(patterns) == 1 else "|".join(f"({p})" for p in patterns)
        if union is not None:
            try:
                trial = dataclasses.replace(configs[0], target_modules=union)
                if injection.targets_of(self.get_base_model(), trial) == layer_names:
                    return {"target_modules": union}
            except ValueError:  # the union selects nothing or makes an invalid config: use the names
                pass
        return dict(target_modules=layer_names, exclude_modules=None, layers_to_transform=None, layers_pattern=None)

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

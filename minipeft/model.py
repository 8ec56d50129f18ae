"""PeftModel: a pretrained model plus named adapters, with peft's user-facing API.

The wrapped model sits at ``peft_model.base_model.model`` so that parameter names read
``base_model.model.<path>...`` exactly as in peft, and state dicts move between the two
libraries unchanged. Attributes the PeftModel does not have fall through, first to
``base_model`` (``enable_adapter_layers``, as on peft's tuner model), then to the wrapped model
(``config``, ...). ``forward`` and ``generate`` are the wrapped model's, with peft's
``adapter_names`` for mixed batches.

Tools read the forward's signature: transformers' ``Trainer`` keeps the dataset columns the
forward names and finds the labels there (``labels``, a QA model's ``start_positions``), and it
reads the wrapped model's for a peft model, which it knows by class. So a PeftModel's class is
made per wrapped-model class, ``PeftModelFor<Class>`` (``_class_for``), a subclass whose forward
carries the wrapped model's signature; it pickles as a plain PeftModel and is made again on load.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from . import checkpoint, injection, status
from .config import PeftConfig, PeftType, check_config_type, is_positive_int
from .mixed_batches import mixed_batch
from .targeting import (
    TASK_HEAD_NAMES, attention_out_projections, check_task_type, declared_embedding, logical_name, wrapper_chain,
)
from .tuners import AdapterLayer, ia3, lora_combine, lora_init, method_for, virtual_tokens
from .tuners.base import TrainedCopies, check_distinct
from .tuners.prefix_tuning import PrefixEncoder
from .tuners.quantized import stored_numel
from .tuners.trainable_tokens import TiedTokensLayer, TrainableTokensLayer


class AdaptedModel(nn.Module):
    """Holds the user's model as ``.model`` (peft's ``LoraModel`` plays this role)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rank_allocators: dict = {}  # AdaLoRA: per training adapter, its RankAllocator

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA, peft's call: after ``optimizer.step()`` and before ``optimizer.zero_grad()`` of
        training step ``global_step``, fold the step's gradients into the importance scores and
        prune the active AdaLoRA adapter's ranks on its schedule (``tuners/adalora_budget.py``)."""
        from .tuners.adalora_budget import update_and_allocate

        allocator = self.active_rank_allocator()
        if allocator is None:
            raise ValueError(
                "update_and_allocate allocates the ranks of a training AdaLoRA adapter, and none is active"
                + (f" (AdaLoRA adapters: {list(self.rank_allocators)}; activate one with set_adapter)"
                   if self.rank_allocators else
                   "; an AdaLoRA adapter loaded for inference, or with its ranks allocated already (rank_pattern), "
                   "has no allocator")
            )
        update_and_allocate(allocator, global_step)

    def active_rank_allocator(self):
        """The RankAllocator of the active AdaLoRA adapter that trains, or None."""
        return next((a for a in self.rank_allocators.values() if a.is_active()), None)

    # -- peft's record of what the adapters target ---------------------------------------------
    @property
    def targeted_module_names(self) -> list[str]:
        """The modules an adapter's ``target_modules`` chose, by their names in the model without
        wrappers, in model order (peft's attribute). Modules trained whole (``modules_to_save``)
        and helpers (LoRA's trainable tokens, the out_proj inside an attention it adapts) are not."""
        found: dict[str, None] = {}
        helpers = set(attention_out_projections(self.model))  # (LoRA's LoraLinear on an attention's out_proj)
        for name, layer in injection.adapter_layers(self.model):
            if name not in helpers and getattr(layer, "parameter_name", None) is None and self._targeted(layer):
                found[logical_name(self.model, name) or name] = None
        return list(found)

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The parameters an adapter's ``target_parameters`` chose, as ``module.parameter``, in the
        order they were added (peft's attribute; several on one module nest, the first innermost)."""
        found: dict[str, None] = {}
        for name, layer in injection.innermost_first(list(injection.adapter_layers(self.model))):
            if getattr(layer, "parameter_name", None) is not None and self._targeted(layer):
                found[f"{logical_name(self.model, name) or name}.{layer.parameter_name}"] = None
        return list(found)

    def _targeted(self, layer: AdapterLayer) -> bool:
        """Whether ``layer`` holds an adapter of its own method on a module the config chose (a
        wrapper a method adds beside its targets holds another method's, as LoRA's trainable tokens
        do, or is a follower: trainable tokens' wrappers on the modules tied to the embedding)."""
        if isinstance(layer, TiedTokensLayer):
            return False
        owner = self.__dict__.get("owner_ref", lambda: None)()
        configs = owner.peft_config if owner is not None else {}
        methods = [method_for(configs[a]) for a in layer.adapter_names if a in configs]
        return any(m.layer_class is not None and isinstance(layer, m.layer_class) for m in methods)

    # peft's tuner model (LoraModel, ...) answers these itself; here the PeftModel that holds this
    # one does (else they would reach the user's model: transformers' own adapter methods). It is
    # held by a weak reference, so that deleting the PeftModel frees the model at once (a strong
    # one would make a cycle that waits for the garbage collector), and re-attached to a copy.
    OWNER_ATTRIBUTES = frozenset({"set_adapter", "add_adapter", "delete_adapter", "active_adapter", "active_adapters",
                                  "peft_config", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload",
                                  "add_weighted_adapter"})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            owner = self.__dict__.get("owner_ref", lambda: None)()
            if name in self.OWNER_ATTRIBUTES and owner is not None:
                return getattr(owner, name)
            return getattr(self.model, name)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("owner_ref", None)  # a weak reference neither pickles nor deep-copies to the copy's owner
        return state

    def enable_adapter_layers(self) -> None:
        """Let every adapter wrapper apply its active adapters again (after ``disable_adapter_layers``)."""
        self._set_adapter_layers(enabled=True)

    def disable_adapter_layers(self) -> None:
        """Make every adapter wrapper run its base module alone until ``enable_adapter_layers()``.
        Merged adapters are unmerged first (and stay unmerged once enabled again, as in peft).
        Trained biases are base-model parameters and keep their trained values; virtual tokens
        (prompt tuning, P-tuning, prefix tuning) are not layers: ``PeftModel.disable_adapter()``
        turns off both. requires_grad is left as it is (a disabled adapter is not in the graph,
        so it gets no gradient anyway)."""
        self._set_adapter_layers(enabled=False)

    def _set_adapter_layers(self, enabled: bool) -> None:
        if not enabled:
            injection.unmerge(self.model)  # all at once, in reverse merge order: see disable_adapter
        for _, layer in injection.adapter_layers(self.model):
            layer.disable_adapters = not enabled


class PeftModel(nn.Module):
    """A base model with one or more named adapters; ``get_peft_model`` builds one."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_not_adapted(model)
        self.base_model = AdaptedModel(model)
        # The wrappers answer in the model's mode (an eval model, as from_pretrained returns one,
        # gives an eval PeftModel), as each adapter layer takes the mode of the module it replaces.
        self.training = self.base_model.training = model.training
        self._attach_base_model()
        self._take_forward_signature()
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str = adapter_name  # the first of the active adapters (peft's attribute)
        self._active: list[str] = [adapter_name]
        self.add_adapter(adapter_name, peft_config)
        self._activate([adapter_name])

    def _attach_base_model(self) -> None:
        self.base_model.__dict__["owner_ref"] = weakref.ref(self)  # see AdaptedModel.OWNER_ATTRIBUTES

    def __setstate__(self, state) -> None:  # a copy (deepcopy, pickle): its base model answers to it
        super().__setstate__(state)
        self._attach_base_model()
        self._take_forward_signature()

    def _take_forward_signature(self) -> None:
        """Become ``PeftModelFor<Class>`` of the wrapped model (module docstring); a subclass of
        PeftModel that someone wrote keeps its own class."""
        if type(self) is PeftModel:
            self.__class__ = _class_for(type(self.get_base_model()))

    def __reduce_ex__(self, protocol):
        # Pickled as a plain PeftModel (a made class has no importable name): __setstate__ makes it again.
        reduced = super().__reduce_ex__(protocol)
        made_here = type(self) is not PeftModel and type(self) is _class_for(type(self.get_base_model()))
        return (_new_peft_model, (), *reduced[2:]) if made_here else reduced

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError:  # (said of the PeftModel: the wrapped model's class alone would mislead)
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}, and neither has the model it "
                                 f"wraps ({type(self.get_base_model()).__name__})") from None

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the (first) active adapter (peft's property)."""
        return self.peft_config[self.active_adapter]

    @property
    def peft_type(self) -> PeftType:
        """The method of the (first) active adapter (peft's attribute: its one method's)."""
        return self.active_peft_config.peft_type

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules some adapter trains whole, task heads included; None when none does (peft's property)."""
        names = {n for config in self.peft_config.values() for n in getattr(config, "modules_to_save", None) or []}
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        """The wrapped model's ``dtype`` (a transformers model's attribute), else None (peft's attribute)."""
        return getattr(self.get_base_model(), "dtype", None)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward, with the active adapter; ``adapter_names``: a mixed batch, one
        adapter name per sample (``minipeft/mixed_batches.py``)."""
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.with_training_terms(self.base_model(*args, **kwargs))

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's ``generate``; ``adapter_names`` as in ``forward``, one per prompt."""
        with self._mixed_batch(adapter_names, args, kwargs, follows_repeats=True):
            return self.get_base_model().generate(*args, **kwargs)

    def _mixed_batch(self, adapter_names: list[str] | None, args: tuple, kwargs: dict, follows_repeats: bool = False):
        if adapter_names is None:
            return contextlib.nullcontext()
        # One name per sample, checked here where the batch is plain to see (as peft does); a
        # layer would only see rows (beams, flattened tokens) and fail deep inside the model.
        first = next((t for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1])
                      if isinstance(t, torch.Tensor)), None)
        named = isinstance(adapter_names, (list, tuple)) and adapter_names  # (other mistakes: mixed_batch's errors)
        if named and first is not None and first.dim() > 1 and len(adapter_names) != first.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {first.shape[0]} samples: "
                             'give one per sample ("__base__" for the base model)')
        return mixed_batch(self.get_base_model(), adapter_names, follows_repeats)

    def with_training_terms(self, outputs):
        """``outputs`` with what the active adapters' methods add to the loss they carry, if any
        (AdaLoRA's orthogonal regulariser, while training). A training loop that computes its own
        loss from the logits passes it in as ``SimpleNamespace(loss=loss)``."""
        for name in self.active_adapters:
            on_output = method_for(self.peft_config[name]).on_output
            if on_output is not None:
                outputs = on_output(self, name, self.peft_config[name], outputs)
        return outputs

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- adapters by name ---------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        # [] once the last adapter is deleted (active_adapter still names it then, as in peft).
        return [name for name in self._active if name in self.peft_config]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter; it becomes active only when it is the first one (as in peft).
        ``low_cpu_mem_usage`` and ``autocast_adapter_dtype`` as in ``get_peft_model``."""
        _check_load_options(None, autocast_adapter_dtype, self.get_base_model())
        check_config_type(peft_config)
        self._check_new_name(adapter_name)
        check_task_type(self.get_base_model(), peft_config)
        config = copy.deepcopy(peft_config)
        heads = TASK_HEAD_NAMES.get(config.task_type, ())  # (a TaskType is its string value)
        if heads and hasattr(config, "modules_to_save"):
            # Classification and answer-span heads are new: they must train and be saved with the adapter.
            extra = [n for n in heads if n not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + extra
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.get_base_model(), "config", None), "name_or_path", None) or None
        first = not self.peft_config
        # What trains stays as it was (set_requires_grad may have chosen otherwise than
        # activating does); the new adapter's parameters start as activating sets them.
        with self._requires_grad_kept():
            if config.is_prompt_learning:
                # Virtual tokens live beside the model (self.prompt_encoder) and reach it through hooks.
                method_for(config).attach(self, adapter_name, config)
                # In the model's mode, as adapter layers are (P-tuning's MLP has dropout).
                self.prompt_encoder.training = self.get_base_model().training
                self.prompt_encoder[adapter_name].train(self.get_base_model().training)
            else:
                self._warn_base_changing_init(adapter_name, config)
                injection.inject_adapter_in_model(config, self.get_base_model(), adapter_name, activate=first)
            self.peft_config[adapter_name] = config
            if method_for(config).after_add is not None:
                method_for(config).after_add(self, adapter_name, config)
            if first:  # (also after the last adapter was deleted: the name active then is gone)
                self.active_adapter, self._active = adapter_name, [adapter_name]
            else:
                self._activate(self.active_adapters)  # also in the new wrappers

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter in every layer, or several (a list, as peft's tuner model takes:
        each layer adds their terms in turn); only they train, unless ``inference_mode`` or loaded
        for inference (``from_pretrained`` / ``load_adapter`` without ``is_trainable=True``; peft's
        set_adapter makes such an adapter trainable again, minipeft keeps it frozen). Merged
        adapters are unmerged first, with a warning, as in peft: else they would stay in the
        weights under the new one."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_several_active(names)
        if any(layer.merged for _, layer in injection.adapter_layers(self.get_base_model())):
            warnings.warn(f"adapters are merged into the weights; unmerging them before activating {adapter_name!r}",
                          stacklevel=2)
            injection.unmerge(self.get_base_model())
        loaded_frozen = [n for n in names if self.peft_config[n].inference_mode and not inference_mode]
        if loaded_frozen and self.training:  # (in eval mode it is inference: nothing to say)
            warnings.warn(f"adapter(s) {loaded_frozen} were loaded for inference and stay frozen (peft's set_adapter "
                          "would make them trainable); to train them, load them with is_trainable=True or call "
                          f"set_requires_grad({loaded_frozen!r})", stacklevel=2)
        self._activate(names, inference_mode)

    def _check_several_active(self, names: list[str]) -> None:
        """Adapters that can be active together: known and distinct, and, when several, none of
        them virtual tokens (one prompt at a time) and no two with trained copies of one module
        (modules_to_save: a forward runs one copy)."""
        if not names:
            raise ValueError(f"name at least one adapter to activate; the model has {list(self.peft_config)}")
        self._check_known(names[0] if len(names) == 1 else names, "activate")
        check_distinct(names)
        if len(names) == 1:
            return
        prompt = [n for n in names if self.peft_config[n].is_prompt_learning]
        if prompt:
            raise ValueError(f"adapter(s) {prompt} add virtual tokens, which take the model one adapter at a time; "
                             f"activate them alone, not together with {[n for n in names if n not in prompt]}")
        allocating = [n for n in names if n in self.base_model.rank_allocators]
        if len(allocating) > 1:  # (peft refuses them too)
            raise ValueError(f"AdaLoRA adapters {allocating} would each allocate ranks over the same steps, and one "
                             "allocation runs per step: train one at a time (or load the others for inference)")
        for layer_name, layer in injection.adapter_layers(self.get_base_model()):
            both = [n for n in names if isinstance(layer, TrainedCopies) and n in layer.adapter_names]
            if len(both) > 1:
                raise ValueError(f"adapters {both} each train a whole copy of {layer_name!r} (modules_to_save), and a "
                                 "forward runs one copy: activate one of them at a time")

    @contextlib.contextmanager
    def _requires_grad_kept(self) -> Iterator[None]:
        """The adapters' parameters that exist before the block (what set_requires_grad sets) have
        their requires_grad back after it."""
        layers = [layer for _, layer in injection.adapter_layers(self.get_base_model())]
        params = [p for layer in layers for a in layer.adapter_names for p in layer.adapter_parameters(a)]
        before = [(p, p.requires_grad) for p in params]
        yield
        for p, requires_grad in before:
            p.requires_grad_(requires_grad)

    def _activate(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """set_adapter's work, without its checks."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        frozen = [n for n in names if inference_mode or self.peft_config[n].inference_mode]
        base = self.get_base_model()
        # Trained biases are base-model parameters, shared by all adapters: whatever the method
        # of the new adapters, those the others train stop first (the new ones' may start again).
        for name, other in self.peft_config.items():
            if name not in names:
                injection.set_biases_trainable(base, other, name, trainable=False)
        if self.peft_config[names[0]].is_prompt_learning:  # (alone: _check_several_active)
            virtual_tokens.set_active(self, names[0], trainable=names[0] not in frozen)
        else:
            if "prompt_encoder" in self._modules:
                self.prompt_encoder.set_adapter(names[0])  # no virtual tokens while a layer adapter runs
            injection.set_adapter(base, names, trainable=True)
            for _, layer in injection.adapter_layers(base):
                for name in frozen:
                    for p in layer.adapter_parameters(name):
                        p.requires_grad_(False)
            for name in names:
                if name not in frozen:
                    injection.set_biases_trainable(base, self.peft_config[name], name)
        self.active_adapter, self._active = names[0], names

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for the parameters of ``adapter_names`` in every layer, active
        or not (peft's method): e.g. to train two adapters at once, or freeze the active one.
        Not for prompt learning, whose one adapter is its prompt encoder (as in peft)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names, "set requires_grad on")
        for name in names:
            if self.peft_config[name].is_prompt_learning:
                raise TypeError(f"adapter {name!r} is {self.peft_config[name].peft_type.value}: set_requires_grad "
                                "is for adapters in layers; freeze a prompt encoder through its parameters")
        base = self.get_base_model()
        for _, layer in injection.adapter_layers(base):
            for name in names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        self._check_known(adapter_name, "delete")
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
        self.base_model.rank_allocators.pop(adapter_name, None)
        for p in biases:
            p.requires_grad_(False)
        if self.active_adapters:
            # Other adapters stay active: re-activated, as a bias both trained is trainable
            # again, with what trains as it was (set_requires_grad may have chosen otherwise).
            with self._requires_grad_kept():
                self._activate(self.active_adapters)
        elif self.peft_config:
            self._activate(next(iter(self.peft_config)))  # the first remaining one, as peft

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block: no adapter layer, no virtual tokens.

        Merged adapters are unmerged as the block starts and stay unmerged after it (as in peft).
        All at once, in the reverse of the merge order: two layers may write one weight (trainable
        tokens on an embedding, LoRA on the head tied to it), and each unmerging itself at its
        next forward would go in forward order and leave that weight wrong."""
        injection.unmerge(self.get_base_model())
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

    def _warn_base_changing_init(self, adapter_name: str, config: PeftConfig) -> None:
        """PiSSA / OLoRA / LoftQ rewrite each target's base weight as the adapter is added there
        (after injection has checked every target). Beside other adapters, peft's warning: they
        all see the new weights."""
        changing = [n for n, c in self.peft_config.items() if _changes_base_weights(c)]
        changing += [adapter_name] if _changes_base_weights(config) else []
        if changing and self.peft_config:
            warnings.warn(
                f"adapter(s) {changing} (PiSSA/OLoRA/LoftQ) replaced the base weights they adapt (by residuals "
                f"W - s B0 A0, or LoftQ's quantized W), and adapter {adapter_name!r} joins {list(self.peft_config)}: "
                "every adapter on those layers then works on the new weights, and disabling or deleting such an "
                "adapter does not give W back. Convert a PiSSA/OLoRA adapter to plain LoRA to combine it with "
                "others: save_pretrained(folder, path_initial_model_for_weight_conversion=<its initial adapter>)",
                stacklevel=3,
            )

    def _check_new_name(self, adapter_name: str) -> None:
        """A ValueError when ``adapter_name`` cannot name an adapter or names one that exists."""
        injection.check_new_adapter_name(adapter_name, self.peft_config)

    def _check_known(self, names: str | list[str], action: str) -> None:
        """A ValueError when one of ``names`` (one name, or a list) is not an adapter of this model."""
        unknown = [n for n in ([names] if isinstance(names, str) else names) if n not in self.peft_config]
        if unknown:
            which = f"adapter {unknown[0]!r}" if isinstance(names, str) else f"adapter(s) {unknown}"
            raise ValueError(f"cannot {action} unknown {which}; the model has {list(self.peft_config)}")

    # -- merging ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights (undo with ``unmerge_adapter``).

        ``safe_merge``: merge into copies first and raise a ValueError naming the adapter and the
        layer if any weight would hold NaN or inf. Every layer is checked before any is written,
        so a failed merge leaves the model as it was.
        """
        disabled = [name for name, layer in injection.adapter_layers(self.get_base_model()) if layer.disable_adapters]
        if disabled:
            # A disabled layer unmerges itself at its next forward, in forward order, which two
            # layers writing one weight (a tied head) must not do: merge after the block.
            raise ValueError(f"adapter layers are disabled ({disabled[:3]}{' ...' if len(disabled) > 3 else ''}: "
                             "inside disable_adapter() or after disable_adapter_layers()); merge outside the block, "
                             "or after enable_adapter_layers()")
        for _, layer, here in self._merge_plan(adapter_names, safe_merge, unloading=False):
            layer.merge(here)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter out of the base weights again, newest first (``injection.unmerge``)."""
        injection.unmerge(self.get_base_model())

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The base model with the active (or given) adapters folded in and no minipeft module left.

        ``adapter_names`` merges several adapters at once: ``W + sum_i s_i B_i A_i``. A module
        trained whole (``modules_to_save``) comes back as the copy of the adapter being merged.
        ``safe_merge`` as in ``merge_adapter``: on failure the PeftModel is left as it was.
        ``progressbar`` is accepted for peft's signature and ignored (merging takes no time to watch).
        """
        self._merge_plan(adapter_names, safe_merge, unloading=True)  # every check (virtual tokens refused); unload merges
        self._check_one_trained_copy(self.active_adapters if adapter_names is None else adapter_names)
        if "prompt_encoder" in self._modules:  # other adapters' virtual tokens: dropped, as unmerged adapters are
            self.prompt_encoder.remove_hooks()
        return self._forget_adapters(injection.unload(self.get_base_model(), merge=True, adapter_names=adapter_names))

    def unload(self) -> nn.Module:
        """The base model with every adapter removed, unmerged. A module trained whole
        (``modules_to_save``) comes back as the active adapter's trained copy, as in peft; the
        original is the one ``disable_adapter()`` runs."""
        if "prompt_encoder" in self._modules:
            self.prompt_encoder.remove_hooks()
        return self._forget_adapters(injection.unload(self.get_base_model(), merge=False))

    def _forget_adapters(self, model: nn.Module) -> nn.Module:
        """After unloading: this PeftModel holds no adapter any more (an adapter added next is the
        first one again, into the same model), and ``model`` is returned."""
        self.peft_config.clear()
        self.base_model.rank_allocators.clear()
        if "prompt_encoder" in self._modules:
            del self._modules["prompt_encoder"]
        return model

    def _merge_plan(
        self, adapter_names: list[str] | None, safe_merge: bool, unloading: bool
    ) -> list[tuple[str, AdapterLayer, list[str]]]:
        """``(layer name, wrapper, adapters to merge there)`` for every wrapper that holds one of
        ``adapter_names`` (default: the active adapter). Checks all that can fail before anything
        is merged: unknown or repeated names, adapters that are not linear maps of a weight,
        layers an adapter cannot be folded into (``merge_blocker``) and, with ``safe_merge``,
        weights that would hold NaN or inf. Adapters merged already stay as they are (merging
        again would add them twice), with a warning unless ``unloading``, as in peft."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names is a list of names, got the string {adapter_names!r}")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self._check_known(names, "merge")
        check_distinct(names)
        prompt = [n for n in names if self.peft_config[n].is_prompt_learning]
        if prompt:
            raise TypeError(f"adapter(s) {prompt} add virtual tokens, which are not weights and cannot be merged")
        plan, merged = [], set()
        for layer_name, layer in injection.innermost_first(list(injection.adapter_layers(self.get_base_model()))):
            here = [n for n in names if n in layer.adapter_names]
            merged |= {n for n in here if n in layer.merged_adapters}
            here = [n for n in here if n not in layer.merged_adapters]
            if here:
                plan.append((layer_name, layer, here))
        if merged and not unloading:
            warnings.warn(f"adapter(s) {sorted(merged)} are merged already and stay as they are (merging again would "
                          "add them twice); unmerge_adapter() first to merge them anew", stacklevel=3)
        blocking = sorted({type(layer).__name__ for _, layer, _ in plan if not layer.mergeable})
        if blocking:
            raise TypeError(
                f"cannot merge adapter(s) {names}: {blocking} adapters are not linear maps of a weight, so they "
                "cannot be merged; call unload() to remove them without merging"
            )
        for layer_name, layer, here in plan:
            layer.check_merge_blockers(here, layer_name, unloading=unloading)
        self._check_nested_merges(plan)
        self._warn_tied_merges(plan)
        if safe_merge:
            for layer_name, layer, here in plan:
                layer.check_merge_is_finite(here, layer_name)
        return plan

    @staticmethod
    def _check_nested_merges(plan: list[tuple[str, AdapterLayer, list[str]]]) -> None:
        """A wrapper's merge writes the weight that the wrappers inside it hold too. Unless every
        merge involved only adds an update (``merge_is_addition``), the adapters those inner
        wrappers still apply must be merged first: an outer OFT merged over an unmerged inner LoRA
        would rotate a weight that LoRA then adds to, which the unmerged model never computes."""
        merging = {id(layer): here for _, layer, here in plan}
        for layer_name, layer, here in plan:
            if isinstance(layer, TrainableTokensLayer):
                layer.check_disjoint_merges(merging)  # (nested on one embedding: no token written twice)
            if not layer.folds_into_weight:  # it writes nothing here (a tied head: the embedding writes)
                continue
            for inner in wrapper_chain(getattr(layer, layer.base_layer_name)):
                if not isinstance(inner, AdapterLayer) or not inner.folds_into_weight:
                    continue  # (a TrainableTokensWrapper only holds the layer below it)
                pending = [a for a in inner.adapters_to_apply() if a not in merging.get(id(inner), [])]
                additive = all(layer.merge_is_addition(a) for a in here) and \
                    all(inner.merge_is_addition(a) for a in pending)
                if pending and not additive:
                    raise ValueError(
                        f"cannot merge adapter(s) {here} into {layer_name!r}, so nothing was merged: the "
                        f"{type(inner).__name__} inside it applies adapter(s) {pending} unmerged, and these merges do "
                        "not commute. Merge those too (in the same call, or first)"
                    )

    def _warn_tied_merges(self, plan: list[tuple[str, AdapterLayer, list[str]]]) -> None:
        """Warn (as peft does) where a merge writes a weight another module shares (a tied LM head
        and its embedding): merged, both modules change; unmerged, only the adapted one did. The
        trainable-tokens layers are exempt: writing the shared table is how their rows reach both."""
        base = self.get_base_model()
        sharers: dict[int, list[str]] = {}
        for name, module in base.named_modules():
            weight = module._parameters.get("weight")
            if weight is not None:
                sharers.setdefault(id(weight), []).append(name)
        for layer_name, layer, here in plan:
            weight = getattr(layer.get_base_layer(), "weight", None)
            if not layer.folds_into_weight or isinstance(layer, TrainableTokensLayer) or weight is None:
                continue
            others = [n for n in sharers.get(id(weight), []) if not n.startswith(layer_name + ".")]
            if others:
                warnings.warn(f"merging adapter(s) {here} into {layer_name!r} writes the weight it shares with "
                              f"{others}: the merged model changes that module too, where the unmerged adapter "
                              "changed only this one", stacklevel=4)

    def _check_one_trained_copy(self, adapter_names: list[str]) -> None:
        """A ValueError when two of ``adapter_names`` each train their own copy of a module
        (``modules_to_save``, LN tuning): merge_and_unload puts back a single copy."""
        for name, layer in injection.adapter_layers(self.get_base_model()):
            if isinstance(layer, TrainedCopies):
                layer.copy_of(adapter_names, name)

    # -- combining LoRA adapters (the work is in tuners/lora_combine.py) ------------------------
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
        """Add LoRA adapter ``adapter_name`` whose update combines the updates ``s_i B_i A_i`` of
        ``adapters`` with ``weights`` (which may be negative), per layer; added inactive and frozen
        like any second adapter (``set_adapter(adapter_name)`` to use it). The combination types
        and their options are described in ``tuners/lora_combine.py``.

        (IA)^3 adapters combine too, as in peft: the new vectors are ``sum_i w_i l_i`` (``ia3.py``,
        ``set_combined_vectors``); the options of the LoRA combinations do not apply to them.
        """
        if isinstance(adapters, str):
            raise TypeError(f"adapters is a list of names, got the string {adapters!r}")
        self._check_new_name(adapter_name)
        self._check_known(adapters, "combine")
        lora_combine.check_weights(adapters, weights)
        sources = [(name, self.peft_config[name]) for name in adapters]
        if sources and all(config.peft_type == PeftType.IA3 for _, config in sources):
            lora_options = {"svd_rank": (svd_rank, None), "svd_clamp": (svd_clamp, None),
                            "svd_full_matrices": (svd_full_matrices, True), "svd_driver": (svd_driver, None),
                            "density": (density, None), "majority_sign_method": (majority_sign_method, "total")}
            given = [name for name, (value, default) in lora_options.items() if value != default]
            if combination_type not in ("svd", "linear") or given:  # "svd": the default, i.e. not chosen
                raise ValueError(f"(IA)^3 adapters combine linearly, sum_i w_i l_i, with no other option; got "
                                 f"combination_type={combination_type!r}" + (f" and {given}" if given else ""))
            ia3.add_weighted_adapter(self, list(adapters), list(weights), adapter_name)
            return
        self.peft_config[adapter_name] = lora_combine.add_weighted_adapter(
            self.get_base_model(), sources, weights, adapter_name, combination_type=combination_type,
            svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
            density=density, majority_sign_method=majority_sign_method,
        )

    # -- parameters ---------------------------------------------------------------------------
    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The one tensor a virtual-token adapter's checkpoint holds, on the CPU (peft's method):
        the prompt (n, d) of prompt tuning and P-tuning (the network's output, as in eval mode),
        or prefix tuning's keys and values of every layer (n, layers * 2 * d)."""
        self._check_known(adapter_name, "get the prompt of")
        if not self.peft_config[adapter_name].is_prompt_learning:
            raise TypeError(f"adapter {adapter_name!r} is {self.peft_config[adapter_name].peft_type.value}, which adds "
                            "no virtual tokens; its tensors are in get_peft_model_state_dict(model, adapter_name=...)")
        return self.prompt_encoder[adapter_name].prompt_embeddings().detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None):
        """The active adapter's virtual tokens for a batch (peft's method), as the forward uses them:
        prompt tuning and P-tuning give the prompt ``(B, n, d)`` (``2n`` rows on an encoder-decoder
        model, of which the encoder gets the first ``n``); prefix tuning gives each adapted layer's
        ``(key, value)``, each ``(B, heads, n, head_dim)`` in the model's dtype (peft wraps these
        in a transformers cache; minipeft, which never imports transformers, returns the tuple)."""
        if task_ids is not None:
            raise ValueError("task_ids are for multitask prompt tuning, which minipeft does not implement; leave it None")
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not self.active_peft_config.is_prompt_learning:
            raise TypeError(f"adapter {self.active_adapter!r} is {self.active_peft_config.peft_type.value}, which adds "
                            "no virtual tokens; get_prompt is for prompt tuning, P-tuning and prefix tuning")
        encoder = self.prompt_encoder[self.active_adapter]
        if isinstance(encoder, PrefixEncoder):
            return encoder.virtual_tokens(batch_size, next(self.get_base_model().parameters()).dtype)
        return encoder.virtual_tokens(batch_size)

    @property
    def word_embeddings(self) -> nn.Module:
        """The base model's token embedding (peft's attribute of prompt-learning models): the
        module whose output virtual tokens are put beside."""
        encoder = self._modules["prompt_encoder"]._modules.get(self.active_adapter) if "prompt_encoder" in self._modules \
            else None
        found = getattr(encoder, "word_embeddings", None)  # prompt tuning's input_embeddings_name, if set
        found = declared_embedding(self.get_base_model(), "input") if found is None else found
        if found is None:
            raise AttributeError(f"{type(self.get_base_model()).__name__} names no input embeddings "
                                 "(get_input_embeddings())")
        return found

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += stored_numel(p)  # (a 4-bit weight holds two weights per byte)
            trainable += stored_numel(p) if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """Each adapter layer's state (active, merged, enabled, training): ``minipeft.status``."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """The adapter layers' states summed up, "irregular" where they disagree: ``minipeft.status``."""
        return status.get_model_status(self)

    # -- checkpoints (peft's layout and signatures; the work is in checkpoint.py, the checks of
    #    peft's arguments in the shims at the end of this file) --------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors for each of ``selected_adapters``
        (default: all): ``default`` in ``save_directory``, any other in ``save_directory/<name>/``.

        ``path_initial_model_for_weight_conversion``: the folder a PiSSA/OLoRA adapter was saved to
        right after initialisation, before training. The adapter is then saved as the plain LoRA
        adapter (rank 2r, same scaling, ``init_lora_weights=True``) that computes the same on the
        ORIGINAL base weights (``lora_init.py`` has the math), which peft and minipeft load onto
        the unchanged base model. One adapter at a time (``selected_adapters=[name]`` when the
        model holds several); the initial folder is only read.

        ``is_main_process=False`` (the other processes of a distributed run) checks the arguments
        and writes nothing. minipeft saves the adapter's own tensors only, in safetensors, so it
        refuses peft's options for more: ``safe_serialization=False`` (a pickle) and
        ``save_embedding_layers=True`` (base-model embeddings; ``"auto"`` saves none).
        """
        _check_save_options(safe_serialization, save_embedding_layers, path_initial_model_for_weight_conversion)
        initial = path_initial_model_for_weight_conversion
        checkpoint.save_pretrained(
            self, save_directory, selected_adapters, None if initial is None else os.fspath(initial), is_main_process
        )

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> None:
        """Add an adapter from a checkpoint folder (inactive; frozen unless ``is_trainable``, and
        then trainable at once, as in peft). Into an adapter that exists already, the checkpoint's
        tensors are loaded, as in peft (its config must be the adapter's).

        ``subfolder``: the checkpoint is in ``model_id/subfolder``. ``torch_device``,
        ``autocast_adapter_dtype``, ``low_cpu_mem_usage`` and ``revision`` as in ``from_pretrained``.
        """
        _check_flags(is_trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage)
        _check_load_options(torch_device, autocast_adapter_dtype, self.get_base_model())
        checkpoint.load_adapter(self, _checkpoint_folder(model_id, subfolder), adapter_name, is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        torch_device: str | torch.device | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in folder ``model_id`` (frozen unless ``is_trainable``).

        config: use a copy of this config instead of the saved one (the folder's
            adapter_config.json is still read and checked against its tensors).
        subfolder: the checkpoint is in ``model_id/subfolder`` (local folders only: minipeft
            does not download).
        torch_device: where peft stages the tensors while loading; the adapter ends up beside
            the base weights either way, so minipeft only checks that it names a device.
        autocast_adapter_dtype: True is what minipeft always does (fp32 adapters on a
            half-precision base); False is refused there, and changes nothing on a float32 one.
        low_cpu_mem_usage: accepted and ignored (peft's meta-device initialisation).
        revision: the Hub revision peft downloads; a local folder has none, so it is ignored, as
            peft ignores it for one.
        """
        _check_base_model_argument(model, "PeftModel.from_pretrained(model, model_id)")
        _check_flags(is_trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage)
        _check_load_options(torch_device, autocast_adapter_dtype, model)
        if config is not None:
            check_config_type(config)
        return checkpoint.from_pretrained(
            cls, model, _checkpoint_folder(model_id, subfolder), adapter_name, is_trainable, config
        )


def _changes_base_weights(config: PeftConfig) -> bool:
    """Whether adding an adapter with ``config`` rewrites base weights (LoRA with PiSSA / OLoRA / LoftQ)."""
    return lora_init.base_changing_init(getattr(config, "init_lora_weights", None)) is not None


def _check_base_model_argument(model: object, call: str) -> None:
    """A TypeError unless ``model`` is an nn.Module, saying what came instead: arguments swapped,
    or a model's name or path where the model itself goes."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, PeftConfig):
        hint = "the config came first: the model goes first"
    elif isinstance(model, (str, os.PathLike)):
        hint = ("a name or path came instead: load the base model first (e.g. transformers' "
                "AutoModelForCausalLM.from_pretrained(path)) and pass the model itself")
    else:
        hint = f"got a {type(model).__name__}"
    raise TypeError(f"{call} takes the base model (a torch.nn.Module) first; {hint}")


def _check_not_adapted(model: nn.Module) -> None:
    """A PeftModel starts from a model without minipeft adapters: a second PeftModel around the
    same wrappers would not know their configs, so saving, switching and merging would miss them."""
    held = list(model.peft_config) if isinstance(model, PeftModel) else injection.known_adapter_names(model)
    if isinstance(model, PeftModel) or held:
        raise ValueError(
            f"this model already holds minipeft adapter(s) {held}. To add one, call add_adapter(name, config) on the "
            "PeftModel that holds them, or load_adapter(folder, name) for a saved one (on a model adapted in place: "
            "inject_adapter_in_model(config, model, name)); to start again from the plain model, take it from "
            "unload() or merge_and_unload()"
        )


def _new_peft_model() -> PeftModel:
    """An empty PeftModel for unpickling (``PeftModel.__reduce_ex__``), its state set after."""
    return PeftModel.__new__(PeftModel)


@functools.cache
def _class_for(model_class: type) -> type:
    """``PeftModelFor<model_class>``: a PeftModel whose forward has ``model_class.forward``'s
    signature plus ``adapter_names`` (module docstring); PeftModel itself when it has none."""
    try:
        wrapped = inspect.signature(model_class.forward)  # (self, input_ids=None, ..., labels=None, ...)
    except (TypeError, ValueError):
        return PeftModel
    parameters = [p for p in wrapped.parameters.values() if p.name != "adapter_names"]
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    var_keyword = [i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD]
    parameters.insert(var_keyword[0] if var_keyword else len(parameters), extra)

    def forward(self, *args, **kwargs):
        return PeftModel.forward(self, *args, **kwargs)

    forward.__doc__ = PeftModel.forward.__doc__
    forward.__signature__ = wrapped.replace(parameters=parameters)
    name = f"PeftModelFor{model_class.__name__}"
    return type(name, (PeftModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; only the adapter trains.

    peft's other arguments: ``mixed`` changes nothing (a minipeft PeftModel holds adapters of
    different methods side by side anyway); ``revision``, the base model's revision, is recorded
    in the adapter's config (the caller's config object is left as it was); ``low_cpu_mem_usage``
    changes nothing (adapters are small and built where they live); ``autocast_adapter_dtype=False``
    is refused on a half-precision base, as in ``from_pretrained``.
    """
    _check_base_model_argument(model, "get_peft_model(model, peft_config)")
    _check_load_options(None, autocast_adapter_dtype, model)
    if revision is not None:
        peft_config = copy.copy(peft_config)
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name)


# -- peft-signature shims ---------------------------------------------------------------------
# get_peft_model and the save/load methods above take peft's arguments so that peft code runs
# unchanged; some name features minipeft leaves out (pickles, base-model embeddings, a staging
# device). These functions say what each argument can mean here and refuse the rest.
def _check_save_options(
    safe_serialization: bool,
    save_embedding_layers: str | bool,
    path_initial_model_for_weight_conversion: str | os.PathLike | None,
) -> None:
    """The saving options of peft's ``save_pretrained`` that minipeft cannot honour, refused (and the
    conversion folder checked to be a path)."""
    if not safe_serialization:
        raise ValueError(
            "minipeft writes adapter_model.safetensors only, never a pickled adapter_model.bin (loading a pickle "
            "can run arbitrary code); leave safe_serialization=True: peft loads the safetensors file as well"
        )
    if save_embedding_layers not in ("auto", False):
        raise ValueError(
            f"save_embedding_layers={save_embedding_layers!r}: minipeft saves the adapter's tensors only, never "
            "base-model layers; save a resized embedding with the base model itself (use 'auto' or False here)"
        )
    if path_initial_model_for_weight_conversion is not None and not isinstance(
        path_initial_model_for_weight_conversion, (str, os.PathLike)
    ):
        raise TypeError(
            "path_initial_model_for_weight_conversion is the folder of the adapter as saved right after its "
            f"PiSSA/OLoRA initialisation, a path; got {type(path_initial_model_for_weight_conversion).__name__}"
        )


def _check_flags(**flags) -> None:
    """A ValueError for an option that is not True or False (the string "False" would read as true)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_load_options(torch_device, autocast_adapter_dtype: bool, model: nn.Module) -> None:
    """The loading options minipeft accepts from peft's signatures, checked for what they can mean here."""
    _check_flags(autocast_adapter_dtype=autocast_adapter_dtype)
    if torch_device is not None:
        try:
            torch.device(torch_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"torch_device={torch_device!r} is not a device ({err}); e.g. 'cpu', 'cuda:0'") from None
    half = [] if autocast_adapter_dtype else sorted(
        {str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        raise ValueError(
            f"autocast_adapter_dtype=False would keep adapters in the base's {', '.join(half)}; minipeft always "
            "keeps them in float32 there (stable training). Leave it True"
        )


def _checkpoint_folder(model_id: str | os.PathLike, subfolder: str | None) -> str:
    """peft's ``model_id`` + ``subfolder``: the local folder holding the checkpoint."""
    return os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)

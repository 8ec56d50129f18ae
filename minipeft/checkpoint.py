"""Adapter checkpoints in peft's on-disk layout: safetensors only, atomic writes, strict loads.

A checkpoint is a folder with two files, exactly as ``peft`` writes them:

* ``adapter_config.json``: the adapter's config (``PeftConfig.to_dict``), ``inference_mode`` true.
* ``adapter_model.safetensors``: the adapter's tensors, never the frozen base model.
  Adapters other than ``default`` go to ``<folder>/<adapter_name>/``.

Which tensors belong to adapter X (the rule every method relies on)
-------------------------------------------------------------------
Every ``AdapterLayer`` lists in ``adapter_layer_names`` its containers keyed by adapter name.
A state-dict entry belongs to adapter X when its dotted name is ``<module>.<container>.X`` or
starts with ``<module>.<container>.X.``, for a container that module lists. Nothing else is
saved, except the biases a config trains on purpose (``bias="all"`` / ``"lora_only"``, as peft;
under ``bias="all"`` also the two extra spellings peft writes for a head trained whole, see
``peft_bias_extras``) and the virtual tokens of prompt tuning, P-tuning and prefix tuning, which
are no layer's containers and are saved as one computed tensor (below).

On disk the adapter name is removed (it is chosen again at load time):

    base_model.model.<path>.lora_A.default.weight  ->  base_model.model.<path>.lora_A.weight
    base_model.model.<path>.lora_embedding_A.default  ->  base_model.model.<path>.lora_embedding_A

with the two spellings peft 0.21 uses for special containers:

    <path>.modules_to_save.X.<rest>          ->  <path>.<rest>   (the copy under the module's own name)
    <path>.lora_magnitude_vector.X.weight    ->  <path>.lora_magnitude_vector   (DoRA)

Module paths are written as in a model holding that one adapter alone: when another adapter's
wrapper sits around this one (LoRA on ``value``, then (IA)^3 on ``value`` too), its
``base_layer`` segment is dropped, so ``value.base_layer.lora_A.default.weight`` is saved as
``value.lora_A.weight``. That is the only layout peft has (it cannot put two methods on one
module), and the file loads into any model, stacked or not. The adapter's own wrappers keep
their segment, as in peft: ``bias="all"`` saves ``value.base_layer.bias``.

A module whose layout differs may define ``checkpoint_key(container, rest, adapter_name)``
returning the on-disk key relative to itself, or None for a tensor the file leaves out (trainable
tokens: a tied head's view of rows another layer saves). State a method keeps for the whole adapter
rather than per module, held by several modules at once (VeRA's random pair), is named by
``shared_checkpoint_key(container, rest, adapter_name)``: a key under peft's tuner model,
``base_model.<key>`` (in a plain model ``<key>``); the one tensor is saved once, however many
modules hold it. Prompt tuning, P-tuning and prefix tuning (``prompt_encoder[X]`` on the
``PeftModel``, found by ``_virtual_tokens``) are saved as peft saves them: one computed tensor,
``prompt_embeddings``, which the encoder produces and takes back (``tuners/virtual_tokens.py``). Loading applies the
same mapping to the model's own keys and inverts it, so the two directions cannot drift apart.

Embedding layers in peft's files
--------------------------------
peft's ``save_embedding_layers`` (by default: when LoRA targets ``embed_tokens`` / ``lm_head``, or
the vocabulary was resized) also writes the tensors of the input and output embedding layers, e.g.
the frozen table as ``<layer>.base_layer.weight``, and peft's loader copies them back into the
model. minipeft reads them the same way (``peft_embedding_extras``): a base table goes into the
base model (a warning says so when that changes it; a resized one needs the base resized first,
and a shape mismatch says so), a second copy of an adapter tensor must equal the first. Any other
key still fails the load. minipeft itself saves the adapter's tensors only (peft loads those files
all the same), so ``save_embedding_layers=True`` is refused on saving.

A mixture of experts saved under transformers 4
-----------------------------------------------
Such a file holds a LoRA pair per expert (``experts.<e>.gate_proj.lora_A.weight``, ...), where
transformers 5 holds the experts as fused parameters. Before the keys are checked it is fused,
as peft fuses it, into the pairs the adapter has there (``tuners/fused_experts.py``).

Safety
------
* Tensors are read with safetensors only; a pickled ``adapter_model.bin`` is refused.
* Saving writes both files under temporary names in the target folder (flushed and fsynced),
  then renames the tensors into place, then the config. A failure before the renames leaves the
  previous checkpoint untouched. The tensor file records the config written with it (safetensors
  metadata, which peft ignores), so a crash *between* the two renames (new tensors, old config)
  is caught on load, naming the fields that differ, instead of silently pairing mismatched files.
  Fields that do not change the math (``base_model_name_or_path``, ...) may still be edited by hand.
* Loading validates everything (config fields and types, keys, shapes) before it changes the
  model, and removes the adapter again if anything fails after it was injected.

``write_adapters`` is that writer for any configs and tensors: a PiSSA/OLoRA adapter converted to
plain LoRA on save (``PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion=)``,
the math in ``tuners/lora_init.py``) is written by it, as atomically as any other adapter.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import typing
import warnings
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys  # what load_state_dict returns, and so peft

from .atomic import fsync_dir, write_temp
from .config import PeftConfig, PeftType, config_json, describe, fits_annotation, nested_config_class
from .injection import (
    adapter_layers, check_adapter_name, check_new_adapter_name, known_adapter_names, trained_biases,
)
from .targeting import (
    attention_out_projections, declared_embedding, is_bias, is_under, is_wrapper, join_name, logical_name,
)
from .tuners import ModulesToSaveWrapper, boft, fused_experts, lora_init, method_for
from .tuners.architecture_targets import model_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# The one tensor peft saves for a prompt- or prefix-tuning adapter.
PROMPT_EMBEDDINGS = "prompt_embeddings"
# Safetensors metadata key holding the config the tensors were saved with (peft ignores it).
SAVED_CONFIG_KEY = "minipeft_config"
# Config fields that do not change what the tensors compute; editing them by hand is fine.
BOOKKEEPING_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "task_type")

# Keys peft writes that minipeft has no field for, with peft's default value. Such a key is
# accepted when it holds that default (or any falsy value: None, False, {}, []); anything else
# asks for a feature minipeft does not implement and is refused.
PEFT_DEFAULTS: dict[str, Any] = {
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "prompt_tuning_init": "RANDOM",
    "init_ia3_weights": True,
}
# Bookkeeping keys that never change what the adapter computes.
# (auto_mapping names the transformers class peft used when task_type is unset.)
PEFT_METADATA_KEYS = ("peft_version", "auto_mapping")


# -- which tensors belong to an adapter -----------------------------------------------------------
def _containers(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, nn.Module, str]]:
    """``{"<module>.<container>.<adapter>": (module path, module, container)}`` for one adapter."""
    owned = {}
    for path, module in model.named_modules():
        for container in getattr(module, "adapter_layer_names", ()):
            holder = getattr(module, container, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict, dict)) and adapter_name in holder:
                owned[join_name(path, container, adapter_name)] = (path, module, container)
    return owned


def _owner(key: str, owned: dict) -> tuple[str, tuple] | None:
    """The container prefix ``key`` sits under (checking each dotted prefix of the key), if any."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in owned:
            return prefix, owned[prefix]
    return None


def _on_disk_name(model: nn.Module, name: str, adapter_name: str) -> str:
    """``name`` as it is in a model holding adapter ``adapter_name`` alone: the ``base_layer``
    segments of other adapters' wrappers dropped, those of its own wrappers kept.

    A checkpoint holds one adapter, and peft (which cannot put two methods on one module) reads
    it into a model with that adapter only. So LoRA on ``value`` saves ``value.lora_A.weight``
    whether or not an (IA)^3 wrapper was put around it later (really ``value.base_layer.lora_A``),
    and with ``bias="all"`` ``value.base_layer.bias``, as peft names it.
    """
    logical = logical_name(model, name, keep_wrapped=lambda wrapper: adapter_name in wrapper.adapter_names)
    return name if logical is None else logical


def _checkpoint_key(path: str, module: nn.Module, container: str, rest: str, adapter_name: str) -> str | None:
    """On-disk key for ``<path>.<container>.<adapter>[.<rest>]`` (adapter name removed); None: not saved."""
    shared = getattr(module, "shared_checkpoint_key", None)
    if callable(shared) and (key := shared(container, rest, adapter_name)) is not None:
        # peft's tuner model is base_model in a PeftModel (paths start base_model.model.).
        return f"base_model.{key}" if f"{path}.".startswith(PEFT_PREFIX) else key
    hook = getattr(module, "checkpoint_key", None)
    if callable(hook):
        local = hook(container, rest, adapter_name)
        if local is None:
            return None
    elif container == "modules_to_save":
        local = rest  # peft 0.21 saves the trained copy under the wrapped module's own name
    elif container == "lora_magnitude_vector" and rest == "weight":
        local = container  # peft saves DoRA's magnitude without its ".weight"
    else:
        local = f"{container}.{rest}" if rest else container
    return f"{path}.{local}" if path else local


def _trained_bias_keys(model: nn.Module, config: PeftConfig | None, adapter_name: str, state_dict: dict) -> list[str]:
    """Base-model biases a config trains on purpose; peft saves them with the adapter."""
    if config is None:
        return []
    return [k for k in trained_biases(model, config, adapter_name) if k in state_dict]


def _config_of(model: nn.Module, adapter_name: str) -> PeftConfig | None:
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter_name) if isinstance(configs, dict) else None


def adapter_key_map(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """``{checkpoint key: model state-dict key}`` for every tensor of ``adapter_name``."""
    state_dict = model.state_dict(keep_vars=True)
    owned = _containers(model, adapter_name)
    mapping: dict[str, str] = {}
    for key in state_dict:
        found = _owner(key, owned)
        if found is None:
            continue
        prefix, (path, module, container) = found
        rest = key[len(prefix) + 1 :]
        ckpt_key = _checkpoint_key(_on_disk_name(model, path, adapter_name), module, container, rest, adapter_name)
        if ckpt_key is None:
            continue
        if ckpt_key in mapping and mapping[ckpt_key] != key:
            if state_dict[mapping[ckpt_key]] is state_dict[key]:
                continue  # one tensor that several modules hold (VeRA's pair): saved and loaded once
            raise ValueError(
                f"two tensors of adapter {adapter_name!r} map to {ckpt_key!r}: {mapping[ckpt_key]!r} and {key!r}"
            )
        mapping[ckpt_key] = key
    for key in _trained_bias_keys(model, _config_of(model, adapter_name), adapter_name, state_dict):
        mapping.setdefault(_on_disk_name(model, key, adapter_name), key)
    return mapping


def peft_bias_extras(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """``{checkpoint key: model state-dict key}`` for the two extra spellings peft 0.21 writes for
    a module trained whole (``modules_to_save``) under ``bias="all"``.

    peft's ``bias="all"`` saves every state-dict key that holds a bias, and a wrapped head has
    two besides the adapter's copy saved under the head's own name (``classifier.bias``):

        classifier.modules_to_save.bias   the adapter's copy again (adapter name removed)
        classifier.original_module.bias   the frozen original, which peft loads back into it

    minipeft writes both, so its files have peft's keys, and reads them when present (files
    written before need not have them): the first must equal ``classifier.bias``, the second
    goes into the original, as in peft.
    """
    config = _config_of(model, adapter_name)
    if getattr(config, "bias", "none") != "all":
        return {}
    extras = {}
    for path, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        where = _on_disk_name(model, path, adapter_name)
        for name, _ in module.modules_to_save[adapter_name].named_parameters():
            if is_bias(name):
                extras[join_name(where, "modules_to_save", name)] = join_name(path, "modules_to_save", adapter_name, name)
        for name, _ in module.original_module.named_parameters():
            if is_bias(name):
                extras[join_name(where, "original_module", name)] = join_name(path, "original_module", name)
    return extras


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as peft saves them (adapter name removed); peft's signature.

    ``model`` is a ``PeftModel`` (keys start with ``base_model.model.``) or a plain model that
    went through ``inject_adapter_in_model`` (keys without that prefix, as in peft).

    state_dict: the model's full state dict to take the tensors from instead of the live model
        (DeepSpeed ZeRO-3 / FSDP gather the sharded parameters into one on the main process).
        Its keys are the model's own (``model.state_dict()``'s). Prompt and prefix tuning save the
        tensor their encoder computes, from the live model either way (as peft does).
    unwrap_compiled: take the model inside a ``torch.compile`` wrapper (``_orig_mod``).
    save_embedding_layers: ``"auto"`` or False. minipeft saves the adapter's own tensors only
        (peft's ``"auto"`` adds the base embedding when LoRA targets it; peft loads minipeft's
        files all the same); True is refused, as in ``PeftModel.save_pretrained``.
    """
    if state_dict is not None and not isinstance(state_dict, typing.Mapping):
        raise TypeError(
            f"state_dict must be the model's full state dict (a dict of tensors), got {type(state_dict).__name__} "
            f"{state_dict!r:.40}; the adapter's name goes to adapter_name= (peft's order: model, state_dict, "
            "adapter_name)"
        )
    if save_embedding_layers not in ("auto", False):
        raise ValueError(
            f"save_embedding_layers={save_embedding_layers!r}: minipeft returns the adapter's tensors only, never "
            "base-model layers (use 'auto' or False); a resized embedding is saved with the base model itself"
        )
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule holds the model there

    mapping = adapter_key_map(model, adapter_name)
    virtual = _virtual_tokens(model, adapter_name)
    if not mapping and virtual is None:
        raise ValueError(f"the model has no tensors for adapter {adapter_name!r}; adapters: {known_adapter_names(model)}")
    mapping.update(peft_bias_extras(model, adapter_name))
    source = model.state_dict() if state_dict is None else state_dict
    absent = [model_key for model_key in mapping.values() if model_key not in source]
    if absent:
        raise KeyError(
            f"the state_dict passed lacks {len(absent)} tensor(s) of adapter {adapter_name!r}: {describe_keys(absent)}; "
            "pass the full state dict of this model, keyed as model.state_dict() keys it"
        )
    out = {ckpt_key: source[model_key].detach() for ckpt_key, model_key in mapping.items()}
    config = _config_of(model, adapter_name)
    saved_tensors = method_for(config).saved_tensors if config is not None else None
    if saved_tensors is not None:
        out = saved_tensors(config, out, PEFT_PREFIX if hasattr(model, "base_model") else "")
    if virtual is not None:
        out = {_prompt_learning_key(k): v for k, v in out.items()}
        out[PROMPT_EMBEDDINGS] = virtual.prompt_embeddings().detach()
    return out


def _prompt_learning_key(key: str) -> str:
    """peft holds the user's model at ``base_model`` (not ``base_model.model``) for prompt learning,
    so a saved classifier head of such an adapter is ``base_model.classifier.weight`` on disk."""
    return "base_model." + key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _virtual_tokens(model: nn.Module, adapter_name: str) -> nn.Module | None:
    """The prompt/prefix-tuning encoder of ``adapter_name`` (``model.prompt_encoder[name]``), if any.

    peft saves a virtual-token adapter as one computed tensor, ``prompt_embeddings``: the prompt
    (n, d), or for prefix tuning the keys and values of every layer (n, layers*2*d) after the
    reparametrisation MLP. The encoder computes it and loads it back (tuners/virtual_tokens.py).
    """
    encoders = model._modules.get("prompt_encoder")
    return encoders[adapter_name] if encoders is not None and adapter_name in encoders else None


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """Where every key one side lacks is on the other side with one more leading module, e.g.
    ``bert.`` (an adapter saved on BertForSequenceClassification, loaded into BertModel, or the
    reverse): the sentence that says so, else None."""
    for wanted, found, deeper in ((missing, unexpected, "the checkpoint's"), (unexpected, missing, "this model's")):
        by_rest = {}
        for key in found:
            head, _, rest = key.removeprefix(PEFT_PREFIX).partition(".")
            by_rest.setdefault(rest, set()).add(head)
        heads = [by_rest.get(key.removeprefix(PEFT_PREFIX), set()) for key in wanted]
        if wanted and all(len(h) == 1 for h in heads) and len(set.union(*heads)) == 1:
            return (f"The keys match but for a leading {heads[0].pop() + '.'!r} in {deeper}: the adapter was saved on "
                    "another class of this model (BertForSequenceClassification holds a BertModel as 'bert', say). "
                    "Load it into the class it was saved from.")
    return None


def _named_keys_hint(missing: list[str], unexpected: list[str], adapter_names: list[str]) -> str | None:
    """Where every missing key is an unexpected one without an adapter's name in it
    (``lora_A.weight`` given as ``lora_A.default.weight``): a model's ``state_dict()``, whose keys
    hold the adapter names, given where an adapter's state dict goes. The sentence that says so,
    else None."""
    given = {}
    for key in unexpected:
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            if parts[i] in adapter_names:
                given.setdefault(".".join(parts[:i] + parts[i + 1:]), parts[i])
    names = {given.get(key) for key in missing}
    if not missing or None in names:
        return None
    return (f"The keys hold adapter names ({sorted(names)}): this is a model's state_dict(), not an adapter's. "
            "Pass get_peft_model_state_dict(model, adapter_name=...) (what save_pretrained writes), or load it "
            "with model.load_state_dict().")


def describe_keys(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` keys, quoted, and how many more."""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _embedding_paths(model: nn.Module) -> list[str]:
    """Paths of the model's input and output embeddings (transformers' ``get_input_embeddings`` /
    ``get_output_embeddings``, as wrapped now), the layers peft's ``save_embedding_layers`` saves."""
    found = []
    for which in ("input", "output"):
        layer = declared_embedding(model, which)  # none outside transformers: peft saves none there either
        if layer is not None:
            found += [path for path, module in model.named_modules() if module is layer and path not in found]
    return found


def _peft_embedding_key(model: nn.Module, key: str, adapter_name: str) -> tuple[str, bool] | None:
    """``key`` (a model state-dict key inside an embedding layer) as peft's ``save_embedding_layers``
    writes it for adapter ``adapter_name``, and whether it is a base-model tensor; None for a tensor
    of another adapter.

    peft saves every key under the layer's name with the adapter name removed, in its own module
    tree: other adapters' wrappers are not there (their ``base_layer`` segment goes), and trainable
    tokens beside LoRA sit one level down, as ``token_adapter`` (their ``TrainableTokensWrapper``):

        embed_tokens.base_layer.weight              (LoRA on the embedding: the frozen table)
        embed_tokens.token_adapter.base_layer.weight  (LoRA's trainable_token_indices)
        embed_tokens.original_module.weight         (modules_to_save: the frozen original)
        embed_tokens.modules_to_save.weight         (modules_to_save: the trained copy, a second time)
    """
    module: nn.Module | None = model
    names = key.split(".")
    parts: list[str] = []
    for i, part in enumerate(names):
        if module is not None and is_wrapper(module):
            mine = adapter_name in module.adapter_names
            if part == module.base_layer_name:
                if mine:  # (another adapter's wrapper is not in peft's tree: its segment goes)
                    parts.append(part)
                module = module._modules.get(part)
                continue
            if mine and part in module.adapter_layer_names and names[i + 1 : i + 2] == [adapter_name]:
                return ".".join(parts + [part] + names[i + 2 :]), False  # adapter name removed
            return None  # another adapter's tensor, or a wrapper's own state
        parts.append(part)
        module = module._modules.get(part) if module is not None else None
    return ".".join(parts), True


def peft_embedding_extras(model: nn.Module, adapter_name: str = "default") -> tuple[dict[str, str], set[str]]:
    """``{checkpoint key: model state-dict key}`` for what peft's ``save_embedding_layers`` adds to
    a file of adapter ``adapter_name`` (every tensor of the input and output embedding layers), and
    which of those checkpoint keys are base-model tensors.

    peft writes them by default when LoRA targets ``embed_tokens`` / ``lm_head`` (the frozen table
    as ``<layer>.base_layer.weight``), and for any embedding when the vocabulary was resized. Its
    loader puts them back into the model (``load_state_dict(strict=False)``): the saved table
    replaces the base model's, a resized one included (the base must be resized to the same size
    first, or the shapes do not match). minipeft loads them the same way; the adapter's own tensors
    saved there a second time must equal the copy loaded under the adapter's key.
    """
    state_dict = model.state_dict(keep_vars=True)
    extras: dict[str, str] = {}
    base: set[str] = set()
    for path in _embedding_paths(model):
        for key in state_dict:
            if not key.startswith(f"{path}."):
                continue
            spelled = _peft_embedding_key(model, key, adapter_name)
            if spelled is None:
                continue
            ckpt_key, is_base = spelled
            extras.setdefault(ckpt_key, key)
            if is_base:
                base.add(ckpt_key)
    return extras, base


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy a checkpoint state dict (peft keys, no adapter name) into adapter ``adapter_name``;
    peft's signature.

    The adapter must already exist in ``model``. Strict: every adapter tensor must be present,
    no other key may be, and every shape must match; all of it is checked before anything is
    copied, so a failed call leaves the model as it was. Keys peft writes besides the adapter's
    are read as peft reads them: the trained-bias spellings of ``bias="all"`` (``peft_bias_extras``)
    and the embedding layers of ``save_embedding_layers`` (``peft_embedding_extras``), whose base
    tables are copied into the base model (with a warning when that changes it).

    ignore_mismatched_sizes: as peft, a tensor whose shape differs from the model's is left out
        with a warning (its model key is then among the missing keys) instead of refused.
    low_cpu_mem_usage: peft's flag for adapters created on the meta device; minipeft creates
        adapters beside the base weights, so it changes nothing (a tensor on the meta device is refused).

    Returns what peft returns, ``model.load_state_dict(..., strict=False)``'s result:
    ``missing_keys`` the model's state-dict keys this call did not write (the base model, other
    adapters, anything left out for ignore_mismatched_sizes), ``unexpected_keys`` always empty (an
    unknown key is an error here).
    """
    del low_cpu_mem_usage  # nothing to do: see the docstring
    expected = _expected_keys(model, adapter_name)
    state_dict, prompt_embeddings = _checkpoint_tensors(peft_model_state_dict, expected, adapter_name)
    state_dict = fused_experts.fuse_per_expert_checkpoint(model, state_dict, expected.mapping)
    state_dict = _check_keys(model, adapter_name, state_dict, expected)
    targets = model.state_dict(keep_vars=True)
    mapping, skipped = _check_tensors(state_dict, expected, targets, ignore_mismatched_sizes)
    writes = _one_write_per_tensor(state_dict, mapping, targets, adapter_name)

    replaced = [ckpt_key for ckpt_key, model_key in writes if ckpt_key in expected.embedding_base
                and not torch.equal(targets[model_key].detach(), state_dict[ckpt_key].to(targets[model_key]))]
    if replaced:
        warnings.warn(
            f"adapter {adapter_name!r}: the checkpoint holds base-model embedding weights that differ from the "
            f"model's ({describe_keys(replaced)}), saved by peft's save_embedding_layers; they replace the model's, "
            "as peft loads them",
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"adapter {adapter_name!r}: tensors left out because ignore_mismatched_sizes=True:\n" + "\n".join(skipped),
            stacklevel=2,
        )
    with torch.no_grad():
        for ckpt_key, model_key in writes:
            targets[model_key].copy_(state_dict[ckpt_key])
    written = set(mapping.values())
    if expected.virtual is not None:
        expected.virtual.load_prompt_embeddings(prompt_embeddings)
        encoder_prefix = next((p + "." for p, m in model.named_modules() if m is expected.virtual), None)
        written |= {k for k in targets if encoder_prefix is not None and k.startswith(encoder_prefix)}
    return _IncompatibleKeys(missing_keys=[k for k in targets if k not in written], unexpected_keys=[])


@dataclasses.dataclass
class _ExpectedKeys:
    """What a checkpoint of one adapter holds, as checkpoint key -> model key: ``mapping`` the
    adapter's tensors (all needed), ``extras`` peft's other spellings and embedding layers (each
    read when present), of which ``embedding_base`` are base-model tables; ``virtual`` the
    prompt encoder of a virtual-token adapter (its one tensor is ``prompt_embeddings``)."""

    mapping: dict[str, str]
    extras: dict[str, str]
    embedding_base: set[str]
    virtual: nn.Module | None


def _expected_keys(model: nn.Module, adapter_name: str) -> _ExpectedKeys:
    mapping = adapter_key_map(model, adapter_name)
    virtual = _virtual_tokens(model, adapter_name)
    if not mapping and virtual is None:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; adapters: {known_adapter_names(model)}")
    embedding_extras, embedding_base = peft_embedding_extras(model, adapter_name)
    # Where a key is both (a trained head's bias under bias="all"), the bias rule already covers it.
    extras = {**embedding_extras, **peft_bias_extras(model, adapter_name)}
    if virtual is not None:
        mapping = {_prompt_learning_key(k): v for k, v in mapping.items()}
        extras = {_prompt_learning_key(k): v for k, v in extras.items()}
        embedding_base = {_prompt_learning_key(k) for k in embedding_base}
    return _ExpectedKeys(mapping, extras, embedding_base, virtual)


def _checkpoint_tensors(state_dict: dict, expected: _ExpectedKeys, adapter_name: str):
    """``(state_dict, prompt_embeddings)``: the checkpoint's tensors keyed as ``expected`` keys
    them (a plain model's without ``base_model.model.``, as peft strips it there too), with a
    virtual-token adapter's ``prompt_embeddings`` taken out and checked (else None)."""
    state_dict = dict(state_dict)
    prompt_embeddings = None
    if expected.virtual is not None:
        prompt_embeddings = state_dict.pop(PROMPT_EMBEDDINGS, None)
        if not isinstance(prompt_embeddings, torch.Tensor):
            raise ValueError(f"checkpoint does not fit adapter {adapter_name!r}: it has no {PROMPT_EMBEDDINGS!r} tensor")
        expected.virtual.check_prompt_embeddings(prompt_embeddings)
    if not any(k.startswith(PEFT_PREFIX) for k in expected.mapping):
        state_dict = {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict values must be tensors; {describe_keys(bad)} are not")
    return state_dict, prompt_embeddings


def _check_keys(model: nn.Module, adapter_name: str, state_dict: dict, expected: _ExpectedKeys) -> dict:
    """A ValueError naming the missing and unexpected keys, with the likeliest cause; the state
    dict without the keys of layers that never run (warned of), to be read."""
    missing = [k for k in expected.mapping if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected.mapping and k not in expected.extras]
    uncalled = _keys_of_uncalled_layers(model, unexpected)
    if uncalled:
        warnings.warn(
            f"adapter {adapter_name!r}: the checkpoint adapts the out_proj of an nn.MultiheadAttention "
            f"({describe_keys(uncalled)}), which peft's 'all-linear' selects although the attention never calls it: "
            "those tensors changed nothing there and are left out",
            stacklevel=3,
        )
        unexpected = [k for k in unexpected if k not in uncalled]
        state_dict = {k: v for k, v in state_dict.items() if k not in uncalled}
    if not (missing or unexpected):
        return state_dict
    if any(k.endswith((".oft_r", ".oft_s")) for k in unexpected):  # peft 0.14 to 0.15.2 (see check_oft_version)
        raise ValueError(f"checkpoint does not fit adapter {adapter_name!r}: it holds oft_r / oft_s tensors, the "
                         "OFT of peft 0.15.2 and before, which minipeft and newer peft do not read; retrain it, "
                         "or load it with peft 0.15")
    per_expert = [k for k in unexpected if re.search(r"\.experts\.\d+\.", k)]
    if per_expert and any(n.endswith(".gate_up_proj") and p.dim() == 3 for n, p in model.named_parameters()):
        kind = model_type(model)
        raise ValueError(
            f"checkpoint does not fit adapter {adapter_name!r}: it adapts each expert as a layer of its own "
            f"({describe_keys(per_expert)}), as transformers 4 built them, and this model holds its experts fused "
            "(experts.gate_up_proj, experts.down_proj: transformers 5). "
            + ("The adapter does not adapt those fused parameters: configure it as the checkpoint was (its "
               "adapter_config.json), and the per-expert layers are fused as they load"
               if kind in fused_experts.FAMILY else
               f"minipeft, as peft, converts such checkpoints for the Mixtral and Qwen-MoE families, not for model "
               f"type {kind!r}: use the base model under transformers 4")
        )
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) the adapter needs: {describe_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {describe_keys(unexpected)}")
    raise ValueError(
        f"checkpoint does not fit adapter {adapter_name!r}: {'; '.join(parts)}. "
        + (_prefix_hint(missing, unexpected) or _named_keys_hint(missing, unexpected, known_adapter_names(model))
           or fused_experts.dense_layers_hint(model, unexpected)
           or "Was it saved from another base model or with other target_modules?")
    )


def _check_tensors(state_dict: dict, expected: _ExpectedKeys, targets: dict, ignore_mismatched_sizes: bool):
    """``(mapping, skipped)``: checkpoint key -> model key of every tensor to copy, after checking
    each one's shape (left out, described in ``skipped``, with ignore_mismatched_sizes), kind of
    dtype, and that its target is no meta tensor. Saved embedding tables first: a resized
    vocabulary shows there, with the hint that fixes it."""
    mapping = {**expected.mapping, **{k: v for k, v in expected.extras.items() if k in state_dict}}
    skipped = []
    for ckpt_key in sorted(mapping, key=lambda k: k not in expected.embedding_base):
        model_key = mapping[ckpt_key]
        have, want = state_dict[ckpt_key].shape, targets[model_key].shape
        if have != want:
            if ignore_mismatched_sizes:
                skipped.append(f"- {ckpt_key}: found shape {tuple(have)} in the checkpoint, {tuple(want)} in the model")
                continue
            hint = (
                " (a saved embedding table: resize the base model's embeddings to the checkpoint's vocabulary "
                "first, e.g. model.resize_token_embeddings(n))"
                if ckpt_key in expected.embedding_base
                else " (another rank or another base model?)"
            )
            raise ValueError(
                f"shape mismatch for {ckpt_key!r}: checkpoint has {tuple(have)}, the model expects {tuple(want)}{hint}"
            )
        if state_dict[ckpt_key].is_floating_point() != targets[model_key].is_floating_point():
            raise TypeError(
                f"dtype mismatch for {ckpt_key!r}: checkpoint has {state_dict[ckpt_key].dtype}, "
                f"the model expects {targets[model_key].dtype}"
            )
        if targets[model_key].is_meta:
            raise ValueError(
                f"{model_key!r} is on the meta device, where a copy would be lost; minipeft creates adapters beside "
                "the base weights, so materialise the base model (load its weights) before loading the adapter"
            )
    return {k: v for k, v in mapping.items() if targets[v].shape == state_dict[k].shape}, skipped


def _one_write_per_tensor(state_dict: dict, mapping: dict, targets: dict, adapter_name: str) -> list[tuple[str, str]]:
    """``(checkpoint key, model key)`` once per model tensor. One tensor may be saved under several
    keys (a head tied to the embedding, peft's second spellings of a trained copy): every copy
    must agree."""
    writes: dict[int, tuple[str, str]] = {}
    for ckpt_key, model_key in mapping.items():
        first = writes.setdefault(id(targets[model_key]), (ckpt_key, model_key))[0]
        if first != ckpt_key and not torch.equal(state_dict[first], state_dict[ckpt_key]):
            raise ValueError(
                f"checkpoint holds two different values for one tensor of adapter {adapter_name!r}: {first!r} and "
                f"{ckpt_key!r} (peft writes the same tensor under both names); the file was edited or damaged"
            )
    return list(writes.values())


def _keys_of_uncalled_layers(model: nn.Module, keys: list[str]) -> list[str]:
    """The ``keys`` under the out_proj of an ``nn.MultiheadAttention`` (``attention_out_projections``)."""
    layers = [logical_name(model, name) or name for name in attention_out_projections(model)]
    return [k for k in keys if is_under(k, layers)]


# -- config files ---------------------------------------------------------------------------------
def check_oft_version(data: dict[str, Any], source: str) -> None:
    """peft changed OFT three times: files from before 0.14 have no ``oft_block_size`` field, those
    of 0.14 to 0.15.2 hold other tensors (``oft_r`` / ``oft_s``: refused when the tensors are
    read), and 0.18 changed the Neumann series (to the one minipeft computes). An older file says so."""
    if "oft_block_size" not in data:
        raise ValueError(f"{source}: an OFT adapter from peft before 0.14 (no oft_block_size), whose tensors "
                         "minipeft and newer peft do not read; retrain it, or load it with peft 0.13")
    version = re.match(r"(\d+)\.(\d+)", str(data.get("peft_version", "0.0")))
    if data.get("use_cayley_neumann") and (not version or tuple(map(int, version.groups())) < (0, 18)):
        warnings.warn(f"{source}: an OFT adapter saved before peft 0.18 (peft_version "
                      f"{data.get('peft_version')!r}) with the Neumann series, which peft 0.18 changed: it computes "
                      "a slightly different rotation here than where it was trained", stacklevel=3)


def _known_fields(value: dict, cls: type, where: str) -> dict:
    """A saved config of a config (LoRA's eva_config) without the keys ``cls`` has no field for
    (a newer peft's), with a warning: they steered how the adapter started, not what it computes."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        warnings.warn(f"{where} holds {unknown}, which {cls.__name__} does not know; ignored (they only steered how "
                      "the adapter was initialised)", stacklevel=4)
    return {k: v for k, v in value.items() if k in known}


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build the right config class from a peft-style dict (``adapter_config.json``).

    The class is chosen by ``peft_type`` through ``minipeft.tuners.PEFT_METHODS``. Keys minipeft
    has no field for are accepted only when they hold peft's default; every known field must
    have the annotated type.
    """
    from .tuners import PEFT_METHODS

    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    try:
        method = PEFT_METHODS[PeftType(peft_type)]
    except (ValueError, KeyError):
        known = ", ".join(t.value for t in PEFT_METHODS)
        raise ValueError(f"{source}: unknown peft_type {peft_type!r}; minipeft supports: {known}") from None
    cls = method.config_class
    if peft_type == PeftType.OFT.value:
        check_oft_version(data, source)
    if peft_type == PeftType.BOFT.value:
        data = boft.read_factor_count(data, source)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key == "peft_type" or key in PEFT_METADATA_KEYS:
            continue
        if key in fields:
            if isinstance(value, (set, frozenset)):  # peft's to_dict() keeps sets; its JSON holds lists
                value = sorted(value)
            nested = nested_config_class(hints.get(key, Any))
            if nested is not None and isinstance(value, dict):
                value = _known_fields(value, nested, f"{source}: {key}")
            if not fits_annotation(value, hints.get(key, Any)):
                raise TypeError(
                    f"{source}: field {key!r} of {cls.__name__} must be {describe(hints.get(key, Any))}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            kwargs[key] = value
        elif not value or (key in PEFT_DEFAULTS and value == PEFT_DEFAULTS[key]):
            continue  # a peft option left at its default: nothing to implement
        elif key in cls.peft_ignores:
            warnings.warn(f"{source}: {key}={value!r} is ignored, as peft's {cls.__name__} ignores it (peft's "
                          f"layers for this method never read it)", stacklevel=3)
        else:
            raise ValueError(
                f"{source}: {key}={value!r} asks for a peft feature that minipeft does not implement "
                f"({cls.__name__} has no field {key!r}); load this adapter with peft, or retrain it without {key}"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{source}: {err}") from None


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """peft's ``get_peft_config``: the config a dict describes (its ``peft_type`` picks the class),
    read and checked as a saved ``adapter_config.json`` is."""
    return config_from_dict(dict(config_dict), source="get_peft_config")


def _config_bytes(config: PeftConfig) -> bytes:
    return config_json({**config.to_dict(), "inference_mode": True})  # as peft: a saved adapter loads frozen


# -- atomic files (the recipe is minipeft.atomic's; both files are renamed only once both are written)
def _write_temp(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to a new temporary file next to ``name`` and flush it to disk."""
    return write_temp(os.path.join(folder, name), lambda f: f.write(data))


def check_saveable(folder: str) -> None:
    """Refuse, before anything is written, a folder that is a file or holds a folder where one
    of the checkpoint's two files goes."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot save an adapter to {folder!r}: it is a file; give a folder")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if os.path.isdir(os.path.join(folder, name)):
            raise IsADirectoryError(
                f"cannot save an adapter to {folder!r}: {name} there is a folder, where the adapter's file goes; "
                "move it away or give another folder"
            )


def write_adapters(adapters: list[tuple[str | os.PathLike, PeftConfig, dict[str, torch.Tensor]]]) -> None:
    """Write each ``(folder, config, state)`` as an adapter checkpoint: every file in full to a
    temporary name first, then all renamed into place. A save that fails while writing (a full
    disk, an interrupt, an unwritable folder) leaves every previous checkpoint as it was, not some
    adapters new and others old."""
    staged: list[tuple[str, str]] = []  # (temporary file, its final path), in rename order
    try:
        for folder, config, state in adapters:
            folder = os.fspath(folder)
            check_saveable(folder)
            os.makedirs(folder, exist_ok=True)
            config_bytes = _config_bytes(config)
            # safetensors wants contiguous, unshared CPU tensors.
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            metadata = {"format": "pt", SAVED_CONFIG_KEY: config_bytes.decode()}
            # Tensors first, then config: the config is the file that names a folder a checkpoint,
            # and the config recorded in the tensor file catches a crash between the two renames.
            for name, data in ((WEIGHTS_NAME, safetensors.torch.save(tensors, metadata=metadata)),
                               (CONFIG_NAME, config_bytes)):
                staged.append((_write_temp(folder, name, data), os.path.join(folder, name)))
        while staged:
            tmp, final = staged[0]
            os.replace(tmp, final)
            staged.pop(0)
        for folder in dict.fromkeys(os.fspath(folder) for folder, _, _ in adapters):
            fsync_dir(folder)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    initial_folder: str | None = None,
    is_main_process: bool = True,
) -> None:
    """Save adapters in peft's layout: ``default`` in the folder, others in ``<folder>/<name>/``
    (the arguments are ``PeftModel.save_pretrained``'s). Every argument is checked before the first
    file is written, also where ``is_main_process`` is False and nothing is written."""
    configs = getattr(model, "peft_config", None) or {}
    if isinstance(selected_adapters, str):  # (its letters would be read as the names)
        raise TypeError(f"selected_adapters is a list of adapter names; write [{selected_adapters!r}]")
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"cannot save unknown adapter(s) {unknown}; the model has {list(configs)}")
    if not names:
        raise ValueError("selected_adapters is empty: name at least one of " + repr(list(configs)) if configs else
                         "this PeftModel holds no adapter to save: the last one was deleted, or the adapters were "
                         "merged or unloaded (merge_and_unload and unload return the plain model, which saves as a "
                         "whole model); add or load one first")
    for name in names:  # a name like "../x" or "/abs" would write outside the folder
        check_adapter_name(name)
    if initial_folder is not None:
        if len(names) != 1:
            raise ValueError(
                f"path_initial_model_for_weight_conversion holds the initial state of one adapter, and {names} "
                "would be saved; save the PiSSA/OLoRA adapter alone with selected_adapters=[name]"
            )
        lora_init.check_convertible(configs[names[0]])
    for name in names:  # every folder, before the first adapter is written
        check_saveable(adapter_folder(save_directory, name))
    if not is_main_process:
        return
    if initial_folder is not None:
        _save_converted(model, save_directory, names[0], initial_folder)
        return
    write_adapters([(adapter_folder(save_directory, name), configs[name], get_peft_model_state_dict(model, adapter_name=name))
                    for name in names])


def _save_converted(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str, initial_folder: str
) -> None:
    """Save PiSSA/OLoRA adapter ``adapter_name`` converted to plain LoRA on the original weights,
    given its initial state in ``initial_folder``. Everything is read and checked before the
    one atomic write (``write_adapters``)."""
    folder = adapter_folder(save_directory, adapter_name)
    if os.path.realpath(folder) == os.path.realpath(initial_folder):
        raise ValueError(
            f"the converted adapter would be written to {folder!r}, over the initial adapter it is converted "
            "with; save it to another folder (the initial one serves every later conversion)"
        )
    try:
        initial_config, initial_tensors = load_checkpoint(initial_folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"path_initial_model_for_weight_conversion: {err}. Give the folder save_pretrained wrote right after "
            f"the adapter was initialised (for an adapter not named 'default': that folder/<name>)"
        ) from None
    config, tensors = lora_init.convert_to_lora(
        model.peft_config[adapter_name],
        get_peft_model_state_dict(model, adapter_name=adapter_name),
        initial_config,
        initial_tensors,
        source=repr(initial_folder),
    )
    write_adapters([(folder, config, tensors)])


def adapter_folder(save_directory: str | os.PathLike, adapter_name: str) -> str:
    """Where ``save_pretrained(save_directory)`` puts an adapter: ``default`` in the folder itself,
    any other in ``<folder>/<name>/`` (peft's layout)."""
    directory = os.fspath(save_directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


# -- reading --------------------------------------------------------------------------------------
def read_config_file(path: str) -> Any:
    """The JSON an ``adapter_config.json`` holds; a ValueError when it is not JSON (or not UTF-8)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter") from None


def _checked_folder(folder: str | os.PathLike) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"no adapter checkpoint at {folder!r}: not a folder (expected {CONFIG_NAME} and {WEIGHTS_NAME} in it; "
            "minipeft reads local folders, it downloads nothing from the Hub)"
        )
    return folder


def _missing_file_error(folder: str, path: str) -> FileNotFoundError:
    inside = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, CONFIG_NAME)))
    no_adapter_here = not os.path.isfile(os.path.join(folder, CONFIG_NAME))
    hint = (f"; it holds adapters in subfolder(s) {inside}, where save_pretrained puts an adapter not named "
            f"'default': pass subfolder={inside[0]!r}" if inside and no_adapter_here else "")
    if not hint and os.path.isfile(os.path.join(folder, "config.json")):
        hint = ("; it holds a whole model (config.json), not an adapter: load that as the base model, and the "
                "adapter from the folder its save_pretrained wrote")
    return FileNotFoundError(f"adapter checkpoint {folder!r} is missing {os.path.basename(path)}{hint}")


def _refuse_pickle(folder: str) -> None:
    pickle_only = not os.path.exists(os.path.join(folder, WEIGHTS_NAME))
    if pickle_only and os.path.exists(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
        raise ValueError(
            f"{folder!r} holds {PICKLE_WEIGHTS_NAME}, a pickle file; minipeft does not load pickles because "
            "unpickling can run arbitrary code. Convert it to safetensors in a trusted environment, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
        )


def read_weights(folder: str, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint folder's safetensors file, as saved, on ``device``, and its
    metadata. A folder with only a pickle (``adapter_model.bin``) is refused: unpickling can run
    code."""
    _refuse_pickle(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise _missing_file_error(folder, weights_path)
    try:
        with safetensors.safe_open(weights_path, framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type (and OSError) for damaged files
        raise ValueError(
            f"{weights_path} is not a readable safetensors file ({err}); it may be truncated or corrupted: "
            "save or download it again"
        ) from None


def load_checkpoint(folder: str | os.PathLike) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """Read and check a checkpoint folder: its config (as a config object) and its tensors."""
    folder = _checked_folder(folder)
    _refuse_pickle(folder)
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise _missing_file_error(folder, path)
    config = config_from_dict(read_config_file(config_path), source=config_path)
    tensors, metadata = read_weights(folder)
    if SAVED_CONFIG_KEY in metadata:
        _check_same_config(config, metadata[SAVED_CONFIG_KEY], folder)
    if config.peft_type == PeftType.BOFT:
        config = boft.fit_factor_count(config, tensors, config_path)
    return config, tensors


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None,
                      key_mapping: dict[str, str] | None = None, subfolder: str | None = None,
                      **hub_options: Any) -> dict[str, torch.Tensor]:
    """peft's ``load_peft_weights`` for a local folder: the adapter's tensors as saved (keys as in
    the file, for ``set_peft_model_state_dict``), read onto ``device``: by default the GPU where
    torch has one (peft also picks other accelerators), else the CPU.

    ``key_mapping`` renames keys as peft's does: with the ``base_model.model.`` (or
    ``base_model.``) prefix taken off, the first regex pattern that matches is substituted, and
    the prefix put back. Nothing is downloaded, so the Hub's options are refused."""
    if hub_options:
        raise TypeError(f"load_peft_weights reads local folders and downloads nothing from the Hub: "
                        f"{sorted(hub_options)} are download options; pass the folder the adapter was saved to")
    folder = _checked_folder(model_id if subfolder is None else os.path.join(model_id, subfolder))
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    tensors, _ = read_weights(folder, device=str(device))
    return _mapped_keys(tensors, key_mapping) if key_mapping else tensors


def _mapped_keys(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors under keys renamed by ``key_mapping`` (see load_peft_weights)."""
    mapped = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping renames keys under peft's 'base_model.model.' prefix, but the file holds "
                             f"{key!r}: load it without key_mapping")
        rest = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            renamed, count = re.subn(pattern, replacement, rest)
            if count:
                rest = renamed
                break
        mapped[prefix + rest] = tensor
    return mapped


def _check_same_config(config: PeftConfig, recorded_json: str, folder: str) -> None:
    """Warn where the config disagrees with the one recorded in the tensor file at save time.

    Either the config was edited by hand (peft loads such a file, and so does minipeft: the
    edited config is the one used) or a save was interrupted between its two renames, leaving new
    tensors beside the old config: the warning says so, and tensors that do not fit the config
    then fail to load with their shapes named."""
    try:
        recorded = config_from_dict(json.loads(recorded_json), source="recorded config").to_dict()
    except (ValueError, TypeError):
        return  # recorded by a version whose config we cannot read: nothing to compare with
    current = config.to_dict()
    differ = _fields_that_differ(current, recorded)
    if differ:
        detail = "; ".join(
            f"{k}: {current.get(k)!r} in {CONFIG_NAME}, {recorded.get(k)!r} at save time" for k in differ[:3]
        )
        warnings.warn(
            f"{CONFIG_NAME} in {folder!r} differs from the config {WEIGHTS_NAME} was saved with ({detail}); "
            f"loading with {CONFIG_NAME}, as edited. If instead a save was interrupted between writing the two "
            "files, the tensors belong to the other config: save the adapter again",
            stacklevel=3,
        )


def _fields_that_differ(a: dict, b: dict) -> list[str]:
    """The config fields (``to_dict`` layouts) in which ``a`` and ``b`` differ, bookkeeping aside."""
    keys = sorted((set(a) | set(b)) - set(BOOKKEEPING_FIELDS))
    return [k for k in keys if a.get(k) != b.get(k)]


def _requires_grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Each parameter with its requires_grad now, for ``_roll_back`` to restore."""
    return [(p, p.requires_grad) for p in model.parameters()]


def _roll_back(peft_model: nn.Module, adapter_name: str, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Take a freshly added adapter out again (wrappers, hooks, config) and restore requires_grad."""
    if adapter_name in peft_model.peft_config:
        peft_model.delete_adapter(adapter_name)
    for p, flag in flags:
        p.requires_grad_(flag)


def _warn_of_subfolder(folder: str | os.PathLike, adapter_name: str) -> None:
    """Warn where ``folder`` holds an adapter saved under ``adapter_name`` in its subfolder (where
    save_pretrained puts one not named default) and the folder's own adapter is loaded instead."""
    if adapter_name != "default" and os.path.isfile(os.path.join(os.fspath(folder), adapter_name, CONFIG_NAME)):
        warnings.warn(f"loading the adapter at the top of {os.fspath(folder)!r} under the name {adapter_name!r}; the "
                      f"folder also holds one saved as {adapter_name!r} in its subfolder: for that one, pass "
                      f"subfolder={adapter_name!r}", stacklevel=4)


def load_adapter(
    peft_model: nn.Module, folder: str | os.PathLike, adapter_name: str, is_trainable: bool = False
) -> None:
    """Add adapter ``adapter_name`` to ``peft_model`` from a checkpoint folder; all or nothing.

    An adapter of that name already there gets the checkpoint's tensors instead, as in peft (to
    go back to a saved state, e.g. the best one), when the checkpoint's config is its own; it
    keeps its requires_grad."""
    check_adapter_name(adapter_name)  # before any file is read
    if adapter_name in peft_model.peft_config:
        _reload_adapter(peft_model, folder, adapter_name, is_trainable)
        return
    check_new_adapter_name(adapter_name, peft_model.peft_config)
    _warn_of_subfolder(folder, adapter_name)
    config, tensors = load_checkpoint(folder)
    config.inference_mode = not is_trainable
    flags = _requires_grad_flags(peft_model)
    peft_model.add_adapter(adapter_name, config)
    _fill_adapter(peft_model, tensors, adapter_name, flags, is_trainable)
    if is_trainable and not config.is_prompt_learning:
        # Inactive, but trainable at once, as in peft: an optimizer built next takes its tensors.
        peft_model.set_requires_grad(adapter_name, True)


def _reload_adapter(peft_model: nn.Module, folder: str | os.PathLike, adapter_name: str, is_trainable: bool) -> None:
    config, tensors = checked_reload(peft_model, folder, adapter_name)
    set_peft_model_state_dict(peft_model, tensors, adapter_name)  # checks everything before it writes
    if not is_trainable:
        peft_model.eval()  # (as peft does after any load_adapter)


def checked_reload(peft_model: nn.Module, folder: str | os.PathLike, adapter_name: str,
                   may_differ: tuple[str, ...] = ()) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of the checkpoint in ``folder``, to be loaded into adapter ``adapter_name``,
    which exists: refused if that adapter is merged or computes its tokens with a network, or if
    the checkpoint's config differs from the adapter's in a field other than ``may_differ`` (and
    bookkeeping). The config is prepared as adding the adapter prepared it (a transformers-4 MoE
    config's targets converted). Nothing is written."""
    merged = [name for name, layer in adapter_layers(peft_model.get_base_model()) if adapter_name in layer.merged_adapters]
    encoder = _virtual_tokens(peft_model, adapter_name)
    if merged or (encoder is not None and encoder.has_network()):
        why = (f"it is merged into {merged[:3]}{' ...' if len(merged) > 3 else ''} (the new tensors would sit beside "
               "the old update in the weights): unmerge_adapter() first" if merged else
               "a network computes its virtual tokens, and the checkpoint holds their value alone (loading it would "
               "replace the network, and what trains, by that value): load it under another adapter_name")
        raise ValueError(f"cannot load {os.fspath(folder)!r} into adapter {adapter_name!r}, which exists already: {why}")
    config, tensors = load_checkpoint(folder)
    prepare = method_for(config).prepare_config
    if prepare is not None:
        prepare(peft_model.get_base_model(), config)
    differ = [k for k in _fields_that_differ(config.to_dict(), peft_model.peft_config[adapter_name].to_dict())
              if k not in may_differ]
    if differ:
        raise ValueError(
            f"cannot load {os.fspath(folder)!r} into adapter {adapter_name!r}, which exists already: the checkpoint's "
            f"config differs from the adapter's in {', '.join(differ)}. Load it under another adapter_name, or "
            f"delete_adapter({adapter_name!r}) first"
        )
    return config, tensors


def from_pretrained(
    peft_model_cls: type,
    model: nn.Module,
    folder: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: PeftConfig | None = None,
):
    """Build ``peft_model_cls(model, config, adapter_name)`` (``PeftModel`` or a subclass) from a
    checkpoint and load its tensors; on error the base model is left as it was. ``config``: a copy
    of it replaces the saved config."""
    check_new_adapter_name(adapter_name)  # before any file is read; the model holds no adapter yet
    _warn_of_subfolder(folder, adapter_name)
    saved_config, tensors = load_checkpoint(folder)
    config = saved_config if config is None else copy.deepcopy(config)
    config.inference_mode = not is_trainable
    flags = _requires_grad_flags(model)
    peft_model = peft_model_cls(model, config, adapter_name)
    _fill_adapter(peft_model, tensors, adapter_name, flags, is_trainable)
    return peft_model


def _fill_adapter(peft_model, tensors, adapter_name: str, flags, is_trainable: bool) -> None:
    """Copy a freshly added adapter's tensors in; on error take the adapter out again."""
    try:
        set_peft_model_state_dict(peft_model, tensors, adapter_name)
    except BaseException:
        _roll_back(peft_model, adapter_name, flags)
        raise
    if not is_trainable:
        peft_model.eval()  # loaded for inference: no dropout (as peft does)

"""The registry of PEFT methods: one entry per tuner file.

Adding a method that wraps layers means four edits:

* ``tuners/<method>.py``: its config (whose ``__post_init__`` sets ``peft_type``), its wrapper
  layers, its math;
* a ``PeftType`` member in ``minipeft/config.py``, the name ``adapter_config.json`` stores;
* one ``register_method`` call here;
* its config exported from ``minipeft/__init__.py``, where users import it.

Injection (``minipeft/injection.py``), checkpoints and ``PeftModel`` then work from this table.
A virtual-token method (``attach`` instead of a wrapper) needs two more things: its type in
``PeftConfig.is_prompt_learning`` (config.py), which is how ``PeftModel`` tells it from a layer
method, and an encoder in ``peft_model.prompt_encoder`` that speaks the protocol of
``tuners/virtual_tokens.py`` (``prepare_call``, ``remove_hooks``, and ``prompt_embeddings`` /
``check_prompt_embeddings`` / ``load_prompt_embeddings`` for checkpoints), through which
``PeftModel`` activates, deletes and saves it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import PeftConfig, PeftType
from . import (
    adalora,
    adalora_budget,
    architecture_targets,
    boft,
    bottleneck,
    c3a,
    fourierft,
    fused_experts,
    hra,
    ia3,
    loha,
    ln_tuning,
    lokr,
    lora,
    miss,
    oft,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    road,
    trainable_tokens,
    vera,
)
from .base import AdapterLayer, ModulesToSaveWrapper


@dataclass(frozen=True)
class PeftMethod:
    """How one method plugs in.

    config_class: its config dataclass.
    layer_class: its wrapper; a target already wrapped by this class gets the new adapter
        added in place (``add_adapter``) rather than a second wrapper.
    wrap: ``wrap(module, adapter_name, config, qualified_name) -> layer_class`` builds a new
        wrapper holding one adapter. It must not modify ``module`` or the model, except where an
        init is defined by rewriting the base weight (LoRA's PiSSA / OLoRA; see ``check``), and
        LoRA's wrapper of an ``nn.MultiheadAttention``, which wraps the attention's ``out_proj`` too.
    check: ``check(module, config, qualified_name)`` raises the errors that adding the adapter
        to this target would meet. Injection runs it on every target before it changes
        anything, because a base weight rewritten by an init cannot be rolled back.
    attach: for virtual-token methods (``config.is_prompt_learning``), which wrap no layer:
        ``attach(peft_model, adapter_name, config)`` adds the adapter to the PeftModel.
    prepare_config: ``prepare_config(model, config)`` rewrites the config in place for the model
        before its targets are found, as peft does (LoRA: the fused experts of a transformers-5
        mixture of experts, ``fused_experts.py``). What it writes is what the config records.
    default_targets: ``default_targets(model, config) -> target_modules`` for a config whose
        ``target_modules`` is None: peft's choice for the model's architecture
        (``architecture_targets.py``; None where it has none), trainable tokens' input embedding, LN
        tuning's normalisation layers. Written into the config, as peft does.
    check_model: ``check_model(model, config, targets)``, run after ``check``: the errors that need
        the whole model (trainable tokens: the vocabulary size, the modules tied to an embedding).
    wrap_more: ``wrap_more(model, config, adapter_name, holders, updated) -> [(name, module, wrapper)]``,
        wrappers beyond the targets, given ``holders`` (target name -> the wrapper holding the new
        adapter there); existing wrappers it adds the adapter to go into ``updated`` (for the
        rollback). Trainable tokens put one on each module tied to an adapted embedding; VeRA wraps
        nothing more but hands the new layers the random pair they share.
    after_add: ``after_add(peft_model, adapter_name, config)``, once the adapter is in the model:
        state a method keeps beside its layers (AdaLoRA's rank allocator).
    on_output: ``on_output(peft_model, adapter_name, config, outputs) -> outputs`` after each forward
        of the PeftModel while the adapter is active (AdaLoRA adds its regulariser to the loss).
    saved_tensors: ``saved_tensors(config, tensors, prefix) -> tensors``, the adapter's tensors as
        its checkpoint holds them (AdaLoRA keeps the ranks it allocated); ``prefix`` comes before
        the layer names in the keys.
    """

    config_class: type[PeftConfig]
    layer_class: type[AdapterLayer] | None
    wrap: Callable[[nn.Module, str, PeftConfig, str], AdapterLayer] | None
    attach: Callable[[nn.Module, str, PeftConfig], None] | None = None
    check: Callable[[nn.Module, PeftConfig, str], None] | None = None
    default_targets: Callable[[nn.Module, PeftConfig], list[str] | str | None] | None = None
    prepare_config: Callable[[nn.Module, PeftConfig], None] | None = None
    check_model: Callable[[nn.Module, PeftConfig, list[str]], None] | None = None
    wrap_more: Callable[..., list[tuple[str, nn.Module, nn.Module]]] | None = None
    after_add: Callable[[nn.Module, str, PeftConfig], None] | None = None
    on_output: Callable[[nn.Module, str, PeftConfig, object], object] | None = None
    saved_tensors: Callable[[PeftConfig, dict, str], dict] | None = None


PEFT_METHODS: dict[PeftType, PeftMethod] = {}


def register_method(peft_type: PeftType, method: PeftMethod) -> None:
    PEFT_METHODS[peft_type] = method


def method_for(config: PeftConfig) -> PeftMethod:
    try:
        return PEFT_METHODS[config.peft_type]
    except KeyError:
        known = ", ".join(t.value for t in PEFT_METHODS)
        raise ValueError(f"unknown peft_type {config.peft_type!r}; minipeft supports: {known}") from None


# The query and value projections: what LoRA and the methods sharing its table adapt where
# target_modules is None.
QUERY_VALUE = architecture_targets.from_table(architecture_targets.QUERY_VALUE)

# LoRA's extra wrappers: trainable tokens beside it (trainable_token_indices), under the LoRA
# adapter's name, and LoRA on bare parameters (target_parameters, tuners/lora_parameter.py), to
# which the experts of a transformers-5 mixture of experts move (tuners/fused_experts.py).
register_method(
    PeftType.LORA,
    PeftMethod(
        lora.LoraConfig, lora.LoraLayer, lora.wrap_module, check=lora.check_module,
        check_model=lora.check_model, wrap_more=lora.wrap_more, default_targets=QUERY_VALUE,
        prepare_config=fused_experts.convert_expert_targets,
    ),
)
register_method(PeftType.IA3, PeftMethod(ia3.IA3Config, ia3.IA3Linear, ia3.wrap_module,
                                         default_targets=architecture_targets.ia3_targets))
# AdaLoRA's rank allocator lives beside its layers, its regulariser joins the loss, and its
# checkpoints keep the ranks it allocated.
register_method(
    PeftType.ADALORA,
    PeftMethod(
        adalora.AdaLoraConfig, adalora.SVDLinear, adalora.wrap_module, after_add=adalora_budget.attach_allocator,
        default_targets=architecture_targets.from_table(architecture_targets.ADALORA),
        on_output=adalora.add_orthogonal_regularization, saved_tensors=adalora.kept_triplets,
    ),
)
register_method(PeftType.LOHA, PeftMethod(loha.LoHaConfig, loha.LoHaLayer, loha.wrap_module, default_targets=QUERY_VALUE))
register_method(PeftType.LOKR, PeftMethod(lokr.LoKrConfig, lokr.LoKrLayer, lokr.wrap_module, default_targets=QUERY_VALUE))
register_method(
    PeftType.LN_TUNING,
    PeftMethod(ln_tuning.LNTuningConfig, ln_tuning.LNTuningLayer, ln_tuning.wrap_module,
               check=ln_tuning.check_target, default_targets=ln_tuning.default_targets,
               check_model=ln_tuning.check_targets_apart),
)
# Methods whose wrappers check their own targets (the shapes and layer types they take).
for peft_type, tuner, config_class, layer_class in [
    (PeftType.OFT, oft, oft.OFTConfig, oft.OFTLayer),
    (PeftType.BOFT, boft, boft.BOFTConfig, boft.BOFTLayer),
    (PeftType.MISS, miss, miss.MissConfig, miss.MissLayer),
    (PeftType.ROAD, road, road.RoadConfig, road.RoadLayer),
    (PeftType.HRA, hra, hra.HRAConfig, hra.HRALayer),
]:
    register_method(peft_type, PeftMethod(config_class, layer_class, tuner.wrap_module, check=tuner.check_target,
                                          default_targets=QUERY_VALUE))
register_method(PeftType.C3A, PeftMethod(c3a.C3AConfig, c3a.C3ALayer, c3a.wrap_module, check=c3a.check_target,
                                         default_targets=architecture_targets.from_table(architecture_targets.C3A)))
register_method(PeftType.FOURIERFT, PeftMethod(fourierft.FourierFTConfig, fourierft.FourierFTLayer, fourierft.wrap_module,
                                               default_targets=architecture_targets.from_table(architecture_targets.FOURIERFT)))
register_method(
    PeftType.BOTTLENECK, PeftMethod(bottleneck.BottleneckConfig, bottleneck.BottleneckLayer, bottleneck.wrap_module)
)

# VeRA's shared random pair: every target is wrapped first, then wrap_more hands all of them one pair.
register_method(
    PeftType.VERA,
    PeftMethod(
        vera.VeraConfig, vera.VeraLinear, vera.wrap_module, check=vera.check_target,
        check_model=vera.check_shared_projection, wrap_more=vera.attach_projection,
        default_targets=architecture_targets.from_table(architecture_targets.VERA),
    ),
)

register_method(
    PeftType.TRAINABLE_TOKENS,
    PeftMethod(
        trainable_tokens.TrainableTokensConfig, trainable_tokens.TrainableTokensLayer, trainable_tokens.wrap_module,
        default_targets=lambda model, config: trainable_tokens.input_embedding_name(model),
        check_model=trainable_tokens.check_token_targets,
        wrap_more=trainable_tokens.wrap_beside,
    ),
)

register_method(
    PeftType.PROMPT_TUNING, PeftMethod(prompt_tuning.PromptTuningConfig, None, None, attach=prompt_tuning.attach)
)
register_method(PeftType.P_TUNING, PeftMethod(p_tuning.PromptEncoderConfig, None, None, attach=p_tuning.attach))
register_method(
    PeftType.PREFIX_TUNING, PeftMethod(prefix_tuning.PrefixTuningConfig, None, None, attach=prefix_tuning.attach)
)

__all__ = ["AdapterLayer", "ModulesToSaveWrapper", "PeftMethod", "PEFT_METHODS", "register_method", "method_for"]

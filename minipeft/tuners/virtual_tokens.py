"""What prompt tuning and prefix tuning share: virtual tokens that live beside the model.

Neither method wraps a layer. Their learned tensors sit in one container on the PeftModel,
``peft_model.prompt_encoder[<adapter>]`` (peft's names: ``prompt_encoder.default.embedding.weight``),
and reach the frozen model through hooks:

* one forward pre-hook on the user's model rewrites the call's keyword arguments
  (prompt tuning: ``input_ids -> inputs_embeds`` with the prompt in front; prefix tuning:
  positions shifted by the number of virtual tokens);
* prefix tuning adds hooks on the attention modules (see ``prefix_tuning.py``);
* on an encoder-decoder model, prompt tuning puts the prompt in through a hook on the encoder
  stack, the model's pre-hook only widening the mask (``prompt_tuning.py``), and prefix tuning
  fills the decoder's KV cache before each call instead of hooking attention
  (``prefix_tuning_seq2seq.py``).

Hooking the user's model rather than ``PeftModel.forward`` means ``model.generate()`` from
transformers, which calls the model's own forward once per new token, goes through the same
code: a hook sees each step and can tell the first one (empty KV cache) from the others.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PeftConfig, is_positive_int

# Keyword names transformers uses for the KV cache (``cache`` from 5.x on).
CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of every virtual-token method, named as in peft.

    num_virtual_tokens: how many virtual tokens the adapter learns.
    token_dim: width of one virtual token; inferred from the model when omitted.
    num_transformer_submodules / num_attention_heads / num_layers: peft stores these in
    ``adapter_config.json``; minipeft fills them from the model so the file reads in peft.
    modules_to_save: modules trained whole beside the virtual tokens (a classifier head).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if not is_positive_int(n):
            raise ValueError(
                f"{type(self).__name__}.num_virtual_tokens must be a positive integer (e.g. 20), got {n!r}"
            )
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            if getattr(self, name) is not None and not is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer or None (inferred), got {getattr(self, name)!r}")


def model_config_value(model: nn.Module, *names: str) -> int | None:
    """The first of ``names`` set in ``model.config`` (transformers models), else None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def is_encoder_decoder(model: nn.Module, config: PeftConfig) -> bool:
    """Whether the model is an encoder-decoder (T5, BART), said by the task or by its own config."""
    said_by_model = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return config.task_type == "SEQ_2_SEQ_LM" or said_by_model


def forward_parameters(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s parameters, in order (to name positional arguments)."""
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def args_to_kwargs(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a forward call, moved into ``kwargs`` under their names."""
    if not args:
        return dict(kwargs)
    positional = [n for n in names if n not in ("self", "args", "kwargs")]
    if len(args) > len(positional):
        raise TypeError(f"forward takes {len(positional)} positional arguments, got {len(args)}")
    out = dict(zip(positional, args))
    out.update(kwargs)
    return out


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache of this call (0 on the first step, or without a cache)."""
    for key in CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # legacy ((k, v), ...) with k: (B, H, T, D)
    return 0


def batch_and_length(kwargs: dict) -> tuple[int, int, torch.device]:
    """(batch, new tokens, device) of a call, from ``input_ids``, ``inputs_embeds`` or ``idx``
    (nanoGPT's name for the token ids)."""
    for key in ("input_ids", "inputs_embeds", "idx"):
        x = kwargs.get(key)
        if isinstance(x, torch.Tensor):
            return x.shape[0], x.shape[1], x.device
    raise ValueError("cannot find the inputs of this call: pass input_ids, inputs_embeds or idx (nanoGPT)")


def widen_attention_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A 2-D padding mask (B, T) -> (B, n + T): the virtual tokens are always visible."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(
            f"virtual tokens need a 2-D padding mask (batch, seq), got an attention_mask of shape {tuple(mask.shape)}; "
            "pass the tokenizer's attention_mask and let the model build the 4-D mask"
        )
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


class PromptEncoderDict(nn.ModuleDict):
    """``peft_model.prompt_encoder``: one encoder per adapter name, plus the hooks that apply
    the active one.

    Each encoder implements ``prepare_call(kwargs, model) -> kwargs``, called before every
    forward of the user's model while its adapter is active, and ``remove_hooks()`` for the
    hooks of its own (on attention modules, or on an encoder stack). ``active_adapter`` is None when
    the active adapter of the PeftModel is not a virtual-token one, and ``disable_adapters`` is set
    inside ``PeftModel.disable_adapter()``.
    """

    # Every instance attribute has a class-level default, so that dir(PromptEncoderDict) lists it:
    # adapter names key this dict, and torch refuses a key that is an attribute already
    # (injection.check_adapter_name reads the class, not an instance with hooks on a model).
    active_adapter: str | None = None
    disable_adapters: bool = False
    _param_names: tuple[str, ...] = ()  # the user's model's forward parameters, to name positional args
    _handles: tuple = ()  # the hooks on the user's model

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._param_names = tuple(forward_parameters(model))
        self._handles = (model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),)

    def active_encoder(self) -> nn.Module | None:
        if self.disable_adapters or self.active_adapter is None or self.active_adapter not in self:
            return None
        return self[self.active_adapter]

    def _pre_forward(self, model: nn.Module, args: tuple, kwargs: dict):
        encoder = self.active_encoder()
        if encoder is None:
            return None
        kwargs = args_to_kwargs(self._param_names, args, kwargs)
        return (), encoder.prepare_call(kwargs, model)

    def set_adapter(self, adapter_name: str, trainable: bool = True) -> None:
        """Activate ``adapter_name`` (or nothing, when it is not a virtual-token adapter)."""
        self.active_adapter = adapter_name if adapter_name in self else None
        for name, encoder in self.items():
            encoder.requires_grad_(trainable and name == adapter_name)

    def remove_hooks(self) -> None:
        """Take every hook out of the user's model (``unload``): it runs as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = ()
        for encoder in self.values():
            encoder.remove_hooks()


@contextlib.contextmanager
def adapters_off(peft_model: nn.Module):
    """The virtual tokens of ``peft_model``'s adapters left out of the calls inside the block (a
    probe of the bare model, while another adapter of this kind is active)."""
    encoders = peft_model._modules.get("prompt_encoder")
    if encoders is None:
        yield
        return
    encoders.disable_adapters, was_disabled = True, encoders.disable_adapters
    try:
        yield
    finally:
        encoders.disable_adapters = was_disabled


def hooked_prompt_encoders(model: nn.Module) -> list[PromptEncoderDict]:
    """The virtual-token containers whose hooks sit on ``model`` or a module inside it (found by
    the hooks, as the containers live on a PeftModel, outside the user's model)."""
    return [hook.__self__ for module in model.modules() for hook in module._forward_pre_hooks.values()
            if isinstance(getattr(hook, "__self__", None), PromptEncoderDict)]


def prompt_encoders(peft_model: nn.Module) -> PromptEncoderDict:
    """The PeftModel's ``prompt_encoder`` container, created (and hooked in) on first use."""
    if "prompt_encoder" not in peft_model._modules:
        peft_model.prompt_encoder = PromptEncoderDict(peft_model.get_base_model())
    return peft_model.prompt_encoder


def add_modules_to_save(peft_model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Wrap ``config.modules_to_save`` (e.g. the SEQ_CLS head) so it trains with the virtual tokens."""
    from .. import injection  # deferred: injection imports the tuner registry

    model = peft_model.get_base_model()
    injection.wrap_modules_to_save(model, config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)


def set_active(peft_model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """Make a virtual-token adapter the active one: its encoder and its saved modules train."""
    from .. import injection

    prompt_encoders(peft_model).set_adapter(adapter_name, trainable)
    for _, layer in injection.adapter_layers(peft_model.get_base_model()):
        layer.set_adapter([adapter_name], trainable=trainable)


def delete(peft_model: nn.Module, adapter_name: str) -> None:
    from .. import injection

    encoders = prompt_encoders(peft_model)
    encoders[adapter_name].remove_hooks()  # prefix tuning's attention hooks, an encoder-decoder's encoder hook
    del encoders[adapter_name]
    if encoders.active_adapter == adapter_name:
        encoders.active_adapter = None
    if not len(encoders):
        # The last virtual-token adapter: the model goes back to having none (merge_and_unload works again).
        encoders.remove_hooks()
        del peft_model._modules["prompt_encoder"]
    model = peft_model.get_base_model()
    if any(adapter_name in layer.adapter_names for _, layer in injection.adapter_layers(model)):
        injection.delete_adapter(model, adapter_name)


def check_token_dim(config: PromptLearningConfig, found: int, where: str) -> None:
    if config.token_dim is not None and config.token_dim != found:
        raise ValueError(
            f"token_dim={config.token_dim} does not match the model: {where} has width {found}. "
            f"Leave token_dim unset to infer it, or set token_dim={found}."
        )

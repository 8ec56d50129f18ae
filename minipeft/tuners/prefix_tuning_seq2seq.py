"""Prefix tuning on encoder-decoder models (T5, BART, ...): the prefix in the decoder's KV cache.

On an encoder-decoder model peft prefixes the decoder's self-attention only: the encoder and
the cross-attention see no virtual token. It does so by handing the model a KV cache that holds
the prefix already, as if ``n`` decoder tokens had been seen before the real ones. The model then
does the rest itself: every self-attention layer attends to the cached prefix, the decoder numbers
its tokens from ``n`` (BART's learned positions), and T5's relative position bias covers the
prefix columns too (as the distance to positions ``0..n-1``). The SDPA route of
``prefix_tuning.py`` could not give those bias columns, so here minipeft does what peft does:
before each forward of the model, a cache whose self-attention part is empty (the first call,
the first step of ``generate``) is filled with the prefix, and a decoder padding mask of the
real tokens, ``(B, T)``, is widened with ``n`` visible columns.

Which rows of the table a layer reads: peft's layout
----------------------------------------------------
The table is peft's: ``(n, L * 2 * heads * head_dim)``, a key and a value for each of the ``L``
decoder layers. peft writes the list ``[k_0, v_0, ..., k_{L-1}, v_{L-1}]`` twice in a row and cuts
it into fours, one ``(self k, self v, cross k, cross v)`` per decoder layer, then empties the
cross-attention part of the cache. Decoder layer ``j``'s self-attention thus reads the table's
layer ``2j mod L``; with an even ``L`` the odd layers' rows are never read (they get no gradient).
minipeft reads the same rows, so that a checkpoint computes the same function in both libraries.

The cache classes are the model's own (transformers' ``EncoderDecoderCache`` of two
``DynamicCache``): attaching runs the model once with ``use_cache=True`` and keeps the types of
the cache it returns, which also tell the number of decoder layers and the shape of their keys.
minipeft never imports transformers.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from . import virtual_tokens as vt
from .base import evaluating
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig, fill_shape_fields


def table_layer(decoder_layer: int, layers: int) -> int:
    """The layer of peft's table whose key and value decoder layer ``decoder_layer`` reads."""
    return 2 * decoder_layer % layers


def probe_decoder_cache(model: nn.Module):
    """The cache the model fills in one forward (encoder input of 3 tokens, decoder input of 2),
    after a second forward checks that its decoder takes a prefilled cache and several new tokens
    at once, as every training step will give it (ProphetNet's and FSMT's decoders do not)."""
    cache = _probe(model, "to find its decoder layers", use_cache=True)
    cache = next((cache[key] for key in vt.CACHE_KWARGS if key in cache and cache[key] is not None), None)
    if cache is None or not hasattr(cache, "self_attention_cache"):
        raise ValueError(
            f"prefix tuning puts the prefix into an encoder-decoder model's KV cache, but {type(model).__name__} "
            f"returned {type(cache).__name__} as its cache, not one with a self_attention_cache (transformers' "
            "EncoderDecoderCache). Use a transformers encoder-decoder model (T5, BART, ...), or prompt tuning or LoRA"
        )
    prefilled = type(cache)(type(cache.self_attention_cache)(), type(cache.self_attention_cache)())
    for i, layer in enumerate(cache.self_attention_cache.layers):
        one_token = torch.zeros_like(layer.keys[:, :, :1])  # (1, heads, 1, head_dim)
        prefilled.self_attention_cache.update(one_token, one_token.clone(), i)
    cache_kwarg = next((k for k in vt.CACHE_KWARGS if k in vt.forward_parameters(model)), "past_key_values")
    _probe(model, "with a prefilled cache, as prefix tuning runs it,", use_cache=False, **{cache_kwarg: prefilled})
    return cache


def _probe(model: nn.Module, purpose: str, **kwargs):
    """One forward of ``model`` in eval mode on 3 encoder and 2 decoder tokens; a failure says ``purpose``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with evaluating(model), torch.no_grad():
            return model(input_ids=torch.zeros(1, 3, dtype=torch.long, device=device),
                         decoder_input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), **kwargs)
    except Exception as err:
        message = str(err).splitlines()[0][:300] if str(err) else ""
        raise ValueError(
            f"prefix tuning runs the encoder-decoder {type(model).__name__} once (input_ids and 2 decoder_input_ids) "
            f"{purpose} and that call failed: {type(err).__name__}: {message}. Its decoder may not take a KV cache "
            "the way prefix tuning needs; use prompt tuning or LoRA for this model"
        ) from err


class DecoderCachePrefix(PrefixEncoder):
    """The prefix of an encoder-decoder model, put into the decoder's KV cache before each call."""

    def __init__(self, config: PrefixTuningConfig, cache, device=None) -> None:
        super().__init__(config, layer_names=[], device=device)
        self.layers = config.num_layers
        self.cache_type = type(cache)
        self.layer_cache_type = type(cache.self_attention_cache)

    def hook(self, model: nn.Module, encoders: vt.PromptEncoderDict) -> None:
        """One hook beyond the model's pre-hook (``prepare_call``), which the model reads its cache
        from: after the call, a cache minipeft made is taken out of the output when the call asked
        for none (``use_cache=False``), as the bare model returns none. ``generate(use_cache=False)``
        would otherwise feed it back with the whole decoder input, and the tokens would be cached twice."""
        self._owner = [encoders]
        self._checkpointed = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        self._cache_kwarg = next((k for k in vt.CACHE_KWARGS if k in vt.forward_parameters(model)), "past_key_values")
        self._made_unasked: object | None = None  # the cache made for a call with use_cache=False
        self._handles.append(model.register_forward_hook(self._drop_made_cache, always_call=True))

    def prepare_call(self, kwargs: dict, model: nn.Module) -> dict:
        if torch.is_grad_enabled() and any(m.gradient_checkpointing and m.training for m in self._checkpointed):
            # transformers calls checkpointed layers without the cache, so the prefix would never reach them.
            raise ValueError("prefix tuning on an encoder-decoder model does not work with gradient checkpointing, "
                             "whose layers are called without the KV cache that holds the prefix; call "
                             "model.gradient_checkpointing_disable()")
        key = next((k for k in vt.CACHE_KWARGS if kwargs.get(k) is not None), self._cache_kwarg)
        cache = kwargs.get(key)
        if cache is None:
            cache = kwargs[key] = self.cache_type(self.layer_cache_type(), self.layer_cache_type())
            use_cache = kwargs.get("use_cache")
            if use_cache is False or (use_cache is None and not getattr(model.config, "use_cache", True)):
                self._made_unasked = cache
        own = cache.self_attention_cache
        if type(own) is not self.layer_cache_type:
            raise ValueError(
                f"prefix tuning on an encoder-decoder model writes its prefix into a {self.layer_cache_type.__name__} "
                f"(it grows by n tokens); this call's cache is a {type(own).__name__}, sized for the real tokens "
                "only. Use the default dynamic cache (no cache_implementation='static' in generate)"
            )
        filling = own.get_seq_length() == 0
        if filling:
            self._fill(own, decoder_batch_size(kwargs), next(model.parameters()).dtype)
        mask = kwargs.get("decoder_attention_mask")
        if mask is None:
            return kwargs
        new_tokens = decoder_length(kwargs)
        if new_tokens is None:
            # No decoder input given: the model derives it from input_ids (BART), on the first
            # call only, and the mask is of the real tokens then.
            if filling:
                kwargs["decoder_attention_mask"] = vt.widen_attention_mask(mask, self.num_virtual_tokens)
            return kwargs
        n = self.num_virtual_tokens
        real = own.get_seq_length() - n + new_tokens  # real tokens, cached and new (the cache holds the prefix)
        if mask.shape[-1] == real:  # a mask of the real tokens: the prefix's columns, visible, go first
            kwargs["decoder_attention_mask"] = vt.widen_attention_mask(mask, n)
        elif mask.shape[-1] != real + n:  # (real + n: widened already)
            raise ValueError(
                f"decoder_attention_mask has {mask.shape[-1]} columns; with {real - new_tokens} real token(s) cached "
                f"and {new_tokens} new it should have {real} (the prefix's {n} are added here)"
            )
        return kwargs

    def _drop_made_cache(self, model: nn.Module, args, output) -> None:
        made, self._made_unasked = self._made_unasked, None
        if made is not None and isinstance(output, dict):
            for key in vt.CACHE_KWARGS:
                if output.get(key) is made:
                    _remove_field(output, key)

    def layers_read(self) -> list[int]:
        return [table_layer(layer, self.layers) for layer in range(self.layers)]

    def _fill(self, cache, batch: int, dtype: torch.dtype) -> None:
        """Write each decoder layer's prefix (batch, heads, n, head_dim) into an empty cache."""
        for layer, (key, value) in enumerate(self.virtual_tokens(batch, dtype)):
            cache.update(key, value, layer)


def _remove_field(output: dict, key: str) -> None:
    """Take ``key`` out of a model's output as the bare model leaves it: not among the keys (beam
    search reorders a cache it finds there, even None) and, on transformers' ModelOutput, the
    attribute None. ModelOutput refuses ``del``; the OrderedDict underneath it takes it."""
    if isinstance(output, collections.OrderedDict):
        collections.OrderedDict.__delitem__(output, key)
        object.__setattr__(output, key, None)
    else:
        del output[key]


def decoder_batch_size(kwargs: dict) -> int:
    """The batch of a call: from the decoder's inputs, the labels, or the encoder's."""
    for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise ValueError("cannot tell the batch size of this call: pass input_ids, decoder_input_ids or labels")


def decoder_length(kwargs: dict) -> int | None:
    """How many decoder tokens this call adds (None when the call gives no decoder input nor
    labels: the model derives its decoder input from ``input_ids``, as BART does)."""
    for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[1]
    return None


def decoder_cache_prefix(model: nn.Module, config: PrefixTuningConfig) -> DecoderCachePrefix:
    """The prefix encoder of an encoder-decoder ``model`` (fills ``config``'s inferred fields)."""
    if config.target_modules is not None:
        raise ValueError("target_modules selects attention modules for the SDPA route of decoder-only and encoder "
                         "models; on an encoder-decoder model every decoder layer gets a prefix, as in peft")
    cache = probe_decoder_cache(model)
    key_shapes = [tuple(layer.keys.shape) for layer in cache.self_attention_cache.layers]
    encoder_layers = vt.model_config_value(model, "num_hidden_layers")
    if encoder_layers is not None and encoder_layers != len(key_shapes):
        raise ValueError(
            f"{type(model).__name__} has {encoder_layers} encoder and {len(key_shapes)} decoder layers; peft lays out "
            "an encoder-decoder prefix by the encoder's count and fills the decoder's cache with it, which needs "
            "the two to be equal. Use prompt tuning or LoRA for this model"
        )
    config.num_transformer_submodules = 2
    fill_shape_fields(config, model, key_shapes)
    return DecoderCachePrefix(config, cache, device=next((p.device for p in model.parameters()), None))

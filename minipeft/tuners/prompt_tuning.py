"""Prompt tuning (Lester et al. 2021): learn a few input embeddings, freeze the whole model.

The adapter is a matrix ``P`` of ``n`` virtual-token embeddings put in front of the embedded
input. For token ids ``x`` (B, T) and the model's embedding table ``E``:

    inputs_embeds = concat([P, P, ..., P], E[x])      # (B, n + T, d),  P: (n, d)

and the frozen model runs on that longer sequence. Only ``P`` trains: ``n * d`` numbers.
Everything indexed by position grows with it:

* ``attention_mask`` gets ``n`` leading ones (the prompt is always visible);
* token-level ``labels`` (task type CAUSAL_LM or TOKEN_CLS; with no task type, labels as long
  as the input) get ``n`` leading ``-100`` (no loss on the prompt);
* ``token_type_ids`` get ``n`` leading zeros;
* ``position_ids``, when given, become ``[0..n-1, position_ids + n]``: the prompt takes the
  first positions, as it does when the model numbers positions itself.

A BERT classifier pools the hidden state at index 0, which is now the first virtual token;
peft does the same (it concatenates the prompt in front and calls the model), so the two
agree, and the pooled vector is the one the prompt learns to shape.

Generation: ``model.generate()`` calls the model's forward once per token. The prompt goes
in on the first call only, when the KV cache is empty; later calls feed one new token and
find the prompt's keys and values already cached, so they only shift positions by ``n`` and
widen the mask. The hook sits on the user's model forward, so this works whether
``generate`` is called through the PeftModel or on the base model.

Encoder-decoder models (T5, BART): the prompt goes in front of the encoder's input only, as
in peft and in Lester et al.'s T5 experiments. A hook on the encoder stack (``get_encoder()``)
puts it there, so that ``generate()``, which runs the encoder by itself before decoding, sees it
too; the model's own forward only widens ``attention_mask``, which the decoder's
cross-attention reads over the encoder's ``n + T`` states. The decoder's input, mask and labels
are untouched.

Checkpoints: the parameter is ``prompt_encoder.<adapter>.embedding.weight`` (n, d), which
peft saves as ``prompt_embeddings``. For SEQ_2_SEQ_LM peft sizes it (2n, d), a row block per
stack, and uses only the first ``n`` rows; minipeft does the same so that files match.
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config import PeftType, TaskType
from ..data import load_tokenizer
from ..targeting import declared_embedding
from . import virtual_tokens as vt


class PromptTuningInit(str, enum.Enum):
    """How the virtual tokens start: random vectors, embeddings of a text, or of random vocabulary."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


@dataclass
class PromptTuningConfig(vt.PromptLearningConfig):
    """Prompt tuning hyper-parameters, with peft's field names.

    prompt_tuning_init: ``RANDOM`` (standard normal), ``TEXT`` (embeddings of
    ``prompt_tuning_init_text``, repeated to fill ``num_virtual_tokens``, cut when longer)
    or ``SAMPLE_VOCAB`` (embeddings of random vocabulary entries).
    tokenizer_name_or_path: for ``TEXT``, a ``tokenizer.json`` file or a folder holding one
    (no hub lookups). tokenizer_kwargs: kept for peft's config files; minipeft does not use it.
    tokenizer (minipeft only, not saved): a ``tokenizers.Tokenizer`` or a callable
    ``text -> list[int]`` used instead of ``tokenizer_name_or_path``.
    input_embeddings_name (minipeft only, not saved): qualified name of the input embedding
    for models without ``get_input_embeddings()``.
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = None
    input_embeddings_name: str | None = None

    runtime_only_fields: ClassVar[tuple[str, ...]] = ("tokenizer", "input_embeddings_name")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            known = ", ".join(i.value for i in PromptTuningInit)
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of: {known}") from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from")
        elif self.prompt_tuning_init_text and not self.inference_mode:  # (peft says nothing)
            warnings.warn(f"prompt_tuning_init_text is ignored with prompt_tuning_init={self.prompt_tuning_init.value!r}:"
                          " the prompt starts from it only with prompt_tuning_init='TEXT'", stacklevel=3)


def find_input_embeddings(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    """The module that turns token ids into vectors: ``config.input_embeddings_name`` when
    given, else ``model.get_input_embeddings()``."""
    if config.input_embeddings_name:
        try:
            module = model.get_submodule(config.input_embeddings_name)
        except AttributeError:
            raise ValueError(
                f"input_embeddings_name={config.input_embeddings_name!r} is not a module of {type(model).__name__}"
            ) from None
    else:
        module = declared_embedding(model, "input")
        if module is None:
            embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            raise ValueError(
                f"cannot find the input embeddings of {type(model).__name__}: it has no get_input_embeddings(). "
                f"Name the module with {type(config).__name__}(input_embeddings_name=...), e.g. one of {embeddings[:5]}"
            )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"the input embeddings {type(module).__name__} have no 2-D weight (vocab, dim); name the token embedding "
            f"with {type(config).__name__}(input_embeddings_name=...)"
        )
    return module


def _init_token_ids(config: PromptTuningConfig, n: int) -> list[int]:
    """Token ids of the init text, repeated to ``n`` ids or cut to the first ``n`` (as peft does)."""
    tokenizer = config.tokenizer if config.tokenizer is not None else config.tokenizer_name_or_path
    text = config.prompt_tuning_init_text
    if not tokenizer:  # checked here, not in the config: a saved config loads without its runtime tokenizer
        raise ValueError(
            "prompt_tuning_init='TEXT' needs a tokenizer: tokenizer=<tokenizers.Tokenizer or callable> or "
            "tokenizer_name_or_path=<path to tokenizer.json or its folder>"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else str(tokenizer)
        if not os.path.isfile(path):
            raise ValueError(
                f"tokenizer_name_or_path={tokenizer!r}: no tokenizer.json there. minipeft does not download "
                "tokenizers; give a local tokenizer.json (or its folder), a tokenizers.Tokenizer or a callable"
            )
        tokenizer = path
    # A tokenizers.Tokenizer (or one of its convenience classes, which wrap one), without the
    # padding (to a fixed length) and truncation a tokenizer.json may carry: the text's own
    # tokens, as transformers' tokenizer gives them to peft.
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    if isinstance(tokenizer, str) or isinstance(inner, Tokenizer):
        ids = load_tokenizer(inner).encode(text).ids
    elif hasattr(tokenizer, "encode") and hasattr(tokenizer, "token_to_id"):  # tokenizers-like: as it is
        ids = tokenizer.encode(text).ids
    elif callable(tokenizer):
        ids = tokenizer(text)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    else:
        raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, a path or a callable, got {type(tokenizer).__name__}")
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={text!r} tokenizes to no tokens")
    used = config.num_virtual_tokens  # n of the n rows per stack; an encoder-decoder's table has 2n, the first n used
    if len(ids) > used:
        warnings.warn(
            f"prompt_tuning_init_text has {len(ids)} tokens but num_virtual_tokens={used}: only the first {used} are "
            "used to initialise the prompt (as in peft). Raise num_virtual_tokens to keep the whole text.",
            stacklevel=3,
        )
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptEmbedding(nn.Module):
    """The prompt ``P`` (n, d), learned directly as a table (P-tuning's subclass computes it), and
    the rewrite of a forward call that puts it in front."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.task_type = config.task_type
        # peft sizes the table n * num_transformer_submodules (2 for encoder-decoder models).
        total = config.num_virtual_tokens * (config.num_transformer_submodules or 1)
        self.embedding = nn.Embedding(total, config.token_dim, device=word_embeddings.weight.device)
        self._word_embeddings = [word_embeddings]  # a list keeps it out of this module's state dict
        self._encoder_hooks: list = []  # encoder-decoder models: the hook on the encoder stack
        self._owner: list[vt.PromptEncoderDict] = []  # and the container that says which prompt is active
        self._encoder_parameters: list[str] = []  # the encoder's forward parameters, to name positional args
        self.initialise(config, word_embeddings)

    def initialise(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        """Start the table as ``config.prompt_tuning_init`` says (it is standard normal already)."""
        init = config.prompt_tuning_init
        if init == PromptTuningInit.RANDOM or config.inference_mode:
            return
        total, device = self.embedding.weight.shape[0], word_embeddings.weight.device
        if init == PromptTuningInit.TEXT:
            ids = torch.tensor(_init_token_ids(config, total), device=device)
            vocab = word_embeddings.weight.shape[0]
            if ((ids < 0) | (ids >= vocab)).any():
                raise ValueError(
                    f"the tokenizer gives prompt_tuning_init_text the token id {ids[(ids < 0) | (ids >= vocab)][0].item()}, "
                    f"outside the model's {vocab} input embeddings: tokenizer and model differ (tokenizer_name_or_path)"
                )
        else:
            ids = torch.randint(0, word_embeddings.weight.shape[0], (total,), device=device)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids).float())

    def rows(self) -> torch.Tensor:
        """The virtual tokens' embeddings, (total, d): here the table itself."""
        return self.embedding.weight

    def prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt for a batch, ``(B, n, d)``; expand shares the storage, gradients sum over the batch."""
        return self.rows()[: self.num_virtual_tokens].to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def virtual_tokens(self, batch: int) -> torch.Tensor:
        """Every row of the table for a batch, ``(B, total, d)``, as peft's ``get_prompt`` gives it
        (``total`` is ``2n`` on an encoder-decoder model, whose forward uses the first ``n``)."""
        return self.rows().unsqueeze(0).expand(batch, -1, -1)

    @property
    def word_embeddings(self) -> nn.Module:
        """The model's token embedding, which the prompt is put in front of."""
        return self._word_embeddings[0]

    # -- checkpoints: peft's single tensor ``prompt_embeddings`` (n, d); (2n, d) for SEQ_2_SEQ_LM ------
    def prompt_embeddings(self) -> torch.Tensor:
        return self.rows()

    def check_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"prompt_embeddings has shape {tuple(tensor.shape)}, this adapter expects "
                f"{tuple(self.embedding.weight.shape)} (num_virtual_tokens, times 2 for SEQ_2_SEQ_LM; token_dim): "
                "another num_virtual_tokens, task_type or base model?"
            )

    def has_network(self) -> bool:
        """Whether a network computes the prompt (P-tuning's; a checkpoint holds its output only)."""
        return False

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        self.check_prompt_embeddings(tensor)
        with torch.no_grad():
            self.embedding.weight.copy_(tensor)

    # -- the rewrite of a forward call ---------------------------------------------------------
    def token_labels(self, labels: torch.Tensor, length: int) -> bool:
        """Whether ``labels`` hold one label per token, so the prompt needs ``-100`` in front: by
        task type as in peft (CAUSAL_LM and TOKEN_CLS do; SEQ_CLS targets, even (B, T)-shaped
        multi-label ones, do not), and by shape only when the config names no task type."""
        if self.task_type is None:
            return labels.shape[1] == length
        return self.task_type in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS)

    def prepend_prompt(self, kwargs: dict) -> tuple[int, int]:
        """Replace the call's input by ``inputs_embeds`` with the prompt in front; (B, T) of the input."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids")
            if input_ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds in the forward call")
            embeds = self._word_embeddings[0](input_ids)  # (B, T, d)
        batch, length = embeds.shape[:2]
        kwargs["inputs_embeds"] = torch.cat([self.prompt(batch, embeds.dtype), embeds], dim=1)  # (B, n+T, d)
        kwargs["input_ids"] = None
        return batch, length

    def prepare_call(self, kwargs: dict, model: nn.Module) -> dict:
        n = self.num_virtual_tokens
        cache = next((kwargs[k] for k in vt.CACHE_KWARGS if kwargs.get(k) is not None), None)
        if getattr(cache, "is_compileable", False):  # transformers' fixed-size caches
            raise ValueError("virtual tokens do not fit a static cache (generate(cache_implementation='static')): "
                             "it is sized, and its 4-D mask built, for the real tokens alone. Use the default dynamic cache")
        if kwargs.get("attention_mask") is not None:  # a model may take no attention_mask at all
            kwargs["attention_mask"] = vt.widen_attention_mask(kwargs["attention_mask"], n)
        if self._encoder_hooks:
            # An encoder-decoder model: its encoder's hook adds the prompt (`hook_encoder`); the
            # mask widened here reaches the encoder and the decoder's cross-attention.
            return kwargs
        positions = kwargs.get("position_ids")
        if vt.cache_length(kwargs) > 0:
            # A later generation step: the prompt is in the cache already; only positions move.
            if positions is not None:
                kwargs["position_ids"] = positions + n
            return kwargs

        batch, length = self.prepend_prompt(kwargs)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and self.token_labels(labels, length):
            # No loss on the prompt.
            pad = labels.new_full((batch, n, *labels.shape[2:]), -100)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        if positions is not None:
            if positions.dim() != 2:
                raise ValueError(f"prompt tuning handles position_ids of shape (batch, seq), got {tuple(positions.shape)}")
            first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([first, positions + n], dim=1)
        return kwargs

    def hook_encoder(self, encoder: nn.Module, encoders: vt.PromptEncoderDict) -> None:
        """An encoder-decoder model's prompt: in front of every input of its ``encoder`` stack
        while this prompt is the active one of ``encoders``. The hook is a bound method, not a
        closure, so that a deep copy of the model prompts with the copy's own table."""
        self._owner = [encoders]  # a list: the container is no submodule of its own member
        self._encoder_parameters = vt.forward_parameters(encoder)
        self._encoder_hooks.append(encoder.register_forward_pre_hook(self._prompt_encoder_input, with_kwargs=True))

    def _prompt_encoder_input(self, encoder: nn.Module, args: tuple, kwargs: dict):
        """The model's forward calls the encoder with the mask already widened (by
        ``prepare_call``); ``generate()`` calls it with the user's mask, widened here."""
        if self._owner[0].active_encoder() is not self:
            return None
        kwargs = vt.args_to_kwargs(self._encoder_parameters, args, kwargs)
        _, length = self.prepend_prompt(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
            kwargs["attention_mask"] = vt.widen_attention_mask(mask, self.num_virtual_tokens)
        return (), kwargs

    def remove_hooks(self) -> None:
        for handle in self._encoder_hooks:
            handle.remove()
        self._encoder_hooks.clear()


def encoder_stack(model: nn.Module) -> nn.Module:
    """The encoder of an encoder-decoder model, which takes the prompt: ``model.get_encoder()``."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if not isinstance(encoder, nn.Module) or encoder is model:  # transformers 5 returns the model itself when it has none
        raise ValueError(
            f"prompt tuning puts the prompt in front of an encoder-decoder model's encoder, but "
            f"{type(model).__name__} has no get_encoder() that returns one (transformers' encoder-decoder models do). "
            "Is task_type='SEQ_2_SEQ_LM' meant for this model?"
        )
    return encoder


def attach(
    peft_model: nn.Module, adapter_name: str, config: PromptTuningConfig, encoder_class: type = PromptEmbedding
) -> None:
    """Add a prompt-tuning adapter to ``peft_model`` (fills ``config``'s inferred fields);
    ``encoder_class`` makes the prompt (P-tuning's computes it, ``p_tuning.py``)."""
    model = peft_model.get_base_model()
    encoder_decoder = vt.is_encoder_decoder(model, config)
    prompted = encoder_stack(model) if encoder_decoder else model  # the module whose input gets the prompt
    embeddings = find_input_embeddings(model, config)
    if "inputs_embeds" not in vt.forward_parameters(prompted):
        raise ValueError(
            f"prompt tuning passes the prompt as inputs_embeds, but {type(prompted).__name__}.forward has no "
            "inputs_embeds argument; add one (embed input_ids only when inputs_embeds is None)"
        )
    vt.check_token_dim(config, embeddings.weight.shape[1], f"the input embedding {type(embeddings).__name__}")
    config.token_dim = embeddings.weight.shape[1]
    # As peft: a row block per stack for SEQ_2_SEQ_LM (only the encoder's is used), else one.
    seq2seq = config.task_type == "SEQ_2_SEQ_LM"  # (a TaskType is a str enum: it equals its value)
    config.num_transformer_submodules = config.num_transformer_submodules or (2 if seq2seq else 1)
    config.num_layers = config.num_layers or vt.model_config_value(model, "num_hidden_layers", "n_layer", "num_layers")
    config.num_attention_heads = config.num_attention_heads or vt.model_config_value(
        model, "num_attention_heads", "n_head", "num_heads"
    )
    prompt = encoder_class(config, embeddings)
    encoders = vt.prompt_encoders(peft_model)
    if encoder_decoder:
        prompt.hook_encoder(prompted, encoders)
    encoders[adapter_name] = prompt
    vt.add_modules_to_save(peft_model, adapter_name, config)

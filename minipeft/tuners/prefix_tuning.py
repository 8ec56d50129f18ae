"""Prefix tuning (Li & Liang 2021): learned keys and values in front of every attention layer.

Each adapted attention layer ``l`` gets ``n`` extra key/value positions it attends to, learned
directly while the model stays frozen. For one head with queries ``Q`` (T, d), keys ``K`` and
values ``V`` (S, d) and the layer's prefix ``Pk, Pv`` (n, d):

    attention = softmax(Q [Pk; K]^T / sqrt(d) + [0 | mask]) [Pv; V]

Every query sees every prefix position (the ``0`` block of the mask), causal or not.

Where the prefix goes in: any attention module, no per-architecture table
--------------------------------------------------------------------------
Modern attention calls ``torch.nn.functional.scaled_dot_product_attention(q, k, v, ...)``
(transformers' ``attn_implementation="sdpa"`` does, from its ``sdpa_attention`` integration,
and so does nanoGPT). While an adapted attention module runs, a ``TorchFunctionMode`` catches
that call and re-issues it with the prefix concatenated along the sequence axis of ``k`` and
``v``, ``attn_mask`` widened with visible columns, and ``is_causal=True`` replaced by the
equivalent explicit mask (SDPA's causal mask is aligned top-left, so it cannot express
"causal among real tokens, all prefix visible" by itself). Grouped-query attention works with
either convention: with ``enable_gqa`` the keys arrive with the key/value heads and so does
the prefix; when the model repeats its key/value heads first, the prefix heads are repeated
the same way (``repeat_interleave``).

The attention modules are found by running the model once on a two-token input and noting
which innermost modules call SDPA. A model whose attention does not go through SDPA has none:
that is an error saying so (transformers: load with ``attn_implementation="sdpa"``).
Encoder-decoder models take peft's route instead, a prefix in the decoder's KV cache
(``prefix_tuning_seq2seq.py``): there T5's relative position bias must cover the prefix too.

Positions: the prefix occupies positions ``0..n-1``
---------------------------------------------------
peft passes the prefix as a pre-filled KV cache of length ``n``, so the model numbers the real
tokens from ``n``: position embeddings (GPT-2, BERT) and rotary angles (LLaMA) see ``n+i`` for
token ``i``. minipeft follows that convention so that logits and checkpoints agree: whenever
the model's forward accepts ``position_ids``, they are shifted by ``num_virtual_tokens``
(computed from the cache length when not given). The prefix keys themselves carry no
position (they are stored after any rotary embedding, as in peft's cache). A model whose
forward takes no ``position_ids`` (nanoGPT) keeps its own numbering from 0.

Where the two routes differ, and a peft checkpoint computes otherwise here (a warning names
the first two when the adapter is added):

* a model whose forward takes no ``position_ids`` but numbers its tokens after the cache
  (transformers' ``BartForCausalLM``) counts them from ``n`` in peft, from 0 here;
* a sliding-window model (Mistral, Gemma-3's local layers) hides peft's cached prefix from the
  queries more than its window past it; here every query sees the prefix;
* a model that numbers its tokens from the attention mask (OPT) does so here from ``n`` over
  the pads too: with left padding, the padded rows' positions differ from peft's.

Parameters and checkpoints (peft's layout)
------------------------------------------
``prompt_encoder.<adapter>.embedding.weight`` is (n, layers * 2 * token_dim): for each virtual
token, layer by layer, the key then the value, each ``heads x head_dim`` with ``heads`` the
key/value heads. With ``prefix_projection`` the table is (n, token_dim) and a two-layer MLP
``Linear -> tanh -> Linear`` produces that row (a reparametrisation that trains more stably);
it is folded away for inference: the checkpoint stores only the MLP's output, peft's
``prompt_embeddings``, and an adapter loaded for inference holds that table directly.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import PeftType
from ..targeting import logical_name, name_matches
from . import virtual_tokens as vt
from .base import evaluating

SDPA = F.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class PrefixTuningConfig(vt.PromptLearningConfig):
    """Prefix tuning hyper-parameters, with peft's field names.

    num_layers / token_dim / num_attention_heads: inferred from the model (the number of
    adapted attention modules, on an encoder-decoder model of decoder layers; the key/value
    heads and their width), as peft records them.
    prefix_projection: learn the prefix through a ``token_dim -> encoder_hidden_size ->
    layers*2*token_dim`` MLP (``encoder_hidden_size`` defaults to ``token_dim``).
    init_weights: ``None`` (standard normal) or ``"zero"`` (zero keys and values: each prefix
    position still takes attention mass ``exp(0)`` but adds nothing to the output).
    target_modules (minipeft only): which attention modules get a prefix, by name (exact,
    dotted suffix or full regex); default every module that calls SDPA (not for encoder-decoder
    models, where every decoder layer gets one). When given it is saved
    in ``adapter_config.json``, since the saved prefix has one row block per selected layer and
    a reload must select the same layers. peft has no such field: it ignores the key (with a
    warning) and cannot load a prefix for fewer layers than the model has.
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    target_modules: list[str] | str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.target_modules is None:
            del out["target_modules"]  # every layer, the only layout peft knows: its file stays peft's
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")


# -- finding the attention modules --------------------------------------------------------------
class _RecordSDPA(TorchFunctionMode):
    """Notes the innermost running module of every SDPA call, with the key's shape."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: dict[str, tuple[int, ...]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and self.stack:
            call = dict(zip(SDPA_ARGS, args), **kwargs)
            self.calls.setdefault(self.stack[-1], tuple(call["key"].shape))
        return func(*args, **kwargs)


def find_attention_modules(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{module name: key shape (B, heads, S, head_dim)}`` for every module that calls SDPA,
    in model order, found by one forward pass on a two-token input."""
    stack: list[str] = []
    handles = []
    def leave(module, args, output) -> None:  # returns None: a forward hook's return value replaces the output
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name) and None))
        handles.append(module.register_forward_hook(leave, always_call=True))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    recorder = _RecordSDPA(stack)
    try:
        with evaluating(model), torch.no_grad(), recorder:
            model(torch.zeros(1, 2, dtype=torch.long, device=device))
    except Exception as err:
        raise ValueError(
            f"prefix tuning runs {type(model).__name__} once on token ids of shape (1, 2) to find its attention "
            f"modules, and that call failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    order = [name for name, _ in model.named_modules()]
    found = {name: recorder.calls[name] for name in order if name in recorder.calls}
    if not found:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        hint = f" (its config says attn_implementation={impl!r})" if impl else ""
        raise ValueError(
            f"no module of {type(model).__name__} calls torch.nn.functional.scaled_dot_product_attention{hint}, and "
            "prefix tuning adds its keys and values at that call. Use SDPA attention: for transformers models load "
            "with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')); in your own attention "
            "call F.scaled_dot_product_attention(q, k, v, ...)."
        )
    return found


# -- the prefix in one SDPA call ------------------------------------------------------------------
def sdpa_with_prefix(prefix_key: torch.Tensor, prefix_value: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ``prefix_key/value`` (heads, n, head_dim) in front."""
    call = dict(zip(SDPA_ARGS, args), **kwargs)
    query, key, value = call["query"], call["key"], call["value"]
    if key.dim() != 4:
        raise ValueError(f"prefix tuning expects SDPA keys of shape (batch, heads, seq, head_dim), got {tuple(key.shape)}")
    batch, heads, length, head_dim = key.shape
    prefix_heads, n, prefix_dim = prefix_key.shape
    if prefix_dim != head_dim or heads % prefix_heads:
        raise ValueError(
            f"the prefix has {prefix_heads} heads of width {prefix_dim}, but this attention has keys with {heads} heads "
            f"of width {head_dim}; set num_attention_heads and token_dim of PrefixTuningConfig to match (or leave "
            "them unset to infer them)"
        )
    if heads != prefix_heads:  # the model repeated its key/value heads (GQA without enable_gqa)
        prefix_key = prefix_key.repeat_interleave(heads // prefix_heads, dim=0)
        prefix_value = prefix_value.repeat_interleave(heads // prefix_heads, dim=0)
    call["key"] = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)  # (B, H, n+S, D)
    call["value"] = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)

    mask = call.get("attn_mask")
    if call.get("is_causal"):
        # SDPA's causal mask is top-left aligned: query i sees keys 0..i of the real keys.
        mask = torch.ones(query.shape[-2], length, dtype=torch.bool, device=query.device).tril()
        call["is_causal"] = False
    if mask is not None:
        mask = mask.expand(*mask.shape[:-1], length)
        visible = mask.new_ones(*mask.shape[:-1], n) if mask.dtype == torch.bool else mask.new_zeros(*mask.shape[:-1], n)
        call["attn_mask"] = torch.cat([visible, mask], dim=-1)  # (..., T, n+S)
    return SDPA(**call)


class _PrefixSDPA(TorchFunctionMode):
    """Active while one adapted attention module runs: its SDPA calls get that layer's prefix."""

    def __init__(self, prefix_key: torch.Tensor, prefix_value: torch.Tensor) -> None:
        super().__init__()
        self.prefix = (prefix_key, prefix_value)
        self.calls = 0  # none by the end of the module's forward: the prefix went nowhere

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            self.calls += 1
            return sdpa_with_prefix(*self.prefix, *args, **kwargs)
        return func(*args, **kwargs)


# -- the learned prefix ---------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The prefix of every adapted layer, and the hooks that put it into their attention."""

    def __init__(self, config: PrefixTuningConfig, layer_names: list[str], device=None) -> None:
        super().__init__()
        n, d, layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.num_virtual_tokens = n
        self.heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.layer_of = {name: i for i, name in enumerate(layer_names)}  # attention module -> layer index
        self.shape = (n, layers * 2 * d)  # peft's prompt_embeddings
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or d
            self.embedding = nn.Embedding(n, d, device=device)
            self.transform = nn.Sequential(
                nn.Linear(d, hidden, device=device), nn.Tanh(), nn.Linear(hidden, layers * 2 * d, device=device)
            )
        else:
            self.embedding = nn.Embedding(n, layers * 2 * d, device=device)
            self.transform = None
        if config.init_weights == "zero":
            last = self.transform[-1] if self.transform is not None else None
            nn.init.zeros_(last.weight if last is not None else self.embedding.weight)
            if last is not None:
                nn.init.zeros_(last.bias)
        self._handles: list = []
        self._owner: list[vt.PromptEncoderDict] = []  # set by hook: the container that says which adapter is active
        self._modes: dict[str, list[_PrefixSDPA]] = {}  # per adapted module: its SDPA mode while it runs
        self._takes_positions = False  # set by hook: whether the model's forward has position_ids
        self._checkpointed: list[nn.Module] = []  # set by hook: modules with transformers' gradient_checkpointing flag
        self._table: torch.Tensor | None = None  # prompt_embeddings() of the running forward

    def prompt_embeddings(self) -> torch.Tensor:
        """Every layer's keys and values, (n, layers * 2 * heads * head_dim)."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) of one layer, each (heads, n, head_dim)."""
        n = self.num_virtual_tokens
        table = self._table if self._table is not None else self.prompt_embeddings()
        kv = table.view(n, -1, 2, self.heads, self.head_dim)[:, layer]  # (n, 2, H, D)
        kv = kv.permute(1, 2, 0, 3)  # (2, H, n, D)
        return kv[0], kv[1]

    def layers_read(self) -> list[int]:
        """The layer of the table each adapted attention reads, in the model's order."""
        return list(range(len(self.layer_of)))

    def virtual_tokens(self, batch: int, dtype: torch.dtype | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Every adapted layer's prefix for a batch, ``((key, value), ...)``, each ``(B, heads, n,
        head_dim)``: the legacy ``past_key_values`` layout. The MLP, if any, runs once for all layers."""
        self._table = self.prompt_embeddings()
        try:
            prefixes = [self.layer_prefix(layer) for layer in self.layers_read()]
        finally:
            self._table = None
        return tuple(
            tuple(t.to(dtype or t.dtype).unsqueeze(0).expand(batch, -1, -1, -1) for t in kv) for kv in prefixes
        )

    def has_network(self) -> bool:
        """Whether the reparametrisation MLP computes the table (a checkpoint holds its output only)."""
        return self.transform is not None

    def fold(self) -> None:
        """Replace the reparametrisation MLP by the table it produces (same outputs, no MLP)."""
        if self.transform is None:
            return
        with torch.no_grad():
            table = self.prompt_embeddings().detach().clone()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=not self.embedding.weight.requires_grad)
        self.transform = None

    # -- checkpoints: peft's single tensor ``prompt_embeddings`` ------------------------------
    def check_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape:
            raise ValueError(
                f"prompt_embeddings has shape {tuple(tensor.shape)}, this prefix-tuning adapter expects {self.shape} "
                "(num_virtual_tokens, num_layers * 2 * token_dim): another base model or other target_modules?"
            )

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        """Load a saved (folded) prefix; an unfolded MLP is folded first, as only its output is saved."""
        self.check_prompt_embeddings(tensor)
        self.fold()
        with torch.no_grad():
            self.embedding.weight.copy_(tensor)

    # -- applying it ------------------------------------------------------------------------
    def prepare_call(self, kwargs: dict, model: nn.Module) -> dict:
        """Number the real tokens from ``n``, as if the prefix were ``n`` cached tokens (see above),
        and compute every layer's prefix once for this forward (the MLP runs once, not per layer)."""
        checkpointing = torch.is_grad_enabled() and any(m.gradient_checkpointing for m in self._checkpointed)
        # Under activation checkpointing each layer recomputes its prefix in backward; its first
        # forward must then compute it the same way (no shared table), or the recomputation differs.
        self._table = None if checkpointing else self.prompt_embeddings()
        if self._takes_positions:
            positions = kwargs.get("position_ids")
            if positions is None:
                batch, length, device = vt.batch_and_length(kwargs)
                past = vt.cache_length(kwargs)
                positions = torch.arange(past, past + length, device=device).expand(batch, length)
            kwargs["position_ids"] = positions + self.num_virtual_tokens
        return kwargs

    def hook(self, model: nn.Module, encoders: vt.PromptEncoderDict) -> None:
        """Put the prefix into each adapted attention module's SDPA calls while this encoder is
        the active one of ``encoders``. The hooks are this object's bound methods (``partial``
        names the module), not closures: a deep copy of the model gets hooks that read the
        copy's prefix, and the model pickles."""
        self._owner = [encoders]  # a list: the container is no submodule of its own member
        self._takes_positions = "position_ids" in vt.forward_parameters(model)
        self._checkpointed = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        self._handles.append(model.register_forward_hook(self._forget_table, always_call=True))
        modules = dict(model.named_modules())
        for name in self.layer_of:
            self._modes[name] = []
            self._handles.append(modules[name].register_forward_pre_hook(functools.partial(self._enter, name)))
            self._handles.append(modules[name].register_forward_hook(functools.partial(self._leave, name),
                                                                     always_call=True))

    def _forget_table(self, model: nn.Module, args, output) -> None:
        self._table = None  # a recomputation (activation checkpointing) makes its own

    def _enter(self, name: str, module: nn.Module, args) -> None:
        if self._owner[0].active_encoder() is self:
            mode = _PrefixSDPA(*self.layer_prefix(self.layer_of[name]))
            mode.__enter__()
            self._modes[name].append(mode)

    def _leave(self, name: str, module: nn.Module, args, output) -> None:  # None: keeps the output
        if not self._modes[name]:
            return
        mode = self._modes[name].pop()
        mode.__exit__(None, None, None)
        if mode.calls == 0 and output is not None:  # (None: the forward raised, and that error goes on)
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise RuntimeError(
                f"prefix tuning: {name!r} ran without calling torch.nn.functional.scaled_dot_product_attention"
                + (f" (attn_implementation={impl!r})" if impl else "") + ", so its prefix was not applied; prefix "
                "tuning adds its keys and values at that call. Was the attention implementation changed after the "
                "adapter was added? Use SDPA attention (transformers: model.set_attn_implementation('sdpa'))"
            )

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _select_attention_modules(
    config: PrefixTuningConfig, model: nn.Module, found: dict[str, tuple[int, ...]]
) -> list[str]:
    """The attention modules that get a prefix: every one ``found`` (those that call SDPA), or
    those ``config.target_modules`` selects among them."""
    names = list(found)
    if config.target_modules is None:
        return names
    # Matched by logical name: an attention module inside another adapter's wrapper keeps its name.
    logical = {n: logical_name(model, n) or n for n in names}
    names = [n for n in names if name_matches(logical[n], config.target_modules)]
    if not names:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched none of the attention modules that call SDPA: "
            f"{list(logical.values())[:6]}"
        )
    return names


def fill_shape_fields(config: PrefixTuningConfig, model: nn.Module, key_shapes: list[tuple[int, ...]]) -> None:
    """Fill num_layers / token_dim / num_attention_heads (and peft's bookkeeping fields) from the
    key shapes (B, heads, S, head_dim) of the prefixed layers (attention modules, or an
    encoder-decoder's decoder layers), one per layer; a field the config gives must agree with the model."""
    shapes = {shape[1:2] + shape[3:] for shape in key_shapes}  # (heads, head_dim) of each layer's keys
    if len(shapes) > 1:
        raise ValueError(f"the attention modules have keys of different shapes (heads, head_dim): {sorted(shapes)}; "
                         "select modules of one shape with target_modules")
    heads, head_dim = shapes.pop()
    kv_heads = vt.model_config_value(model, "num_key_value_heads")
    # A grouped-query model's sizes over all its attention heads, which peft accepts as given and
    # converts to those of its key/value heads, the ones found here: they agree too.
    all_heads = vt.model_config_value(model, "num_attention_heads")
    full = {"num_attention_heads": all_heads, "token_dim": all_heads * head_dim} if all_heads else {}
    if kv_heads and heads % kv_heads == 0:
        heads = kv_heads  # the probe saw repeated key/value heads; peft stores the prefix per kv head
    layers = len(key_shapes)
    wanted: dict[str, Any] = {"num_layers": layers, "num_attention_heads": heads, "token_dim": heads * head_dim}
    for field, value in wanted.items():
        given = getattr(config, field)
        if given is not None and given != value and given != full.get(field):
            raise ValueError(
                f"{field}={given} does not match the model: it has {value} ({layers} prefixed layers with keys "
                f"of {heads} heads x {head_dim}). Leave {field} unset to infer it, or set {field}={value}."
            )
        setattr(config, field, value)
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim  # as peft records it, projection or not


def _differences_from_peft(model: nn.Module, n: int) -> list[str]:
    """What makes prefix tuning on this transformers model compute otherwise than peft's cache
    route (module docstring), said once, when the adapter is added."""
    config = getattr(model, "config", None)
    if config is None:
        return []  # not a transformers model: no peft route to compare with
    said = []
    if "position_ids" not in vt.forward_parameters(model):
        said.append(f"prefix tuning on {type(model).__name__}, whose forward takes no position_ids: its real tokens are "
                    f"numbered from 0 here and from {n} in peft (after its cached prefix), so a checkpoint gives other "
                    "logits in the two libraries")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
    if (isinstance(window, int) and getattr(config, "use_sliding_window", True) is not False
            and "sliding_attention" in layer_types):
        said.append(f"prefix tuning on {type(model).__name__}, which attends within a sliding window of {window} tokens: "
                    f"here every query sees the prefix, in peft (a cached prefix) only those less than {window - n} "
                    f"tokens past it, so on longer sequences a checkpoint gives other logits in the two libraries")
    return said


def attach(peft_model: nn.Module, adapter_name: str, config: PrefixTuningConfig) -> None:
    """Add a prefix-tuning adapter to ``peft_model`` (fills ``config``'s inferred fields)."""
    model = peft_model.get_base_model()
    # Probe and infer before creating the container: a failure must leave no hook on the user's model.
    with vt.adapters_off(peft_model):
        if vt.is_encoder_decoder(model, config):  # the decoder's KV cache instead of SDPA hooks
            from .prefix_tuning_seq2seq import decoder_cache_prefix  # (that module builds on this one)

            encoder = decoder_cache_prefix(model, config)
        else:
            found = find_attention_modules(model)
            names = _select_attention_modules(config, model, found)
            fill_shape_fields(config, model, [found[n] for n in names])
            encoder = PrefixEncoder(config, names, device=next((p.device for p in model.parameters()), None))
            for difference in _differences_from_peft(model, config.num_virtual_tokens):
                warnings.warn(difference, stacklevel=4)
    encoders = vt.prompt_encoders(peft_model)
    encoder.hook(model, encoders)
    encoders[adapter_name] = encoder
    vt.add_modules_to_save(peft_model, adapter_name, config)

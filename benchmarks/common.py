"""Shared pieces of the minipeft-vs-peft benchmarks: the models, the LoRA config, twin
models with identical adapters, timing, memory, and the results files.

Both libraries get the same inputs: one transformers config, one seed, the same LoRA
hyper-parameters (given as the same keyword arguments to both ``LoraConfig``s), the same
adapter weights (copied from peft into minipeft through the shared parameter names) and the
same batches. On a float32 base they then do the same math. On a bf16 / fp16 base each runs
its own default, which differs: both keep float32 adapter weights, but peft casts x to
float32 in every LoRA layer and runs the adapter in float32, while minipeft casts A and B
down to the input's dtype (and its fused kernel runs in that dtype). ``same_adapter_dtype``
gives both half-precision adapters instead (peft's ``autocast_adapter_dtype=False``, and
minipeft's adapter parameters cast to the base's dtype), so that the math is identical.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minipeft.atomic import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0


# -- command line ------------------------------------------------------------------------------
def argument_parser(description: str, same_adapter_dtype: bool = False) -> argparse.ArgumentParser:
    """The options every side-by-side script takes: where it runs, its CPU threads, where its
    results go (and, for the scripts that time a bf16 model, ``--same-adapter-dtype``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU intra-op threads (default 1: steadiest on a shared machine; CUDA ignores it)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="results folder: the table becomes a section of <folder>/<device>.md and .json")
    if same_adapter_dtype:
        parser.add_argument("--same-adapter-dtype", action="store_true",
                            help="on a bf16 base, bf16 adapters in both libraries (peft autocast_adapter_dtype=False, "
                                 "minipeft's adapters cast): identical math instead of each library's default")
    return parser


def prepare_device(args: argparse.Namespace) -> None:
    """Stop when CUDA is asked for and absent; on the CPU, use ``--threads`` threads."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)


# -- models ------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One benchmark model: its transformers class and config, and the batch it trains on."""

    family: str  # "llama", "gpt2", "bert"
    config: dict  # keyword arguments of the transformers config class
    batch: int
    seq: int
    dtype: torch.dtype


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (0 steps or threads would time nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a count of at least 0 (warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated counts, each at least 1 (batch sizes)."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1 separated by commas, e.g. 1,32; got {text!r}") from None


def model_names(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """argparse type: comma-separated benchmark model families, each one that ``model_specs``
    has (and, given ``allowed``, one of those)."""
    names = text.split(",")
    known = sorted(allowed or model_specs("cpu"))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown} here; choose from {known}")
    return names


def model_specs(device: str) -> dict[str, ModelSpec]:
    """Quick CPU models (the whole quick run takes a minute or two) or the GPU set."""
    if device == "cpu":
        f32 = torch.float32
        return {
            "llama": ModelSpec("llama", dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4), 4, 64, f32),
            "gpt2": ModelSpec("gpt2", dict(vocab_size=2048, n_embd=256, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=0, eos_token_id=0), 4, 64, f32),
            "bert": ModelSpec("bert", dict(vocab_size=2048, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=1024), 4, 64, f32),
        }
    bf16 = torch.bfloat16
    return {
        # ~0.94B parameters, LLaMA-style (the target of the GPU figures).
        "llama": ModelSpec("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                         num_attention_heads=16, num_key_value_heads=16,
                                         max_position_embeddings=2048), 4, 1024, bf16),
        # GPT-2 medium and a BERT of the same size (~350M).
        "gpt2": ModelSpec("gpt2", dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024), 8, 1024, bf16),
        "bert": ModelSpec("bert", dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                       intermediate_size=4096), 16, 512, bf16),
    }


def build_base_model(spec: ModelSpec, device: str, dtype: torch.dtype | None = None, seed: int = SEED):
    """The pretrained-model stand-in: random weights from ``seed`` (no model hub here)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "bert": (transformers.BertConfig, transformers.BertForMaskedLM),
    }[spec.family]
    # Dropout in the base model would make the two libraries' losses differ for reasons that
    # have nothing to do with LoRA; only the adapters' own dropout stays.
    config = config_cls(**spec.config, attn_implementation="sdpa")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1B model initialised on CPU takes minutes
        model = model_cls(config)
    return model.to(dtype=dtype or spec.dtype)


# All linear layers of the transformer blocks (not the embeddings, not the output head,
# not BERT's pooler or MLM transform): a full-match regex, read the same way by both libraries.
TARGETS = {
    "llama": r".*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "gpt2": r".*\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
    "bert": r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
}


def lora_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The LoRA hyper-parameters, passed unchanged to both libraries' ``LoraConfig``."""
    return dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS[family],
                fan_in_fan_out=family == "gpt2")  # GPT-2's Conv1D stores its weight (in, out)


def oft_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The OFT hyper-parameters, for both libraries' ``OFTConfig``: 32 x 32 blocks (peft's default),
    the Neumann series. ``dropout`` is not used: module_dropout stays 0, because peft 0.21 ignores
    it where minipeft applies it, and the two would not run the same math."""
    if family == "gpt2":
        raise SystemExit("peft's OFT does not adapt GPT-2's Conv1D layers: compare OFT on llama or bert")
    return dict(oft_block_size=32, target_modules=TARGETS[family])


def hra_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The HRA hyper-parameters, for both libraries' ``HRAConfig``: 8 reflections (peft's default).
    ``dropout`` is not used: HRA has none."""
    if family == "gpt2":
        raise SystemExit("peft's HRA does not adapt GPT-2's Conv1D layers: compare HRA on llama or bert")
    return dict(r=8, target_modules=TARGETS[family])


def fourierft_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The FourierFT hyper-parameters, for both libraries' ``FourierFTConfig``: peft's defaults (1000
    coefficients, scaling 150, drawn at random). ``dropout`` is not used: FourierFT has none."""
    return dict(target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2")


def boft_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The BOFT hyper-parameters, for both libraries' ``BOFTConfig``: 8 x 8 blocks, one butterfly
    factor, which is all peft computes without its CUDA extension (``peft_without_extension``).
    ``dropout`` is not used: boft_dropout stays 0, whose blocks are drawn at random in each forward."""
    if family == "gpt2":
        raise SystemExit("peft's BOFT does not adapt GPT-2's Conv1D layers: compare BOFT on llama or bert")
    return dict(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=TARGETS[family])


def miss_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The MiSS hyper-parameters, for both libraries' ``MissConfig``: peft's defaults (r = 64, the
    "balance" variant), with ``dropout`` on the input of its term."""
    if family == "gpt2":
        raise SystemExit("peft's MiSS does not adapt GPT-2's Conv1D layers: compare MiSS on llama or bert")
    return dict(r=64, miss_dropout=dropout, target_modules=TARGETS[family])


def road_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The RoAd hyper-parameters, for both libraries' ``RoadConfig``: road_1 (peft's default) in groups
    of 16 (peft's 64 does not divide the LLaMA MLP's 688 features). ``dropout`` is not used: RoAd has none."""
    if family == "gpt2":
        raise SystemExit("peft's RoAd does not adapt GPT-2's Conv1D layers: compare RoAd on llama or bert")
    return dict(group_size=16, target_modules=TARGETS[family])


def c3a_kwargs(family: str, dropout: float = 0.1) -> dict:
    """The C3A hyper-parameters, for both libraries' ``C3AConfig``: blocks of 16 (peft's 256 does not
    divide the LLaMA MLP's 688 features), peft's default init. ``dropout`` is not used: C3A has none.
    peft's input gradients are wrong (tuners/c3a.py): the parity check compares the loss alone."""
    if family == "gpt2":
        raise SystemExit("peft's C3A does not adapt GPT-2's Conv1D layers: compare C3A on llama or bert")
    return dict(block_size=16, target_modules=TARGETS[family])


def peft_without_extension() -> None:
    """peft's BOFT as it runs where its CUDA extension is not built (any CPU; a GPU machine without
    ninja and nvcc): its one-factor path. Without this, peft tries to compile the extension again
    for every layer it adapts."""
    from peft.tuners.boft import layer

    layer.get_fbd_cuda = lambda: None


@dataclass(frozen=True)
class Method:
    """A method both libraries have under one config name, as the side-by-side scripts run it."""

    config_class: str  # the config's class name in both libraries
    kwargs: Callable[[str, float], dict]  # (model family, dropout) -> the config's keyword arguments
    marker: str  # a substring of the name of every adapter tensor
    description: str  # for the results tables
    peft_gradients_wrong: str = ""  # why peft's adapter gradients are no reference (the parity then checks the loss)
    families: tuple[str, ...] = ("llama", "gpt2", "bert")  # those peft's method adapts (not all take GPT-2's Conv1D)


NO_CONV1D = ("llama", "bert")  # the families left where peft's method does not adapt GPT-2's Conv1D
METHODS = {
    "lora": Method("LoraConfig", lora_kwargs, ".lora_", "LoRA r=16, alpha=32, dropout 0.1"),
    "oft": Method("OFTConfig", oft_kwargs, ".oft_", "OFT with 32 x 32 blocks (Neumann series, no module dropout)",
                  families=NO_CONV1D),
    "hra": Method("HRAConfig", hra_kwargs, ".hra_", "HRA with 8 reflections", families=NO_CONV1D),
    "boft": Method("BOFTConfig", boft_kwargs, ".boft_", "BOFT with 8 x 8 blocks, one butterfly factor", families=NO_CONV1D),
    "miss": Method("MissConfig", miss_kwargs, ".miss_", "MiSS r=64 (balance), dropout 0.1", families=NO_CONV1D),
    "road": Method("RoadConfig", road_kwargs, ".road_", "RoAd road_1, groups of 16", families=NO_CONV1D),
    "c3a": Method("C3AConfig", c3a_kwargs, ".c3a_", "C3A with 16 x 16 circulant blocks", families=NO_CONV1D,
                  peft_gradients_wrong="peft 0.21's C3A backward sends a wrong input gradient to the layers before"),
    "fourierft": Method("FourierFTConfig", fourierft_kwargs, ".fourierft_", "FourierFT, 1000 coefficients per layer"),
}


def make_batches(spec: ModelSpec, n: int, device: str, batch: int | None = None, seq: int | None = None,
                 seed: int = 1) -> list[dict]:
    """``n`` batches of random tokens; the labels are the inputs (causal LM / MLM on every token)."""
    g = torch.Generator().manual_seed(seed)
    vocab = spec.config.get("vocab_size")
    shape = (batch or spec.batch, seq or spec.seq)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, shape, generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def adapter_dtypes(base_dtype: torch.dtype, same_adapter_dtype: bool) -> str:
    """One sentence for the results tables: in which dtype each library runs the adapters."""
    if base_dtype == torch.float32:
        return "Adapters: float32 weights and inputs in both libraries, the same math."
    half = str(base_dtype).replace("torch.", "")
    if same_adapter_dtype:
        return (f"Adapters: {half} weights in both libraries (`--same-adapter-dtype`: peft with "
                f"`autocast_adapter_dtype=False`, minipeft's adapter parameters cast to {half}), the same math in the same dtype.")
    return (f"Adapters: each library's default, which is not the same math. Both keep float32 adapter weights "
            f"on the {half} base, but peft casts x to float32 in every LoRA layer and runs the adapter in "
            f"float32, while minipeft casts A and B to {half} and runs the adapter (the fused kernel on CUDA) "
            f"in {half}. `--same-adapter-dtype` compares identical math.")


def lora_model(lib: str, base, family: str, dropout: float = 0.1, same_adapter_dtype: bool = False,
               method: str = "lora"):
    """``base`` with the adapter of ``method`` (LoRA by default) injected by ``lib`` ("minipeft" or
    "peft"). By default each library keeps its own adapter dtype (float32 on a half-precision
    base); ``same_adapter_dtype`` keeps both in the base's dtype (see the module docstring)."""
    import peft

    import minipeft

    spec = METHODS[method]
    config = dict(spec.kwargs(family, dropout))
    if lib == "peft":
        if method == "boft":
            peft_without_extension()
        return peft.get_peft_model(base, getattr(peft, spec.config_class)(**config),
                                   autocast_adapter_dtype=not same_adapter_dtype)
    model = minipeft.get_peft_model(base, getattr(minipeft, spec.config_class)(**config))
    if same_adapter_dtype:
        dtype = next(base.parameters()).dtype
        for name, p in model.named_parameters():
            if spec.marker in name:
                p.data = p.data.to(dtype)
    return model


def build_twins(spec: ModelSpec, device: str, dtype: torch.dtype | None = None, dropout: float = 0.1,
                same_adapter_dtype: bool = False, method: str = "lora"):
    """(minipeft model, peft model): the same base model built twice from one seed, the adapter
    injected by each library, then peft's adapter weights copied into minipeft under the shared
    names, drawn first so that the adapters matter (LoRA's B nonzero, OFT's rotations not I)."""
    bases = [build_base_model(spec, device, dtype) for _ in range(2)]
    for (name, a), b in zip(bases[0].state_dict().items(), bases[1].state_dict().values()):
        assert torch.equal(a, b), f"the two base models differ at {name}"

    mp = lora_model("minipeft", bases[0], spec.family, dropout, same_adapter_dtype, method)
    pf = lora_model("peft", bases[1], spec.family, dropout, same_adapter_dtype, method)

    marker = METHODS[method].marker
    drawn = {"lora": ".lora_B.", "boft": ".boft_R", "road": ".road_theta"}.get(method, marker)  # (scales stay 1)
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in pf.named_parameters():
            if drawn in name:
                p.normal_(std=0.1)
    adapter_state = {k: v for k, v in pf.state_dict().items() if marker in k}
    missing, unexpected = mp.load_state_dict(adapter_state, strict=False)
    assert not unexpected, f"peft adapter names minipeft does not have: {unexpected[:3]}"
    assert not [k for k in missing if marker in k], "minipeft has adapter weights peft did not provide"
    n_mp = sum(p.numel() for p in mp.parameters() if p.requires_grad)
    n_pf = sum(p.numel() for p in pf.parameters() if p.requires_grad)
    assert n_mp == n_pf, f"trainable parameters differ: minipeft {n_mp}, peft {n_pf}"
    return mp, pf


# -- timing ------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(fn(), wall seconds), with the device synchronised on both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


def alternate(fns: dict, rounds: int, device: str, warmup: int = 0) -> dict[str, dict[str, list[float]]]:
    """Run each function once a round, in an order that flips every round (so drift in the
    machine's load hits every function alike). Returns, per function, the wall seconds and
    the process CPU seconds of each timed round.

    On a CPU shared with other jobs the wall time also counts the time spent waiting for a
    core; the process CPU time (with one intra-op thread, all of it this thread's) counts
    only the work, so it is the steadier measure there. On CUDA only wall time means much."""
    times = {k: {"wall": [], "cpu": []} for k in fns}
    names = list(fns)
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            c0 = time.process_time()
            _, dt = timed(fns[name], device)
            if i >= warmup:
                times[name]["wall"].append(dt)
                times[name]["cpu"].append(time.process_time() - c0)
    return times


def median_times(fns: dict, rounds: int, device: str, reference: str, ratio_key: str) -> dict:
    """``alternate``'s rounds (after one warm-up) as medians: ``s`` in the clock that means most
    here (process CPU time on the CPU, wall time on CUDA), ``wall_s``, and under ``ratio_key``
    each function's ``s`` over ``reference``'s."""
    times = alternate(fns, rounds, device, warmup=1)
    clock = "cpu" if device == "cpu" else "wall"
    med = {name: median(t[clock]) for name, t in times.items()}
    return {"s": med, "wall_s": {name: median(t["wall"]) for name, t in times.items()},
            ratio_key: {name: med[name] / med[reference] for name in fns}}


# -- memory ------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory(device: str) -> int:
    """Start a new peak measurement; returns the bytes in use now (the baseline).

    CUDA: the caching allocator's counters. CPU: the process's resident set size, after
    handing freed heap pages back to the OS (malloc_trim) and resetting the kernel's
    high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_memory(device: str) -> int:
    """Peak bytes since ``reset_peak_memory``: max_memory_allocated, or the peak RSS (VmHWM)."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024


# -- machine, versions, results files ------------------------------------------------------------
def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"



def device_slug(device: str) -> str:
    return "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", machine(device).lower()).strip("-")


def versions() -> dict[str, str]:
    import peft
    import transformers

    import minipeft

    try:  # the commit the numbers belong to, marked dirty where the code differs from it
        repo = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        # (the results files themselves do not count: the first script of `make bench` writes them)
        changed = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"], cwd=repo,
                                 capture_output=True, text=True).stdout.strip()
        rev += "-dirty" if rev and changed else ""
    except OSError:
        rev = ""
    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "peft": peft.__version__, "minipeft": minipeft.__version__ + (f" (git {rev})" if rev else "")}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
        matmul = torch.backends.cuda.matmul  # (allow_tf32 cannot be read once fp32_precision was set)
        found["tf32 matmul"] = getattr(matmul, "fp32_precision", None) or str(matmul.allow_tf32)
    return found


def command_line() -> str:
    """The command as run: this interpreter (``.venv/bin/python`` from the repository root, or
    the GPU machine's own ``python3``), the script relative to the repository, its arguments."""
    root = Path(__file__).resolve().parents[1]
    paths = []
    for path in (Path(sys.executable), Path(sys.argv[0]).resolve()):
        try:
            paths.append(str(path.relative_to(root)))
        except ValueError:
            paths.append(str(path))
    return " ".join([*paths, *sys.argv[1:]])


_WRITTEN_HERE: set[tuple[Path, str]] = set()  # sections this process wrote (a script may rewrite its own often)


def write_results(device: str, section: str, data: dict, markdown: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Store one script's results as a section of ``<results_dir>/<slug>.json`` and re-render
    ``<results_dir>/<slug>.md`` from every section (the scripts share the files).

    Both files are replaced atomically: a run that dies while writing leaves the results of
    the earlier runs as they were, not a truncated file."""
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    json_path, md_path = results_dir / f"{slug}.json", results_dir / f"{slug}.md"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {}
    doc.setdefault("sections", {})
    earlier = doc["sections"].get(section)
    if earlier is not None and (json_path, section) not in _WRITTEN_HERE:  # (said, not asked: git keeps the old)
        print(f"replacing section {section!r} of {md_path} (its run: `{earlier['command']}` on "
              f"{earlier.get('machine', 'an unrecorded machine')})", file=sys.stderr)
    _WRITTEN_HERE.add((json_path, section))
    doc["device"], doc["machine"], doc["versions"] = device, machine(device), versions()
    # Each section keeps the machine and versions of its own run: the file's top-level ones are
    # the latest writer's, and sections of earlier runs (another commit, another CPU) stay.
    doc["sections"][section] = {"command": command_line(), "load_average_after": os.getloadavg(),
                                "machine": doc["machine"], "versions": doc["versions"], "results": data,
                                "markdown": markdown}
    text = json.dumps(doc, indent=2) + "\n"
    atomic_write(json_path, lambda f: f.write(text.encode()))

    markdown_text = render_results(doc)
    atomic_write(md_path, lambda f: f.write(markdown_text.encode()))
    return md_path


def render_results(doc: dict) -> str:
    """The markdown of a results file (``write_results``' json document): every section under
    the machine and versions of the latest writer, each earlier run saying which were its own."""
    lines = [f"# minipeft vs peft on {doc['machine']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]
    for name, sec in doc["sections"].items():
        load = ", ".join(f"{x:.1f}" for x in sec["load_average_after"])
        lines += [f"## {name}", "", f"Command: `{sec['command']}` (machine load average at the end: {load})", ""]
        if "versions" not in sec:  # written before sections kept their own: not this header's machine
            lines += ["(An earlier run; its machine and versions were not recorded.)", ""]
        elif (sec["versions"], sec["machine"]) != (doc["versions"], doc["machine"]):
            own = ", ".join(f"{k} {v}" for k, v in sec["versions"].items())
            lines += [f"(An earlier run, on {sec['machine']}: {own}.)", ""]
        lines += [sec["markdown"].rstrip(), ""]
    return "\n".join(lines)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)

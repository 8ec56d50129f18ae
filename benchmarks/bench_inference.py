"""Inference latency with a LoRA adapter: minipeft unmerged, minipeft merged, peft unmerged.

Three copies of one causal LM (transformers config, random weights from one seed) carry the
same adapter (r=16 on every linear layer of the blocks, B nonzero):

* ``minipeft``: the adapter beside the frozen weights (two thin matmuls a layer);
* ``minipeft merged``: ``merge_and_unload()``, the plain model with ``W + s B A`` folded in;
* ``peft``: peft's unmerged adapter, the reference.

For batch 1 and batch 32 it times one forward over the prompt (prefill) and a greedy
``generate`` of a fixed number of new tokens, the variants alternating call by call, and
reports medians. The logits of the three are compared first.

    python benchmarks/bench_inference.py                 # quick CPU form
    python benchmarks/bench_inference.py --device cuda   # ~1B LLaMA-style in bf16
    python benchmarks/bench_inference.py --device cuda --same-adapter-dtype   # bf16 adapters in both

On a bf16 base each library runs its default adapter dtype, which is not the same math (see
common.py); ``--same-adapter-dtype`` gives both bf16 adapters.

The last line printed is one JSON object with the latency ratios against peft.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("minipeft", "minipeft merged", "peft")


def build_variants(spec, device: str, same_adapter_dtype: bool = False) -> dict:
    import minipeft

    mp, pf = common.build_twins(spec, device, same_adapter_dtype=same_adapter_dtype)
    merged = minipeft.get_peft_model(common.build_base_model(spec, device),
                                     minipeft.LoraConfig(**common.lora_kwargs(spec.family)))
    merged.load_state_dict({k: v for k, v in pf.state_dict().items() if ".lora_" in k}, strict=False)
    merged = merged.merge_and_unload()
    models = {"minipeft": mp, "minipeft merged": merged, "peft": pf}
    for m in models.values():
        m.eval()
    return models


def inner(model):
    """The transformers model whose ``generate`` runs (with the LoRA wrappers inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def logits_agree(models: dict, batch: dict) -> dict:
    ref = models["peft"](**batch).logits.float()
    scale = ref.abs().max().item()
    return {name: (models[name](**batch).logits.float() - ref).abs().max().item() / scale
            for name in VARIANTS if name != "peft"}


@torch.no_grad()
def latencies(models: dict, spec, device: str, batch: int, prompt: int, new_tokens: int, reps: int,
              gen_reps: int) -> dict:
    ids = common.make_batches(spec, 1, device, batch=batch, seq=prompt)[0]
    ids.pop("labels")
    fwd = {name: (lambda m=m: m(**ids)) for name, m in models.items()}
    gen = {name: (lambda m=m: inner(m).generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False, pad_token_id=0))
           for name, m in models.items()}
    return {what: common.median_times(fns, n, device, "peft", "ratio_vs_peft")
            for what, fns, n in (("forward", fwd, reps), ("generate", gen, gen_reps))}


def markdown(results: dict, args, device: str) -> str:
    threads = "one intra-op thread" if args.threads == 1 else f"{args.threads} intra-op threads, summed"
    clock = (f"process CPU time, {threads} (the machine is shared; wall times are in the JSON)"
             if device == "cpu" else "wall time, CUDA synchronised")
    rows = []
    for model, r in results.items():
        for b, lat in r["batches"].items():
            for what in ("forward", "generate"):
                t = lat[what]
                per = "" if what == "forward" else f" ({1e3 * t['s']['minipeft'] / args.new_tokens:.2f} ms/token)"
                rows.append([model, b, what if what == "forward" else f"generate {args.new_tokens} tokens",
                             f"{1e3 * t['s']['minipeft']:.2f}{per}", f"{1e3 * t['s']['minipeft merged']:.2f}",
                             f"{1e3 * t['s']['peft']:.2f}", f"**{t['ratio_vs_peft']['minipeft']:.3f}**",
                             f"{t['ratio_vs_peft']['minipeft merged']:.3f}"])
    table = common.md_table(["model", "batch", "what", "minipeft ms", "minipeft merged ms", "peft ms",
                             "minipeft / peft", "merged / peft"], rows)
    agree = "; ".join(f"{m}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["logits_rel_diff_vs_peft"].items())
                      for m, r in results.items())
    any_r = next(iter(results.values()))
    return "\n".join([
        f"Adapter r=16 on every linear layer of the blocks, model in eval mode, {any_r['dtype']}, prompt "
        f"{args.prompt} tokens, greedy generation of exactly {args.new_tokens} new tokens (KV cache on). "
        f"Medians of {args.reps} forwards / {args.gen_reps} generations per variant, alternating. "
        f"Time: {clock}.", "", common.adapter_dtypes(getattr(torch, any_r["dtype"]), args.same_adapter_dtype), "",
        table, "",
        f"Max |logits - peft's| / max |peft's logits|: {agree}.", ""])


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n")[0], same_adapter_dtype=True)
    parser.add_argument("--models", type=functools.partial(common.model_names, allowed=("llama", "gpt2")),
                        default="llama,gpt2", help="the families that generate: llama, gpt2")
    parser.add_argument("--batches", type=common.positive_ints, default="1,32")
    parser.add_argument("--prompt", type=common.positive_int, default=None, help="prompt tokens (default 32 CPU, 512 CUDA)")
    parser.add_argument("--new-tokens", type=common.positive_int, default=None, help="generated tokens (default 16 CPU, 128 CUDA)")
    parser.add_argument("--reps", type=common.positive_int, default=20)
    parser.add_argument("--gen-reps", type=common.positive_int, default=10)
    args = parser.parse_args()
    common.prepare_device(args)
    args.prompt = args.prompt or (32 if args.device == "cpu" else 512)
    args.new_tokens = args.new_tokens or (16 if args.device == "cpu" else 128)

    specs, results = common.model_specs(args.device), {}
    for name in args.models:
        spec = specs[name]
        models = build_variants(spec, args.device, args.same_adapter_dtype)
        batch = common.make_batches(spec, 1, args.device, batch=2, seq=args.prompt)[0]
        batch.pop("labels")
        r = {"dtype": str(spec.dtype).replace("torch.", ""), "same_adapter_dtype": args.same_adapter_dtype,
             "config": spec.config,
             "logits_rel_diff_vs_peft": logits_agree(models, batch), "batches": {}}
        for b in args.batches:
            r["batches"][b] = latencies(models, spec, args.device, b, args.prompt, args.new_tokens, args.reps,
                                        args.gen_reps)
            f, g = r["batches"][b]["forward"], r["batches"][b]["generate"]
            print(f"[{name} batch {b}] forward minipeft/peft {f['ratio_vs_peft']['minipeft']:.3f} "
                  f"merged/peft {f['ratio_vs_peft']['minipeft merged']:.3f}; generate minipeft/peft "
                  f"{g['ratio_vs_peft']['minipeft']:.3f} merged/peft {g['ratio_vs_peft']['minipeft merged']:.3f}",
                  flush=True)
        results[name] = r
        del models
        if args.device == "cuda":
            torch.cuda.empty_cache()

    table = markdown(results, args, args.device)
    print(table)
    if not args.no_write:
        section = "inference" + (" (same adapter dtype)" if args.same_adapter_dtype else "")
        path = common.write_results(args.device, section, results, table, results_dir=args.out)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    print(json.dumps({"device": common.device_slug(args.device), "latency_ratio_vs_peft": {
        f"{m}/batch{b}/{what}": {k: round(v, 4) for k, v in lat[what]["ratio_vs_peft"].items() if k != "peft"}
        for m, r in results.items() for b, lat in r["batches"].items() for what in ("forward", "generate")}}))


if __name__ == "__main__":
    main()

"""Mixed batches: one batch whose rows run different LoRA adapters, against peft's.

One causal LM (transformers config, random weights from one seed) holds four LoRA adapters
(r=16 on every linear layer of the blocks, B nonzero), the same in both libraries. A batch of
``--batch`` prompts names them in turn (``adapter_names = [a0, a1, a2, a3, a0, ...]``). Timed,
the variants alternating call by call, medians reported:

* ``minipeft mixed``: ``model(**batch, adapter_names=names)``, and ``generate`` with them;
* ``peft mixed``: peft's same call, the reference;
* ``minipeft by adapter``: what one does without mixed batches: ``set_adapter`` and run each
  adapter's rows as a batch of their own, one after the other.

First the logits of the three are compared (each row against peft's mixed batch).

    python benchmarks/bench_mixed_batch.py                 # quick CPU form
    python benchmarks/bench_mixed_batch.py --device cuda   # ~1B LLaMA-style in bf16

The last line printed is one JSON object with the ratios against peft.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ADAPTERS = ("a0", "a1", "a2", "a3")
VARIANTS = ("minipeft mixed", "peft mixed", "minipeft by adapter")


def build_models(spec, device: str):
    """(minipeft model, peft model), each holding the adapters ADAPTERS with peft's random weights."""
    import peft

    import minipeft

    base = common.build_base_model(spec, device)
    models = {}
    for lib in (peft, minipeft):
        config = dict(common.lora_kwargs(spec.family, dropout=0.0))
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**config), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.add_adapter(name, lib.LoraConfig(**config))
        models[lib.__name__] = model.eval()
    torch.manual_seed(common.SEED + 1)
    with torch.no_grad():
        for name, p in models["peft"].named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.1 if ".lora_B." in name else 0.02)
    models["minipeft"].load_state_dict(models["peft"].state_dict(), strict=True)
    return models["minipeft"], models["peft"]


def by_adapter(model, call, names: list[str]):
    """``call(rows, model)`` for each adapter's rows as a batch of their own, that adapter active."""
    outs = []
    for adapter in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.set_adapter(adapter)
        outs.append(call(rows, model))
    return outs


@torch.no_grad()
def run(spec, device: str, batch: int, prompt: int, new_tokens: int, reps: int, gen_reps: int) -> dict:
    ours, theirs = build_models(spec, device)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    ids = common.make_batches(spec, 1, device, batch=batch, seq=prompt)[0]
    ids.pop("labels")
    rows_of = lambda rows: {k: v[rows] for k, v in ids.items()}  # noqa: E731

    # Agreement first: every row of each variant against peft's mixed batch.
    ref = theirs(**ids, adapter_names=names).logits.float()
    mixed = ours(**ids, adapter_names=names).logits.float()
    alone = torch.empty_like(ref)
    for adapter in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == adapter]
        ours.set_adapter(adapter)
        alone[rows] = ours(**rows_of(rows)).logits.float()
    scale = ref.abs().max().item()
    agree = {"minipeft mixed": (mixed - ref).abs().max().item() / scale,
             "minipeft by adapter": (alone - ref).abs().max().item() / scale}

    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    forward = {
        "minipeft mixed": lambda: ours(**ids, adapter_names=names),
        "peft mixed": lambda: theirs(**ids, adapter_names=names),
        "minipeft by adapter": lambda: by_adapter(ours, lambda rows, m: m(**rows_of(rows)), names),
    }
    gen = {
        "minipeft mixed": lambda: ours.generate(**ids, adapter_names=names, **generate),
        "peft mixed": lambda: theirs.generate(**ids, adapter_names=names, **generate),
        "minipeft by adapter": lambda: by_adapter(ours, lambda rows, m: m.generate(**rows_of(rows), **generate), names),
    }
    out = {"logits_rel_diff_vs_peft_mixed": agree}
    for what, fns, n in (("forward", forward, reps), ("generate", gen, gen_reps)):
        out[what] = common.median_times(fns, n, device, "peft mixed", "ratio_vs_peft_mixed")
    return out


def markdown(r: dict, args, spec, device: str) -> str:
    threads = "one intra-op thread" if args.threads == 1 else f"{args.threads} intra-op threads, summed"
    clock = (f"process CPU time, {threads} (wall times are in the JSON)" if device == "cpu"
             else "wall time, CUDA synchronised")
    rows = []
    for what in ("forward", "generate"):
        t = r[what]
        label = what if what == "forward" else f"generate {args.new_tokens} tokens"
        rows.append([label, *(f"{1e3 * t['s'][v]:.2f}" for v in VARIANTS),
                     f"**{t['ratio_vs_peft_mixed']['minipeft mixed']:.3f}**",
                     f"{t['ratio_vs_peft_mixed']['minipeft by adapter']:.3f}"])
    table = common.md_table(["what", *(f"{v} ms" for v in VARIANTS), "minipeft mixed / peft mixed",
                             "by adapter / peft mixed"], rows)
    agree = ", ".join(f"{k} {v:.1e}" for k, v in r["logits_rel_diff_vs_peft_mixed"].items())
    return "\n".join([
        f"{spec.family}, {str(spec.dtype).replace('torch.', '')}, {len(ADAPTERS)} LoRA adapters (r=16 on every linear "
        f"layer of the blocks), a batch of {args.batch} prompts of {args.prompt} tokens naming them in turn; greedy "
        f"generation of exactly {args.new_tokens} new tokens (KV cache on). Medians of {args.reps} forwards / "
        f"{args.gen_reps} generations per variant, alternating. Time: {clock}.", "",
        common.adapter_dtypes(spec.dtype, False), "", table, "",
        f"Max |logits - peft's mixed batch| / max |peft's logits|: {agree}.", ""])


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n")[0])
    parser.add_argument("--batch", type=common.positive_int, default=None, help="prompts in the batch (default 8 CPU, 32 CUDA)")
    parser.add_argument("--prompt", type=common.positive_int, default=None, help="prompt tokens (default 32 CPU, 512 CUDA)")
    parser.add_argument("--new-tokens", type=common.positive_int, default=None, help="generated tokens (default 8 CPU, 64 CUDA)")
    parser.add_argument("--reps", type=common.positive_int, default=10)
    parser.add_argument("--gen-reps", type=common.positive_int, default=5)
    args = parser.parse_args()
    common.prepare_device(args)
    cpu = args.device == "cpu"
    args.batch = args.batch or (8 if cpu else 32)
    args.prompt = args.prompt or (32 if cpu else 512)
    args.new_tokens = args.new_tokens or (8 if cpu else 64)

    spec = common.model_specs(args.device)["llama"]
    r = run(spec, args.device, args.batch, args.prompt, args.new_tokens, args.reps, args.gen_reps)
    r.update(dtype=str(spec.dtype).replace("torch.", ""), config=spec.config, batch=args.batch)
    table = markdown(r, args, spec, args.device)
    print(table)
    if not args.no_write:
        path = common.write_results(args.device, "mixed batch", r, table, results_dir=args.out)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    print(json.dumps({"device": common.device_slug(args.device), "ratio_vs_peft_mixed": {
        what: {k: round(v, 4) for k, v in r[what]["ratio_vs_peft_mixed"].items() if k != "peft mixed"}
        for what in ("forward", "generate")}}))


if __name__ == "__main__":
    main()

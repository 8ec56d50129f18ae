"""A training step, minipeft against peft: parity, speed, memory, inject / save / load.
LoRA by default, or another method both libraries have (`--method`).

For each model (LLaMA-style, GPT-2, BERT; transformers configs, random weights from one seed):

1. parity: both libraries wrap the same base model with LoRA r=16 on every linear layer of
   the blocks; peft's adapter weights (B drawn nonzero) are copied into minipeft; the first
   step's loss (float32, dropout off through ``eval()``, since equal losses with dropout would
   need equal masks) must agree within 1e-5, and the adapter gradients are compared too;
2. step time: forward + backward + AdamW step on the trainable parameters, dropout 0.1,
   the same batches, minipeft and peft alternating step by step in this process; medians;
3. peak memory: each library trains in its own fresh child process (peak RSS on CPU,
   ``max_memory_allocated`` on CUDA), so neither sees the other's allocations;
4. time to inject (``get_peft_model``), to save an adapter and to load it back.

    python benchmarks/bench_train_step.py                 # quick CPU form (about a minute)
    python benchmarks/bench_train_step.py --device cuda   # ~1B LLaMA-style + GPT-2/BERT medium, bf16
    python benchmarks/bench_train_step.py --device cuda --same-adapter-dtype   # bf16 adapters in both
    python benchmarks/bench_train_step.py --method oft --models llama,bert   # OFT instead (common.METHODS)

On a bf16 base each library runs its default adapter dtype, which is not the same math (see
common.py); ``--same-adapter-dtype`` gives both bf16 adapters.

The last line printed is one JSON object with the ratios (minipeft / peft).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARITY_TOL = 1e-5


def train_step(model, optimizer, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


# -- 1. parity ---------------------------------------------------------------------------------
def parity(mp, pf, batch, compare_gradients: bool = True) -> dict:
    """First-step loss and adapter gradients of the two libraries, dropout off (eval mode);
    without ``compare_gradients`` (peft's are wrong) the gradients are reported, not checked."""
    losses, grads = [], []
    for model in (mp, pf):
        model.eval()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys(), "the two libraries train different parameters"
    grad_diff = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    grad_scale = max(g.abs().max().item() for g in grads[1].values())
    # The check means something only if the adapter moves the loss: compare with the base alone.
    with torch.no_grad(), pf.disable_adapter():
        base_loss = pf(**batch).loss.item()
    diff = abs(losses[0] - losses[1])
    # Both the loss and every adapter gradient: a gradient off by a factor leaves the loss alone.
    ok = diff <= PARITY_TOL and (grad_diff <= PARITY_TOL * max(grad_scale, 1.0) or not compare_gradients)
    return {"loss_minipeft": losses[0], "loss_peft": losses[1], "loss_abs_diff": diff,
            "adapter_effect_on_loss": abs(losses[1] - base_loss),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale, "ok": ok,
            "gradients_compared": compare_gradients}


def parity_check(spec, device: str, method: str = "lora") -> dict:
    """Parity in float32 (on CUDA: a float32 build of the same config, with the fused kernels
    on, and again on the reference PyTorch path)."""
    mp, pf = common.build_twins(spec, device, dtype=torch.float32, method=method)
    batch = common.make_batches(spec, 1, device)[0]
    compare_gradients = not common.METHODS[method].peft_gradients_wrong
    out = parity(mp, pf, batch, compare_gradients)
    if device == "cuda":
        from minipeft import kernels

        kernels.set_enabled(False)
        try:
            out["reference_path"] = parity(mp, pf, batch, compare_gradients)
        finally:
            kernels.set_enabled(True)
    return out


# -- 2. step time ------------------------------------------------------------------------------
def step_times(mp, pf, spec, device: str, steps: int, warmup: int) -> dict:
    mp.train(), pf.train()  # training mode: LoRA's dropout of 0.1 acts
    batches = common.make_batches(spec, 4, device)
    runs = {}
    for name, model in (("minipeft", mp), ("peft", pf)):
        optimizer, it = adamw(model), iter(range(10**9))
        runs[name] = lambda m=model, o=optimizer, i=it: train_step(m, o, batches[next(i) % len(batches)])
    times = common.alternate(runs, steps, device, warmup=warmup)
    tokens = spec.batch * spec.seq
    # The headline: process CPU time on CPU (see common.alternate), wall time on CUDA.
    clock = "cpu" if device == "cpu" else "wall"
    med = {clock_: {k: common.median(v[clock_]) for k, v in times.items()} for clock_ in ("wall", "cpu")}
    step_s = med[clock]
    return {"clock": clock, "step_s": step_s, "tokens_per_s": {k: tokens / v for k, v in step_s.items()},
            "ratio": step_s["minipeft"] / step_s["peft"], "wall_step_s": med["wall"],
            "wall_ratio": med["wall"]["minipeft"] / med["wall"]["peft"], "steps": steps}


# -- 3. memory, each library in its own process ------------------------------------------------
def import_libraries() -> None:
    import peft  # noqa: F401

    import minipeft  # noqa: F401

def memory_child(lib: str, models: list[str], device: str, steps: int, same_adapter_dtype: bool, method: str) -> None:
    """Child process: for each model, the peak of a training run of one library alone."""
    specs = common.model_specs(device)
    for name in models:
        spec = specs[name]
        base = common.build_base_model(spec, device)
        batches = common.make_batches(spec, 2, device)
        import_libraries()  # before the window: importing peft and minipeft is not the model's memory
        baseline = common.reset_peak_memory(device)  # base model and batches resident
        model = common.lora_model(lib, base, spec.family, same_adapter_dtype=same_adapter_dtype, method=method)
        model.train()
        optimizer = adamw(model)
        for i in range(steps):
            train_step(model, optimizer, batches[i % len(batches)])
            if i == 0 and device == "cuda":
                # The first step autotunes the fused kernels: triton's timing loop allocates a
                # 256 MiB cache-flush buffer through torch, which no training step holds. The peak
                # counts from the second step on (the first step's memory is in it again).
                common.sync(device)
                common.reset_peak_memory(device)
        common.sync(device)
        peak = common.peak_memory(device)
        print(json.dumps({"lib": lib, "model": name, "baseline": baseline, "peak": peak}), flush=True)
        del model, base, optimizer, batches


def peak_memory(models: list[str], device: str, steps: int, threads: int, same_adapter_dtype: bool,
                method: str) -> dict:
    """Run one child per library, side by side, and collect their peaks."""
    # A fixed mmap threshold stops glibc from raising it as big blocks are freed, so every large
    # tensor is its own mapping, returned on free: the RSS then follows the live tensors closely.
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072")
    extra = ["--same-adapter-dtype"] if same_adapter_dtype else []
    procs = {lib: subprocess.Popen([sys.executable, __file__, "--device", device, "--models", ",".join(models),
                                    "--memory-child", lib, "--memory-steps", str(steps), "--threads", str(threads),
                                    "--method", method, *extra],
                                   stdout=subprocess.PIPE, text=True, env=env)
             for lib in ("minipeft", "peft")}
    out: dict = {}
    for lib, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory child for {lib} failed with exit code {proc.returncode}")
        for line in stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                out.setdefault(rec["model"], {})[lib] = rec
    result = {}
    for name, recs in out.items():
        # CUDA: the total peak (base weights included), as max_memory_allocated reports it.
        # CPU: the peak RSS above the RSS with the base model loaded, since the process's total
        # is dominated by the shared libraries (torch, transformers), the same for both.
        key = (lambda r: r["peak"]) if device == "cuda" else (lambda r: r["peak"] - r["baseline"])
        result[name] = {"bytes": {lib: key(r) for lib, r in recs.items()},
                        "total_bytes": {lib: r["peak"] for lib, r in recs.items()},
                        "ratio": key(recs["minipeft"]) / key(recs["peft"])}
    return result


# -- 4. inject, save, load ---------------------------------------------------------------------
def inject_save_load(spec, device: str, mp, pf, rounds: int, same_adapter_dtype: bool, method: str) -> dict:
    import peft

    import minipeft

    base = common.build_base_model(spec, device)
    copies = {"minipeft": [], "peft": []}  # fresh base models, deep-copied outside the timers

    def fresh(lib):
        return copies[lib].pop()

    def refill():
        for lib in copies:
            copies[lib][:] = [copy.deepcopy(base)]

    out = {}
    inject = {lib: lambda lib=lib: common.lora_model(lib, fresh(lib), spec.family, same_adapter_dtype=same_adapter_dtype,
                                                     method=method)
              for lib in ("minipeft", "peft")}
    out["inject_s"] = _alternate_with_setup(inject, refill, rounds, device)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {lib: os.path.join(tmp, lib) for lib in ("minipeft", "peft")}
        save = {"minipeft": lambda: mp.save_pretrained(dirs["minipeft"]), "peft": lambda: pf.save_pretrained(dirs["peft"])}
        out["save_s"] = _alternate_with_setup(save, lambda: None, rounds, device)
        load = {"minipeft": lambda: minipeft.PeftModel.from_pretrained(fresh("minipeft"), dirs["minipeft"]),
                "peft": lambda: peft.PeftModel.from_pretrained(fresh("peft"), dirs["peft"])}
        out["load_s"] = _alternate_with_setup(load, refill, rounds, device)
        # The files are interchangeable: minipeft loads what peft saved, to the same weights.
        refill()
        try:
            loaded = minipeft.PeftModel.from_pretrained(fresh("minipeft"), dirs["peft"])
            marker = common.METHODS[method].marker
            got, ref = loaded.state_dict(), {k: v for k, v in pf.state_dict().items() if marker in k}
            out["loads_peft_checkpoint"] = all(torch.equal(got[k].to(v.dtype), v) for k, v in ref.items())
        except Exception as e:  # a finding to report, not a reason to lose the other numbers
            out["loads_peft_checkpoint"] = False
            out["loads_peft_checkpoint_error"] = f"{type(e).__name__}: {e}"
    return out


def _alternate_with_setup(fns: dict, setup, rounds: int, device: str) -> dict:
    """Median seconds of each function, alternating, with an untimed ``setup`` before each round."""
    times = {k: [] for k in fns}
    for i in range(rounds + 1):  # round 0 warms up (lazy imports, first allocations)
        setup()
        for name in list(fns) if i % 2 == 0 else list(fns)[::-1]:
            _, dt = common.timed(fns[name], device)
            if i:
                times[name].append(dt)
    return {k: common.median(v) for k, v in times.items()}


# -- report ------------------------------------------------------------------------------------
def _mib(b):
    return f"{b / 2**20:.1f} MiB"


def _ms(s):
    return f"{1e3 * s:.1f}"


def markdown(results: dict, device: str, adapters: str, threads: int = 1, method: str = "lora") -> str:
    rows = []
    for name, r in results.items():
        st, mem = r["step"], r["memory"]
        rows.append([name, r["shape"], f"{1e3 * st['step_s']['minipeft']:.1f}", f"{1e3 * st['step_s']['peft']:.1f}",
                     f"**{st['ratio']:.3f}**", f"{st['wall_ratio']:.3f}", f"{st['tokens_per_s']['minipeft']:.0f}",
                     f"{st['tokens_per_s']['peft']:.0f}", _mib(mem["bytes"]["minipeft"]), _mib(mem["bytes"]["peft"]),
                     f"**{mem['ratio']:.3f}**"])
    if device == "cuda":
        clock = "wall time (CUDA synchronised)"
        mem_what = "max_memory_allocated over the run (base weights included), each library in a fresh process"
    else:
        per = "one intra-op thread" if threads == 1 else f"{threads} intra-op threads, summed over them"
        clock = (f"process CPU time with {per} (the machine is shared, so wall time also counts waiting for a "
                 "core; the wall-time ratio is shown beside it)")
        mem_what = ("peak RSS (VmHWM) above the RSS with the base model and batches loaded, each library in a "
                    "fresh process; the processes' totals, mostly torch and transformers, are in the JSON")
    speed = common.md_table(["model", "batch x seq", "step ms minipeft", "step ms peft", "step ratio", "wall ratio",
                             "tok/s minipeft", "tok/s peft", "peak mem minipeft", "peak mem peft", "mem ratio"], rows)
    rows = []
    for name, r in results.items():
        p, isl = r["parity"], r["inject_save_load"]
        ref = f" (reference path {p['reference_path']['loss_abs_diff']:.1e})" if "reference_path" in p else ""
        rows.append([name, f"{p['loss_abs_diff']:.1e}{ref}", f"{p['adapter_effect_on_loss']:.1e}", f"{p['grad_max_abs_diff']:.1e} / {p['grad_max_abs']:.1e}",
                     ("yes" if p["ok"] else "**NO**") + ("" if p.get("gradients_compared", True) else " (the loss)"),
                     f"{_ms(isl['inject_s']['minipeft'])} / {_ms(isl['inject_s']['peft'])}",
                     f"{_ms(isl['save_s']['minipeft'])} / {_ms(isl['save_s']['peft'])}",
                     f"{_ms(isl['load_s']['minipeft'])} / {_ms(isl['load_s']['peft'])}",
                     "yes" if isl["loads_peft_checkpoint"] else "**NO**"])
    other = common.md_table(["model", "first-step abs loss diff (fp32, dropout off)", "adapter's effect on the loss", "max grad diff / max grad",
                             f"parity (loss; grads relative to the largest) <= {PARITY_TOL:g}", "inject ms mp / peft", "save ms mp / peft", "load ms mp / peft",
                             "minipeft loads peft's file"], rows)
    any_r = next(iter(results.values()))
    return "\n".join([
        f"{common.METHODS[method].description} on every linear layer of the blocks; AdamW on the adapters; "
        f"{any_r['dtype']}; medians of {any_r['step']['steps']} steps per library, alternating step by step "
        "in one process. Ratios are minipeft / peft (lower is better for minipeft)."
        + (f" Parity checks the loss only: {common.METHODS[method].peft_gradients_wrong}."
           if common.METHODS[method].peft_gradients_wrong else ""), "",
        adapters, "", f"Step time: {clock}. Peak memory: {mem_what}.", "", speed, "", other, ""])


def main() -> None:
    parser = common.argument_parser(__doc__.split("\n")[0], same_adapter_dtype=True)
    parser.add_argument("--models", type=common.model_names, default=None,
                        help="default: those of llama, gpt2, bert that peft's method adapts")
    parser.add_argument("--method", choices=sorted(common.METHODS), default="lora")
    parser.add_argument("--steps", type=common.positive_int, default=None,
                        help="timed steps per library (default: 40 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=common.non_negative_int, default=3)
    parser.add_argument("--memory-steps", type=common.positive_int, default=3)
    parser.add_argument("--rounds", type=common.positive_int, default=5, help="repeats of inject / save / load")
    parser.add_argument("--memory-child", choices=["minipeft", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = common.METHODS[args.method].families
    models = args.models or list(families)
    if set(models) - set(families):
        parser.error(f"peft's {args.method} does not adapt {sorted(set(models) - set(families))}; "
                     f"--models from {list(families)}")
    common.prepare_device(args)
    if args.memory_child:
        memory_child(args.memory_child, models, args.device, args.memory_steps, args.same_adapter_dtype, args.method)
        return
    steps = args.steps or (40 if args.device == "cpu" else 30)
    from minipeft import kernels  # on CUDA, LoraLinear takes the fused path when these say so

    # children first: no overlap with timing
    memory = peak_memory(models, args.device, args.memory_steps, args.threads, args.same_adapter_dtype, args.method)
    specs, results = common.model_specs(args.device), {}
    for name in models:
        spec = specs[name]
        par = parity_check(spec, args.device, args.method)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the float32 parity twins are gone; give their memory back
        print(f"[{name}] parity: |loss diff| {par['loss_abs_diff']:.2e}, max grad diff "
              f"{par['grad_max_abs_diff']:.2e} (ok={par['ok']})", flush=True)
        if not (par["ok"] and par.get("reference_path", {"ok": True})["ok"]):
            # Timing two models that compute different things would compare nothing.
            raise SystemExit(f"[{name}] minipeft and peft disagree (loss or adapter gradients beyond {PARITY_TOL:g}); "
                             f"not timed: {par}")
        mp, pf = common.build_twins(spec, args.device, same_adapter_dtype=args.same_adapter_dtype, method=args.method)
        step = step_times(mp, pf, spec, args.device, steps, args.warmup)
        print(f"[{name}] step ms minipeft {1e3 * step['step_s']['minipeft']:.1f} peft {1e3 * step['step_s']['peft']:.1f} "
              f"ratio {step['ratio']:.3f}; peak memory ratio {memory[name]['ratio']:.3f}", flush=True)
        isl = inject_save_load(spec, args.device, mp, pf, args.rounds, args.same_adapter_dtype, args.method)
        results[name] = {"shape": f"{spec.batch} x {spec.seq}", "dtype": str(spec.dtype).replace("torch.", ""),
                         "fused_kernels": args.device == "cuda" and kernels.is_available() and kernels.enabled(),
                         "same_adapter_dtype": args.same_adapter_dtype,
                         "config": spec.config, "parity": par, "step": step, "memory": memory[name],
                         "inject_save_load": isl}
        del mp, pf
        if args.device == "cuda":
            torch.cuda.empty_cache()

    adapters = common.adapter_dtypes(specs[models[0]].dtype, args.same_adapter_dtype)
    table = markdown(results, args.device, adapters, args.threads, args.method)
    print(table)
    if not args.no_write:
        section = "train_step" + (f" ({args.method})" if args.method != "lora" else "") + \
            (" (same adapter dtype)" if args.same_adapter_dtype else "")
        path = common.write_results(args.device, section, results, table, results_dir=args.out)
        print(f"wrote {path} and {path.with_suffix('.json')}")
    print(json.dumps({"device": common.device_slug(args.device),
                      "step_time_ratio": {k: round(r["step"]["ratio"], 4) for k, r in results.items()},
                      "step_time_ratio_wall": {k: round(r["step"]["wall_ratio"], 4) for k, r in results.items()},
                      "peak_memory_ratio": {k: round(r["memory"]["ratio"], 4) for k, r in results.items()}}))


if __name__ == "__main__":
    main()

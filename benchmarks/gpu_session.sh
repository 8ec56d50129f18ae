#!/usr/bin/env bash
# Every GPU check of the fused kernels in one command that ends inside a short GPU lease
# (BUDGET seconds, 420 by default: with the machine's start that leaves a 15-minute lease time to
# rerun a step; give the device call a timeout of BUDGET + 60), most important first:
#   1. each route replayed from a CUDA graph (the benchmark's decoding timing relies on it), and
#      every split-K config of the few-rows kernel launched 200 times: the same bits each time
#   2. the target shapes with every fused route and the verdict table (without dropout each
#      output is also checked against plain PyTorch before it is timed), and each method's
#      kernels at M = 8192 (--profile); if a graph replay crashes it, again without graphs
#   3. the compiled kernels against the float64 reference on 20 random ragged shapes
#      (hypothesis; the check that found the misaligned loads)
#   4. the same reference check on every autotuning config, the autotuned flagship shapes, fp32
#      with and without TF32, the LoRA layer's own choice of path (TESTS, a pytest -k
#      expression, picks fewer)
#   5. end to end against peft on the ~1B LLaMA-style model: no-grad inference (a prompt's
#      forward and generation), a mixed batch of four adapters, and a training step, each sized
#      down to fit its cap (these write their tables only at the end)
#   6. the full kernel sweep for whatever time is left
# Steps 1 to 4 and 6 fit a 420 s budget only in part, so the end to end step seldom gets time
# after them: PART=kernels runs those alone, PART=e2e step 5 alone (a second call, where the
# lease has time left: about 350 s), PART=tests steps 3 and 4 alone (the tests a first call's
# budget did not reach; compiled kernels stay cached on a warm machine), PART=all (the
# default) steps 1 to 6.
# Each step gets what is left of the budget, up to its own cap; a step cut short keeps what it
# wrote (the kernel benchmark writes after every case). The end lists the steps timed out or
# skipped, and exits 1 when a step failed. It runs on the GPU machine's own python3 with its torch and triton (nothing can be
# installed there): minipeft is copied into a scratch folder on PYTHONPATH rather than installed.
# Checked off the GPU with that image's versions (torch 2.11, triton 3.6; the tests then run
# interpreted: MINIPEFT_KERNEL_TEST_DEVICE=cpu).
# Logs and results go to $OUT when set (the device tool's folder, at most 8 files), else to
# benchmarks/results/gpu-session/; copy the <gpu>.md/.json into benchmarks/results/ to keep them.
#
#   bash benchmarks/gpu_session.sh            # BUDGET=400 bash ... for a shorter lease
#   PART=e2e BUDGET=300 bash benchmarks/gpu_session.sh           # the end to end step alone
#   PART=tests bash benchmarks/gpu_session.sh                    # the CUDA tests alone
#   TESTS="flagship or float32" bash benchmarks/gpu_session.sh   # step 4: only these tests
set -uo pipefail
PY="${PYTHON:-python3}"
# a relative interpreter path, taken from where the script was started, would not survive the
# change of directory below nor the tests' (env -C)
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-session}"
BUDGET="${BUDGET:-420}"
PART="${PART:-all}"
if [[ "$PART" != all && "$PART" != kernels && "$PART" != e2e && "$PART" != tests ]]; then
    echo "PART must be all, kernels, e2e or tests, not '$PART'" >&2; exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
start=$SECONDS

# minipeft and minipeft.kernels as the wheel lays them out (pyproject's package-dir mapping),
# with the tests beside them: pytest runs there, because `python -m pytest` puts its working
# directory first on sys.path, and in the repository that finds minipeft/ without its kernels.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
cp -r minipeft tests "$site/" && cp -r kernels "$site/minipeft/kernels" || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

# step CAP LOG COMMAND...: run COMMAND for at most CAP seconds, or what is left of BUDGET.
step() {
    local cap=$1 log=$2; shift 2
    local left=$((BUDGET - (SECONDS - start)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "skipped (budget spent): $*" | tee -a "$OUT/$log"; short+=("skipped: $*"); return 125
    fi
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc after $((SECONDS - start))s" | tee -a "$OUT/$log"
    if ((rc == 124)); then short+=("timed out: $*"); fi  # (what it wrote stays: the kernel sweep writes per case)
    if ((rc != 0 && rc != 124)); then failed+=("$log: $*"); fi
    return "$rc"
}
failed=()
short=()

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU visible to $PY: every step here needs one" | tee -a "$OUT/machine.txt"
    exit 1
fi

pytest=(env -C "$site" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py)
if [[ "$PART" == all || "$PART" == kernels ]]; then
    step 150 gpu-tests.log "${pytest[@]}" -k "cuda_graph or bit_for_bit"
    step 360 bench.log "$PY" benchmarks/bench_lora_linear.py --cases targets --profile --out "$OUT"
    rc=$?
    # A crash before any case was written (a graph replay's, the likeliest): the figures without
    # the graph timing. Any other crash would only repeat, and overwrite what was written.
    if ((rc != 0 && rc != 124 && rc != 125)) && [[ -z "$(find "$OUT" -name '*.json' -newer "$OUT/machine.txt")" ]]; then
        if step 240 bench.log "$PY" benchmarks/bench_lora_linear.py --cases targets --profile --no-graph --out "$OUT"; then
            unset 'failed[-1]'  # the figures came after all (the graph replay's crash stays in bench.log)
        fi
    fi
fi
if [[ "$PART" != e2e ]]; then
    if [[ -z "${TESTS:-}" ]]; then
        step 150 gpu-tests.log "${pytest[@]}" -k "matches_float64_reference"
    fi
    # (alone, the tests have the budget to themselves: 49 of these 87 took 160 s on a warm H200)
    step "$([[ "$PART" == tests ]] && echo 420 || echo 200)" gpu-tests.log "${pytest[@]}" \
        -k "${TESTS:-not matches_float64_reference and not cuda_graph and not bit_for_bit}"
fi
if [[ "$PART" == all || "$PART" == e2e ]]; then
    step 150 e2e.log "$PY" benchmarks/bench_inference.py --device cuda --models llama --batches 32 --new-tokens 32 \
        --reps 10 --gen-reps 3 --out "$OUT"
    step 120 e2e.log "$PY" benchmarks/bench_mixed_batch.py --device cuda --new-tokens 16 --reps 5 --gen-reps 2 --out "$OUT"
    step 200 e2e.log "$PY" benchmarks/bench_train_step.py --device cuda --models llama --steps 15 --rounds 1 --out "$OUT"
fi
left=$((BUDGET - (SECONDS - start)))
if [[ "$PART" == all || "$PART" == kernels ]] && ((left > 60)); then  # (the sweep stops starting cases 40 s before the budget ends)
    step 600 bench.log "$PY" benchmarks/bench_lora_linear.py --time-budget $((left - 40)) --out "$OUT"
fi
echo "done in $((SECONDS - start))s; files in $OUT"
if ((${#short[@]})); then printf 'cut short: %s\n' "${short[@]}"; fi
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi

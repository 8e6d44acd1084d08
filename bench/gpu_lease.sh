#!/usr/bin/env bash
# The GPU checks that fit a short lease (about 10 minutes) on a CUDA machine without network access, where
# `make gpu-check` (which installs with pip and runs everything) cannot run:
#   1. the kernel and loss tests with compiled kernels (`pytest --device cuda`);
#   2. the benchmark suite at a few of its full shapes, rlfuse against the installed peers;
#   3. whole GRPO steps (`bench.e2e`) on a randomly initialized Qwen2.5-0.5B-shaped model, rlfuse against TRL;
#   4. the sampler and rollout tests that do not need the SmolLM2 GGUF (CUDA-graph decode);
#   5. torch.compile's peers at one shape per benchmark, with what time is left;
#   and, when STEPS names it, sweep: the fused-linear launch configurations (bench/linear_sweep.py).
# Each step has its own time limit and writes into $OUT as it goes: a step that runs out of time loses
# only itself. $OUT gets log.txt (everything printed) and parts.tgz (parts/suite-<benchmark>-<shape>.json,
# one pytest-benchmark file per shape, and parts/e2e-<model>-<device>.json).
# Missing pure-Python packages come as wheels (WHEELS, installed with --no-index) and the
# random model's tokenizer as a saved folder (TOKENIZER): bench/gpu_prepare.sh makes both. See docs/gpu.md.
#
#   OUT=/tmp/lease bash bench/gpu_lease.sh            # on the GPU machine, from the repository root
#   DRY=1 OUT=/tmp/lease PY=.venv/bin/python bash bench/gpu_lease.sh   # plumbing check on a CPU: smoke sizes
#   STEPS="tests sweep e2e" BUDGET_S=250 OUT=/tmp/lease bash bench/gpu_lease.sh   # a shorter lease
set -u
OUT=${OUT:?set OUT to the folder that receives the results}
PY=${PY:-python3}
WHEELS=${WHEELS:-.gpu/whl}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
DRY=${DRY:-0}
mkdir -p "$OUT/parts"
# parts.tgz: every JSON so far, repacked after each step (the machine returns few files, and a run cut short
# by its own limit still returns what finished).
pack() { tar czf "$OUT/parts.tgz.new" -C "$OUT" parts && mv "$OUT/parts.tgz.new" "$OUT/parts.tgz"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
stamp() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/log.txt"; }

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; FULL=""; WORKERS=""
else
    unset TRITON_INTERPRET
    DEVICE=cuda; FULL="--full"; WORKERS="-n 12"
fi
# Limits in seconds. Each step's limit is cut to what is left before DEADLINE (BUDGET_S, default 9 min 20 s),
# and a step with under 10 s left is skipped, so the script ends before a 10-minute command limit.
DEADLINE=$((SECONDS + ${BUDGET_S:-560}))
cap() {  # the limit $1 cut to the time left; fails when under 10 s are left
    local left=$((DEADLINE - SECONDS))
    [ "$left" -ge 10 ] || { stamp "skipped: ${left}s left"; return 1; }
    echo $(( $1 < left ? $1 : left ))
}
T_TESTS=130; T_E2E=100; T_ENGINE_TESTS=35; T_SWEEP=${T_SWEEP:-110}
# The steps, in order (STEPS="tests sweep e2e" runs those alone, for a shorter lease).
STEPS=${STEPS:-tests bench e2e engine compile_bench}
if [ "$DRY" = 1 ]; then T_TESTS=30; T_ENGINE_TESTS=20; fi  # the interpreter is slow

if ls "$WHEELS"/*.whl >/dev/null 2>&1 && [ "$DRY" != 1 ]; then
    stamp "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || stamp "wheel install failed"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

stamp "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy", "trl", "datasets",
             "tyro", "math_verify", "pytest_benchmark", "xdist"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # report and go on: a missing peer only skips its benchmarks
        print(name, "MISSING", type(error).__name__, str(error)[:200])
import torch
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF
} 2>&1 | tee -a "$OUT/log.txt"

run_pytest() {  # limit, log name, pytest arguments...
    local limit name=$2
    limit=$(cap "$1") || return 0
    shift 2
    stamp "pytest $name (limit ${limit}s)"
    timeout -s INT -k 5 "$limit" "$PY" -m pytest -p no:cacheprovider -q --tb=short -rfE "$@" 2>&1 \
        | tee -a "$OUT/log.txt" | tail -n 25
    stamp "pytest $name done"
}

step_tests() {
    run_pytest "$T_TESTS" "kernels and losses" --device "$DEVICE" $WORKERS tests/test_kernels_triton.py \
        tests/test_linear_logprobs.py tests/test_token_loss_kernel.py tests/test_logprobs_reference.py \
        tests/test_linear_memory.py tests/test_policy_loss.py tests/test_offpolicy_losses.py \
        tests/test_advantages.py tests/test_packing.py
}

bench() {  # limit, module, shape id: one pytest run per shape, since an interrupted run saves no JSON
    local limit
    limit=$(cap "$1") || return 0
    local part="$2-${3// /_}"
    stamp "bench $2 $3 (limit ${limit}s)"
    timeout -s INT -k 5 "$limit" "$PY" -m pytest -p no:cacheprovider -q --benchmark-only $FULL \
        --benchmark-json "$OUT/parts/suite-$part.json" "bench/test_$2.py" -k "$3" 2>&1 | tee -a "$OUT/log.txt" \
        | tail -n 4
    pack
}
# The fast implementations at every shape first; torch.compile (tens of seconds of compilation per shape and
# pass) in the step compile_bench, at the end, with what time is left.
step_bench() {
if [ "$DRY" = 1 ]; then
    bench 75 logprobs 64x4096; bench 75 policy_loss 4x16x4096; bench 110 linear 64x64x1000
else
    for shape in 32768x151936 8192x128256; do bench 22 logprobs "$shape and not torch-compile"; done
    for shape in 32x1024x151936 8x1024x128256; do bench 22 policy_loss "$shape and not torch-compile"; done
    for shape in 8192x4096x128256 8192x896x151936 32768x2048x151936; do
        bench 40 linear "$shape and not torch-compile"
    done
fi
}

step_sweep() {  # the fused-linear launch configurations (bench/linear_sweep.py)
    local limit
    limit=$(cap "$T_SWEEP") || return 0
    stamp "linear sweep (limit ${limit}s)"
    if [ "$DRY" = 1 ]; then
        RLFUSE_BACKEND=triton TRITON_INTERPRET=1 timeout -k 5 "$limit" "$PY" -m bench.linear_sweep --smoke \
            --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" | tail -n 30
    else
        timeout -k 5 "$limit" "$PY" -m bench.linear_sweep --time-limit-s $((limit - 25)) --out-dir "$OUT/parts" \
            2>&1 | tee -a "$OUT/log.txt" | tail -n 60
    fi
    pack
}

step_e2e() {
T_E2E=$(cap "$T_E2E") || T_E2E=0
stamp "e2e (limit ${T_E2E}s)"
if [ "$DRY" = 1 ]; then
    E2E=(--model smollm2-135m --prompts 1 --num-generations 2 --max-new-tokens 8 --steps 1 --warmup 0 --impls rlfuse)
else
    E2E=(--model qwen2.5-0.5b-random --tokenizer "$TOKENIZER" --prompts 4 --num-generations 8 --max-new-tokens 256
         --steps 3 --warmup 1)
fi
[ "$T_E2E" -gt 0 ] && timeout -k 5 "$T_E2E" "$PY" -m bench.e2e "${E2E[@]}" --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" | tail -n 12
if ! ls "$OUT"/parts/e2e-*.json >/dev/null 2>&1 && [ "$DRY" != 1 ] && T_E2E=$(cap 60); then
    stamp "e2e, rlfuse alone (TRL missing or failed; limit ${T_E2E}s)"
    timeout -k 5 "$T_E2E" "$PY" -m bench.e2e "${E2E[@]}" --impls rlfuse --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" \
        | tail -n 12
fi
pack
}

step_engine() {
    run_pytest "$T_ENGINE_TESTS" engine --device "$DEVICE" $WORKERS tests/test_sampler.py tests/test_rollout.py
}

step_compile_bench() {
    [ "$DRY" = 1 ] && return 0
    bench 40 logprobs "32768x151936 and torch-compile"; bench 40 policy_loss "32x1024x151936 and torch-compile"
    bench 50 linear "8192x4096x128256 and torch-compile"
}

for step in $STEPS; do "step_$step"; done
stamp "end"

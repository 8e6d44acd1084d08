#!/usr/bin/env bash
# The GPU checks that fit a short lease (about 10 minutes) on a CUDA machine without network access, where
# `make gpu-check` (which installs with pip and runs everything) cannot run. In order of value:
#   1. bench:       per-kernel timings of the current tree at the full shapes that matter (log-probs and the
#                   DAPO loss from logits at N = 8192, V = 128256 / 151936; log-probs from hidden states at
#                   M = 8192, H = 896 / 4096), rlfuse against the installed peers, each charged its own work;
#   2. linear_sweep: the fused-linear candidates (hybrid row blocks and chunks, fused tiles, materialized);
#   3. row_sweep:   the logits kernels' configurations (rows per program, tiles, warps, the L2-capped grid);
#   4. e2e:         whole GRPO steps (`bench.e2e`, random rewards so every step updates) on a randomly
#                   initialized Qwen2.5-0.5B-shaped model, rlfuse against TRL, in one JSON;
#   5. gpu_compiled: every rlfuse kernel steps 1-4 compiled (a fresh TRITON_CACHE_DIR), with registers, spills
#                   and shared memory, set against the compile gate's static report (`bench.gpu_compiled`);
#   6. tests:       the kernel and loss tests with compiled kernels (`pytest --device cuda`);
#   7. compile_bench: torch.compile's peers, with what time is left.
# Each step has its own time limit and writes its JSON into $OUT/parts as it goes, and parts.tgz is repacked
# after each step: a step that runs out of time loses only itself. $OUT gets log.txt (everything printed)
# and parts.tgz (parts/suite-<benchmark>-<shape>.json, one pytest-benchmark file per shape;
# parts/linear-sweep-*.json, parts/row-sweep-*.json, parts/e2e-*.json, parts/gpu-compiled.json).
# Missing pure-Python packages come as wheels (WHEELS, installed with --no-index) and the
# random model's tokenizer as a saved folder (TOKENIZER): bench/gpu_prepare.sh makes both. See docs/gpu.md.
#
#   OUT=/tmp/lease bash bench/gpu_lease.sh            # on the GPU machine, from the repository root
#   DRY=1 OUT=/tmp/lease PY=.venv/bin/python bash bench/gpu_lease.sh   # plumbing check on a CPU: smoke sizes
#   STEPS="bench linear_sweep" BUDGET_S=250 OUT=/tmp/lease bash bench/gpu_lease.sh   # a shorter lease
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
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_DEFAULT_FP_FUSION=1
stamp() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/log.txt"; }

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; FULL=""; WORKERS=""
    export TRITON_INTERPRET=1
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
T_LINEAR_SWEEP=${T_LINEAR_SWEEP:-110}; T_ROW_SWEEP=${T_ROW_SWEEP:-75}; T_E2E=${T_E2E:-100}; T_TESTS=${T_TESTS:-120}
T_GPU_COMPILED=${T_GPU_COMPILED:-40}
STEPS=${STEPS:-bench linear_sweep row_sweep e2e gpu_compiled tests compile_bench}
# Every kernel this lease compiles lands here, and only those (step gpu_compiled reads it).
export TRITON_CACHE_DIR=${LEASE_TRITON_CACHE:-$(mktemp -d /tmp/rlfuse-lease-triton-cache.XXXXXX)}

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
    git log -1 --format='commit %H %s' 2>&1
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy", "quack", "trl", "datasets",
             "tyro", "math_verify", "pytest_benchmark", "xdist"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # report and go on: a missing peer only skips its benchmarks
        print(name, "MISSING", type(error).__name__, str(error)[:200])
import torch
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          props.multi_processor_count, "SMs", getattr(props, "L2_cache_size", "?"), "B L2")
EOF
} 2>&1 | tee -a "$OUT/log.txt"

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

# 1. Timings of the current tree; torch.compile (tens of seconds of compilation per shape and pass) waits
#    for compile_bench.
step_bench() {
    if [ "$DRY" = 1 ]; then
        bench 60 logprobs "64x4096 and rlfuse"; bench 60 policy_loss "4x16x4096 and rlfuse"
        bench 90 linear "64x64x1000 and hybrid and fwd_bwd"
        return
    fi
    for shape in 8192x128256 8192x151936; do bench 20 logprobs "$shape and not torch-compile"; done
    for shape in 8x1024x128256 32x1024x151936; do bench 22 policy_loss "$shape and not torch-compile"; done
    for shape in 8192x896x151936 8192x4096x128256; do bench 45 linear "$shape and not torch-compile"; done
}

sweep() {  # limit, module: bench.linear_sweep or bench.row_sweep, stopping 20 s before its limit
    local limit
    limit=$(cap "$1") || return 0
    stamp "$2 (limit ${limit}s)"
    if [ "$DRY" = 1 ]; then
        timeout -k 5 "$limit" "$PY" -m "$2" --smoke --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" | tail -n 20
    else
        timeout -k 5 "$limit" "$PY" -m "$2" --time-limit-s $((limit > 40 ? limit - 20 : limit / 2)) \
            --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" | tail -n 60
    fi
    pack
}
step_linear_sweep() { sweep "$T_LINEAR_SWEEP" bench.linear_sweep; }  # 2. the fused-linear candidates
step_row_sweep() { sweep "$T_ROW_SWEEP" bench.row_sweep; }           # 3. the logits kernels' configurations

step_e2e() {  # 4. rlfuse against TRL, whole steps; rlfuse alone if TRL is missing or fails
    local limit
    limit=$(cap "$T_E2E") || return 0
    stamp "e2e (limit ${limit}s)"
    if [ "$DRY" = 1 ]; then
        E2E=(--model smollm2-135m --prompts 1 --num-generations 2 --max-new-tokens 8 --steps 1 --warmup 0
             --impls rlfuse)
    else
        E2E=(--model qwen2.5-0.5b-random --tokenizer "$TOKENIZER" --prompts 4 --num-generations 8
             --max-new-tokens 256 --steps 3 --warmup 1)
    fi
    timeout -k 5 "$limit" "$PY" -m bench.e2e "${E2E[@]}" --out-dir "$OUT/parts" 2>&1 | tee -a "$OUT/log.txt" \
        | tail -n 12
    if ! ls "$OUT"/parts/e2e-*.json >/dev/null 2>&1 && [ "$DRY" != 1 ] && limit=$(cap 60); then
        stamp "e2e, rlfuse alone (TRL missing or failed; limit ${limit}s)"
        timeout -k 5 "$limit" "$PY" -m bench.e2e "${E2E[@]}" --impls rlfuse --out-dir "$OUT/parts" 2>&1 \
            | tee -a "$OUT/log.txt" | tail -n 12
    fi
    pack
}

step_gpu_compiled() {  # 5. what steps 1-4 compiled, against the static report of the same Triton
    local limit
    limit=$(cap "$T_GPU_COMPILED") || return 0
    stamp "gpu_compiled (limit ${limit}s)"
    if [ "$DRY" = 1 ]; then  # the interpreter compiles nothing: fill the cache ahead of time, for sm_90a
        env -u TRITON_INTERPRET "$PY" -m bench.compiled --modules rlfuse.kernels.advantages_triton \
            rlfuse.kernels.logprobs_triton --archs 90 --dtypes bf16 --shapes smollm2-135m \
            --out "$OUT/compiled-dry.json" >> "$OUT/log.txt" 2>&1
    fi
    timeout -k 5 "$limit" env -u TRITON_INTERPRET "$PY" -m bench.gpu_compiled "$TRITON_CACHE_DIR" \
        --out "$OUT/parts/gpu-compiled.json" 2>&1 | tee -a "$OUT/log.txt" | tail -n 30
    pack
}

step_tests() {  # 6. correctness with compiled kernels
    local limit
    limit=$(cap "$T_TESTS") || return 0
    stamp "pytest kernels and losses (limit ${limit}s)"
    local files=(tests/test_kernels_triton.py tests/test_linear_logprobs.py tests/test_token_loss_kernel.py
                 tests/test_linear_memory.py tests/test_logprobs_reference.py tests/test_policy_loss.py
                 tests/test_offpolicy_losses.py tests/test_advantages.py tests/test_packing.py
                 tests/test_sampler.py tests/test_rollout.py)
    [ "$DRY" = 1 ] && files=(tests/test_linear_memory.py)
    timeout -s INT -k 5 "$limit" "$PY" -m pytest -p no:cacheprovider -q --tb=short -rfE --device "$DEVICE" \
        $WORKERS --junitxml "$OUT/parts/tests.xml" "${files[@]}" 2>&1 | tee -a "$OUT/log.txt" | tail -n 25
    pack
}

step_compile_bench() {  # 7. torch.compile's peers
    [ "$DRY" = 1 ] && return 0
    bench 40 logprobs "8192x151936 and torch-compile"; bench 40 policy_loss "32x1024x151936 and torch-compile"
    bench 50 linear "8192x4096x128256 and torch-compile"
}

for step in $STEPS; do "step_$step"; done
[ -n "${LEASE_TRITON_CACHE:-}" ] || rm -rf "$TRITON_CACHE_DIR"  # the folder made above, read by gpu_compiled
stamp "end"

#!/bin/bash
# The five-seed study of `make train`'s recipe under the equation-checked reward, on the 2-core CPU.
#   bash bench/studies/seed_study.sh            # everything, in this order:
# 1. seed 0 alone with both cores: `make train`'s own command (its timing is make train's);
# 2. seeds 1-4, two at a time with one thread each, the same command without its 50-problem evaluations (step 3
#    evaluates every checkpoint on all 300 problems; greedy evaluation draws no random numbers, so training is
#    the same with or without it);
# 3. greedy `rlfuse eval` on all 300 SVAMP test problems of the base model and of each seed's final checkpoint,
#    all through the same code with the same numerics (--mixed-precision auto, 128 tokens, batch 8).
# Outputs go to $R (default runs/study-equation): seed<N>/ (the run), seed<N>.log, time-seed<N>.txt,
# eval-base.json, eval-seed<N>.json, time-eval-<name>.txt. A finished step is not redone.
set -euo pipefail
cd "$(dirname "$0")/../.."   # the repository root
R=${R:-runs/study-equation}
mkdir -p "$R"
# make train's command (Makefile), with the seed and the output folder.
train() {
  local seed=$1
  [ -f "$R/seed$seed/done" ] && return 0
  rm -rf "$R/seed$seed"
  local evaluation="--eval-every 30 --eval-prompts 50 --eval-on-start"
  [ "$seed" = 0 ] || evaluation="--eval-every 0"
  /usr/bin/time -v -o "$R/time-seed$seed.txt" .venv/bin/rlfuse train --algo grpo --model smollm2-135m \
    --data data/svamp-train-learnable.jsonl --eval-data svamp --num-generations 8 --learning-rate 2e-5 \
    --steps 30 $evaluation --seed "$seed" --output-dir "$R/seed$seed" > "$R/seed$seed.log" 2>&1
  touch "$R/seed$seed/done"
}
evaluate() {
  local name=$1 model=$2
  [ -f "$R/eval-$name.json" ] && return 0
  /usr/bin/time -v -o "$R/time-eval-$name.txt" .venv/bin/rlfuse eval --model "$model" --data svamp --split test \
    --num-samples 0 --max-new-tokens 128 --batch-size 8 --output "$R/eval-$name.json.tmp" > "$R/eval-$name.log" 2>&1
  mv "$R/eval-$name.json.tmp" "$R/eval-$name.json"
}
export -f train evaluate
export R
train 0
export OMP_NUM_THREADS=1
printf '%s\n' "train 1 && evaluate seed1 $R/seed1" "train 2 && evaluate seed2 $R/seed2" \
  "train 3 && evaluate seed3 $R/seed3" "train 4 && evaluate seed4 $R/seed4" \
  "evaluate base smollm2-135m" "evaluate seed0 $R/seed0" | xargs -P 2 -I{} bash -c {}
echo "study done: $R; summary: python -m bench.studies.seed_study $R OUT_DIR"

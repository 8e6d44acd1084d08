#!/bin/bash
# Greedy eval with per-problem records of the base model and the three step-25 checkpoints on the 300 SVAMP
# test problems (same settings as the study's evaluations), for the paired comparison.
# usage: chain3.sh   (from the repository root; writes /work/runs/study-pp/<name>.json). It ran on
# 2026-11-29 and was stopped after seed0 to free the CPU.
R=/work/runs/study-pp
export OMP_NUM_THREADS=1
mkdir -p $R
for m in base seed0 seed1 seed2; do
  [ -f $R/$m.json ] && continue
  model=$([ $m = base ] && echo smollm2-135m || echo /work/runs/study/$m)
  /usr/bin/time -v .venv/bin/rlfuse eval --model $model --data svamp --split test --num-samples 0 \
    --prompt-style one_shot --max-new-tokens 128 --batch-size 32 --output $R/$m.json > $R/$m.log 2> $R/$m.err
done

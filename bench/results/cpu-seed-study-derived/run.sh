#!/bin/bash
# One seed of the derivation-checked study: the make-train command run for 60 steps at lr 2e-5, evaluated
# greedily on all 300 SVAMP test problems at the end. The three seeds ran side by side, one thread each.
# They ran in float32 (an AVX2-only CPU, before --mixed-precision): --mixed-precision no repeats that anywhere.
cd "$(dirname "$0")/../../.."   # the repository root
R=${R:-runs/study-derived}
seed=$1
mkdir -p $R
resume=; [ -d $R/seed$seed/checkpoint ] && resume=--resume
OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/rlfuse train --algo grpo --model smollm2-135m \
  --data data/svamp-train-learnable.jsonl --eval-data svamp --num-generations 8 --prompts-per-step 4 \
  --learning-rate 2e-5 --mixed-precision no --steps 60 --seed $seed --eval-every 60 --eval-prompts 300 --save-every 20 \
  --output-dir $R/seed$seed $resume > $R/seed$seed.log 2> $R/seed$seed.err \
  && touch $R/seed$seed/done

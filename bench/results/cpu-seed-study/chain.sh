#!/bin/bash
# Three seeds of the documented recipe, then the base model's greedy eval on the same 300 test problems.
cd /work/main
R=/work/runs/study
for seed in 0 1 2; do
  [ -f $R/seed$seed/done ] && continue
  /usr/bin/time -v .venv/bin/rlfuse train --algo grpo --model smollm2-135m --data svamp --prompt-style one_shot \
    --num-generations 8 --prompts-per-step 4 --max-new-tokens 128 --learning-rate 1e-5 --steps 25 --seed $seed \
    --eval-every 25 --eval-prompts 300 --save-every 25 --output-dir $R/seed$seed > $R/seed$seed.log 2> $R/seed$seed.err \
    && touch $R/seed$seed/done
done
if [ ! -f $R/base/done ]; then
  mkdir -p $R/base
  /usr/bin/time -v .venv/bin/rlfuse eval --model smollm2-135m --data svamp --split test --num-samples 0 --prompt-style one_shot \
    --max-new-tokens 128 --batch-size 32 --output $R/base/eval.json > $R/base.log 2> $R/base.err && touch $R/base/done
fi

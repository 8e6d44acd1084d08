#!/bin/bash
# Continue the three 25-step seed runs to 75 steps (resume from their step-25 checkpoints), one thread each.
cd /work/main
R=/work/runs/study75
seed=$1
OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/rlfuse train --algo grpo --model smollm2-135m --data svamp --prompt-style one_shot \
  --num-generations 8 --prompts-per-step 4 --max-new-tokens 128 --learning-rate 1e-5 --steps 75 --seed $seed \
  --eval-every 75 --eval-prompts 300 --save-every 25 --output-dir $R/seed$seed --resume > $R/seed$seed.log 2> $R/seed$seed.err \
  && touch $R/seed$seed/done

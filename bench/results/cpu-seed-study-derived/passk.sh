#!/bin/bash
# pass@k and diversity: n = 8 samples at T = 0.7 on the first 50 SVAMP test problems, for the base model and
# each seed's step-60 checkpoint (same prompt, stop rule and length limit as training), one thread, float32.
cd "$(dirname "$0")/../../.."   # the repository root
R=${R:-runs/study-derived}
for name in "$@"; do
  model=smollm2-135m; [ $name != base ] && model=$R/$name
  while [ $name != base ] && [ ! -f $R/$name/done ]; do sleep 30; done
  OMP_NUM_THREADS=1 .venv/bin/rlfuse eval --model $model --data svamp --num-problems 50 --num-samples 8 \
    --ks 1 2 4 8 --max-new-tokens 128 --mixed-precision no --output $R/passk-$name.json > $R/passk-$name.log 2>&1
done

#!/bin/bash
# After chain.sh: the full test suite, then pass@8 and diversity on the first 50 test problems, base and seeds.
cd /work/main
R=/work/runs/study
while pgrep -f chain.sh > /dev/null; do sleep 20; done
/usr/bin/time -v .venv/bin/python -m pytest -q -p no:cacheprovider > $R/pytest.log 2>&1; echo "rc=$?" >> $R/pytest.log
for m in base seed0 seed1 seed2; do
  model=$R/$m; [ $m = base ] && model=smollm2-135m
  [ -f $R/passk-$m.json ] && continue
  .venv/bin/rlfuse eval --model $model --data svamp --split test --num-problems 50 --num-samples 8 --ks 1 2 4 8 \
    --prompt-style one_shot --max-new-tokens 128 --batch-size 8 --seed 0 --output $R/passk-$m.json > $R/passk-$m.log 2>&1
done

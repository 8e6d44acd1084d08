"""Benchmark rollout: rlfuse's shared-prefix sampler against transformers ``generate``, side by side.

Same model, prompts (the first GSM8K test questions through the chat template) and sampling settings
(temperature, no top-k/top-p, G samples per prompt). Reports generated tokens per second of each and
the speed-up. ``python -m bench.rollout [--prompts 4 --num-generations 8 --max-new-tokens 128]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

from bench.common import device_name, print_table, sync, write_results
from rlfuse.engine.data import build_prompt, load_gsm8k, read_jsonl, shared_gsm8k_path
from rlfuse.engine.model import load_model_and_tokenizer, resolve_dtype
from rlfuse.engine.rollout import HFRollout
from rlfuse.engine.sampler import SharedPrefixSampler


@dataclass
class Args:
    """Benchmark options."""

    model: str = "smollm2-135m"
    """Model to sample from (see ``rlfuse train --model``)."""
    prompts: int = 4
    """Distinct prompts."""
    num_generations: int = 8
    """Samples per prompt (G)."""
    max_new_tokens: int = 128
    """Completion length limit."""
    temperature: float = 0.7
    """Sampling temperature."""
    repeats: int = 2
    """Timed runs of each sampler (after one warm-up); the median is reported."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def questions(count: int):
    """The first ``count`` GSM8K test questions (the shared copy, else the sample shipped with the tests)."""
    if shared_gsm8k_path("test") is not None:
        return load_gsm8k("gsm8k", "test")[:count]
    return read_jsonl(Path(__file__).resolve().parents[1] / "tests" / "data" / "gsm8k_test_sample.jsonl")[:count]


def time_rollout(sampler, prompts, args, device) -> dict:
    """Median seconds and generated tokens over ``args.repeats`` seeded runs, after a warm-up."""
    sampler.generate(prompts[:1], 1, 4, args.temperature)
    runs = []
    for seed in range(args.repeats):
        torch.manual_seed(seed)
        sync(device)
        start = time.perf_counter()
        batch = sampler.generate(prompts, args.num_generations, args.max_new_tokens, args.temperature)
        sync(device)
        runs.append((time.perf_counter() - start, batch.num_completion_tokens))
    seconds = sorted(runs)[len(runs) // 2][0]
    tokens = sum(t for _, t in runs) / len(runs)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main(args: Args) -> None:
    """Time both samplers and write ``bench/results/rollout-<device>.json``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_model_and_tokenizer(args.model, resolve_dtype("auto", device), str(device))
    prompts = [build_prompt(tokenizer, ex.question) for ex in questions(args.prompts)]
    rows = []
    for name, sampler in (("hf-generate", HFRollout(model, tokenizer)),
                          ("rlfuse-shared-prefix", SharedPrefixSampler(model, tokenizer))):
        rows.append({"impl": name, "prompts": args.prompts, "num_generations": args.num_generations,
                     "max_new_tokens": args.max_new_tokens, **time_rollout(sampler, prompts, args, device)})
    rows[1]["speedup_vs_hf"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    path = write_results("rollout", device, rows, {"model": args.model, "temperature": args.temperature},
                         args.out_dir, smoke=False)  # the real model at real settings, on any device
    print(f"rollout on {device_name(device)}, {args.model}")
    print_table(rows, ["impl", "prompts", "num_generations", "max_new_tokens", "seconds", "tokens", "tokens_per_s",
                       "speedup_vs_hf"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

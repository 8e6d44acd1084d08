"""The RL training loop: sample, score with the reward functions, compute advantages and log-probs, update (skipping
non-finite updates), log, checkpoint; one run per output folder."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from datetime import datetime
from pathlib import Path
import math
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from rlfuse.algos import FusedLinearPolicyLoss, compute_advantages, policy_loss
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.checkpoint import (check_free_space, checkpoint_bytes, find_checkpoint, load_extra_state,
                                     load_training_state, save_checkpoint, verify_checkpoint)
from rlfuse.engine.data import DATASETS, load_examples
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.evaluate import evaluate_examples, flat_metrics
from rlfuse.engine.forward import completion_hidden_states, completion_logprobs
from rlfuse.engine.memory import peak_memory_gb, reset_peak_memory
from rlfuse.engine.metrics import METRICS_FILE, MetricsLog
from rlfuse.engine.model import add_lora, load_model_and_tokenizer, resolve_dtype
from rlfuse.engine.precision import autocast, resolve_autocast_dtype
from rlfuse.engine.prompt_data import is_conversational, load_prompt_rows, prompt_token_ids
from rlfuse.engine.replay import ReplayBuffer, ReplayItem, replay_backward
from rlfuse.engine.reward_funcs import MathReward, RewardFunc, RewardSet, load_reward_function
from rlfuse.engine.rewards import ANSWER_LINE_STOP, solved
from rlfuse.engine.rollout import HFRollout, RolloutBatch, batch_truncated
from rlfuse.engine.run_lock import RunLock
from rlfuse.engine.sampler import SharedPrefixSampler
from rlfuse.engine.scoring import evaluate_rewards, score
from rlfuse.engine.step_state import SampledBatch, StepUpdate
from rlfuse.engine.zero_advantage import informative_rows, kept_share, select_rows, zero_advantage_has_zero_gradient
from rlfuse.kernels import TokenLogprobs

__all__ = ["NonFiniteStepsError", "Trainer", "completion_hidden_states", "completion_logprobs", "step_examples",
           "train"]

EVAL_DIR = "eval"  # <output_dir>/eval/step_<step>.json: each evaluation's whole result, per problem


def _item(value: Optional[torch.Tensor]) -> Optional[float]:
    return None if value is None else value.item()


def step_examples(examples: Sequence, step: int, per_step: int, seed: int) -> list:
    """The prompts (rows of any kind) of 1-based ``step``: consecutive slices of a seeded shuffle, reshuffled
    every epoch.

    Depends only on (step, seed), so a resumed run sees the same prompts as an uninterrupted one.
    """
    chosen = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, index = divmod(position, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        chosen.append(examples[int(order[index])])
    return chosen


class NonFiniteStepsError(ValueError):
    """``--max-nonfinite-steps`` steps in a row had a non-finite loss or gradient norm; the run stopped."""


class Trainer:
    """Runs :class:`TrainArgs` end to end; ``train()`` returns the output folder.

    Args:
        args: the run's options.
        reward_funcs: the reward functions, overriding ``args.reward``: callables with TRL's signature
            (:mod:`rlfuse.engine.reward_funcs`) or ``--reward`` specs; weighted by ``args.reward_weights``.

    Raises:
        ValueError: a bad option or input (the message names it), a checkpoint that fails verification on
            ``--resume``, or an output folder that another run holds (:class:`rlfuse.engine.run_lock.RunLockedError`).
    """

    def __init__(self, args: TrainArgs, reward_funcs: Optional[Sequence[Union[str, RewardFunc]]] = None):
        args.validate()
        self.args = args
        self.config = args.loss_config()
        self.device = args.torch_device()
        self.output_dir = Path(args.output_dir or f"runs/{args.algo}-{datetime.now():%Y%m%d-%H%M%S}")
        self.lock = RunLock(self.output_dir)
        if self.output_dir.is_dir():  # a new folder is locked once created, below
            self.lock.acquire()
        try:
            self._setup(reward_funcs)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, reward_funcs) -> None:
        args = self.args
        checkpoint = self._find_resume_checkpoint()
        self.rewards = self._reward_set(reward_funcs)
        self.math_reward = next((f for f in self.rewards.functions if isinstance(f, MathReward)), None)
        self.train_rows = load_prompt_rows(args.data, args.data_split, args.prompt_style)
        self._check_columns(self.train_rows, args.data)
        self.eval_examples, self.eval_rows = self._eval_data()
        self._seed(args.seed)
        dtype = resolve_dtype(args.dtype, self.device)
        # A LoRA checkpoint holds only the adapters: the base comes from --model.
        source = str(checkpoint) if checkpoint and not args.lora_rank else args.model
        self.model, self.tokenizer = load_model_and_tokenizer(source, dtype, str(self.device))
        self.rollout_kind, self.forward_kind = self._engine_paths(self.model)
        rows = self.train_rows + (self.eval_rows or [])
        if getattr(self.tokenizer, "chat_template", None) is None and any(is_conversational(r.prompt) for r in rows):
            raise ValueError(f"--model {args.model}: its tokenizer has no chat template, which conversational "
                             "prompts (lists of messages) need; pass plain string prompts, or a model with one")
        self.autocast_dtype = resolve_autocast_dtype(args.mixed_precision, self.device, dtype)
        self.ref_model = None
        if self.config.beta > 0 and not args.lora_rank:  # the reference is the initial model, also when resuming
            ref = (copy.deepcopy(self.model) if checkpoint is None
                   else load_model_and_tokenizer(args.model, dtype, str(self.device))[0])
            ref_dtype = (dtype if args.ref_dtype == "auto" and self.device.type == "cpu"
                         else resolve_dtype(args.ref_dtype, self.device))
            self.ref_model = ref.to(ref_dtype).eval().requires_grad_(False)
        if args.lora_rank:
            self.model = add_lora(self.model, args.lora_rank, args.lora_alpha, str(checkpoint) if checkpoint else None)
        if args.gradient_checkpointing:  # the newer transformers name first, the older one before it existed
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.decoder = self.ref_decoder = None
        if self.forward_kind == "shared_prefix":
            self.decoder = DecoderLM(self.model)
            self.ref_decoder = None if self.ref_model is None else DecoderLM(self.ref_model)
        # Created only once every input has loaded, so a bad option leaves nothing behind.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.lock.held:
            self.lock.acquire()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.learning_rate, weight_decay=0.0)
        self.rollout = self._make_rollout()
        self.fused_linear_loss = FusedLinearPolicyLoss(self.config)  # the temperature comes with each call
        self.replay = ReplayBuffer(args.replay_staleness)
        self.log = MetricsLog(self.output_dir)
        self.start_step, self.nonfinite_streak = 0, 0
        if checkpoint is not None:
            state = load_training_state(checkpoint, self.optimizer, verify=False)  # verified before the model loaded
            self.start_step = int(state["step"])
            self.log.truncate(self.start_step)
            extra = load_extra_state(checkpoint, verify=False)
            if "replay" in extra:  # the batches an uninterrupted run would replay next
                self.replay.load_state_dict(extra["replay"], self.device)
        if args.save_every:  # fail now rather than at the first save, minutes in; AdamW's moments come later
            moments = 0 if self.optimizer.state else 2 * sum(p.numel() * p.element_size() for p in self.trainable)
            check_free_space(self.output_dir, checkpoint_bytes(self.model, self.optimizer) + moments)

    def _reward_set(self, reward_funcs) -> RewardSet:
        """The run's rewards: ``reward_funcs`` if given, else ``--reward`` (default ``math``)."""
        args = self.args
        math_options = {"format_reward": args.format_reward, "incorrect_reward": self.config.incorrect_reward,
                        "require_derivation": args.require_derivation}
        specs = list(reward_funcs) if reward_funcs is not None else list(args.reward or ("math",))
        functions = [load_reward_function(f, math_options) if isinstance(f, str) else f for f in specs]
        for function in functions:
            if not callable(function):
                raise TypeError(f"reward_funcs holds {function!r}, which is neither callable nor a --reward spec")
        return RewardSet(functions, args.reward_weights)

    def _check_columns(self, rows, data: str) -> None:
        """Refuse, before the model loads, a data set without the columns the math reward reads."""
        if self.math_reward is None:
            return
        needed = ["answer"] + (["question"] if self.math_reward.require_derivation else [])
        for name in needed:
            row = next((r for r in rows if r.columns.get(name) is None), None)
            if row is not None:
                why = (" (--require-derivation checks the answer against the question's numbers)"
                       if name == "question" else "")
                raise ValueError(f"--data {data}: {row.source} has no {name!r} column, which the math reward reads"
                                 f"{why}; pass --reward with a function for this data, or add the column")

    def _eval_data(self):
        """(math evaluation examples, or None; reward evaluation rows, or None) of ``--eval-data``."""
        args = self.args
        if not args.eval_every:
            return [], None
        source = args.eval_data or args.data
        gsm8k_like = source in DATASETS or source.endswith(".jsonl")
        if self.math_reward is not None and gsm8k_like:
            try:
                return load_examples(source, args.eval_data_split)[: args.eval_prompts], None
            except ValueError:  # not GSM8K-format: evaluate by the reward functions instead
                pass
        rows = load_prompt_rows(source, args.eval_data_split, args.prompt_style)[: args.eval_prompts]
        return None, rows

    def _engine_paths(self, model):
        """(rollout, training forward) with ``auto`` resolved: the engine's when its decoder covers ``model``,
        else transformers', said in one log line.

        Raises:
            ValueError: the engine's sampler or forward chosen explicitly for a model its decoder does not cover.
        """
        args = self.args
        try:
            DecoderLM(model)
            problem = None
        except ValueError as error:
            problem = str(error)
        rollout, forward = args.rollout, args.training_forward
        if problem is None:
            return ("engine" if rollout == "auto" else rollout), ("shared_prefix" if forward == "auto" else forward)
        chosen = [f for f, on in (("--rollout engine", rollout == "engine"),
                                  ("--training-forward shared_prefix", forward == "shared_prefix")) if on]
        if chosen:
            raise ValueError(f"{' and '.join(chosen)}: {problem}; pass --rollout hf --training-forward padded (or "
                             "leave both at auto) for this model")
        print(f"rlfuse: {problem}: sampling with transformers generate (--rollout hf) and training with its padded "
              "forward (--training-forward padded)")
        return "hf", "padded"

    def _logprobs(self, model, batch: RolloutBatch, decoder, **kwargs) -> TokenLogprobs:
        """Log-probs of ``batch`` under ``model`` through this run's forward and --loss-impl, without grad."""
        with torch.no_grad():
            return completion_logprobs(model, batch, self.args.temperature, loss_impl=self.args.loss_impl,
                                       decoder=decoder, num_generations=self.args.num_generations, **kwargs)

    def _ref_logps(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, T) log-probs under the reference: the base model with adapters disabled under LoRA, else the
        frozen copy."""
        if self.args.lora_rank:
            with self.model.disable_adapter():
                return self._logprobs(self.model, batch, self.decoder).logps
        return self._logprobs(self.ref_model, batch, self.ref_decoder).logps

    def _make_rollout(self):
        if self.rollout_kind == "hf":
            return HFRollout(self.model, self.tokenizer)
        stop = self.args.stop_after_answer and self.math_reward is not None
        return SharedPrefixSampler(self.model, self.tokenizer, stop_pattern=ANSWER_LINE_STOP if stop else None)

    def _find_resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint ``--resume`` continues from, verified against its manifest before anything is read."""
        if self.args.resume:
            checkpoint = find_checkpoint(self.output_dir)
            if checkpoint is None:
                raise ValueError(f"--resume: {self.output_dir} holds no checkpoint; start a new run without --resume")
            verify_checkpoint(checkpoint)
            return checkpoint
        if find_checkpoint(self.output_dir) or (self.output_dir / METRICS_FILE).exists():
            raise ValueError(
                f"{self.output_dir} already holds a run; pass --resume to continue it, or choose another --output-dir"
            )
        return None

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def train(self) -> Path:
        """Run steps ``start_step + 1 .. args.steps``; checkpoint every ``save_every`` steps and at the end
        (never when ``save_every`` is 0). The output folder's lock is dropped when it returns or raises.

        Raises:
            NonFiniteStepsError: ``--max-nonfinite-steps`` steps in a row skipped their update (the step's record
                is logged; no checkpoint is written after it, so the last one holds the last good weights).
            rlfuse.engine.reward_funcs.RewardFunctionError: a reward function raised or returned a bad value.
        """
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> Path:
        args = self.args
        if args.eval_on_start and self.start_step == 0:
            self.evaluate(0)
        with tqdm(total=args.steps, initial=self.start_step, desc=f"{args.algo}", unit="step") as bar:
            for step in range(self.start_step + 1, args.steps + 1):
                self._train_step(step, bar)
        return self.output_dir

    def _train_step(self, step: int, bar) -> None:
        """One step of :meth:`train`: step, evaluate, log, stop if non-finite, checkpoint, report."""
        args = self.args
        record = self.step(step)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            record.update(self.evaluate(step))
        self.log.append(record)
        self._stop_if_nonfinite(step, record)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            state = {"step": step, "args": dataclasses.asdict(args), "config": dataclasses.asdict(self.config),
                     "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype)}
            extra = {"replay": self.replay.state_dict()} if args.replay_staleness else None
            save_checkpoint(self.output_dir, self.model, self.tokenizer, self.optimizer, state, extra)
        postfix = {"reward": f"{record['reward_mean']:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if record.get("accuracy") is not None:
            postfix["acc"] = f"{record['accuracy']:.2f}"
        bar.set_postfix(postfix)
        bar.update(1)

    def _stop_if_nonfinite(self, step: int, record: Dict[str, object]) -> None:
        """Count steps in a row whose update was skipped as non-finite; stop at ``--max-nonfinite-steps``."""
        self.nonfinite_streak = self.nonfinite_streak + 1 if record["nonfinite_skipped"] else 0
        if self.nonfinite_streak >= self.args.max_nonfinite_steps:
            last = find_checkpoint(self.output_dir)
            kept = "no checkpoint was written"
            if last is not None:
                saved = json.loads((last / "trainer_state.json").read_text())["step"]
                kept = f"the last checkpoint, {last}, is intact (step {saved})"
            raise NonFiniteStepsError(
                f"step {step}: the loss or the gradient norm was not finite for {self.nonfinite_streak} steps in a "
                f"row (loss {record['loss']}, grad_norm {record['grad_norm']}); each update was skipped, so the "
                f"weights are those before step {step - self.nonfinite_streak + 1}, and {kept}. Lower "
                "--learning-rate or --max-grad-norm, check the rewards, then --resume; --max-nonfinite-steps sets "
                "how many such steps in a row stop the run")

    def step(self, step: int) -> Dict[str, object]:
        """One RL step on ``prompts_per_step`` prompts × G samples, under ``--mixed-precision``; returns its
        metrics record.

        An update whose loss or gradient norm is not finite is skipped: weights and optimizer state stay as they
        were, and ``nonfinite_skipped`` counts such updates.
        """
        with autocast(self.device, self.autocast_dtype):
            return self._step(step)

    def _step(self, step: int) -> Dict[str, object]:
        """One step as its phases: sample, score, advantages, behaviour log-probs, update (with replay), record."""
        reset_peak_memory(self.device)
        start = time.perf_counter()
        sampled = self._sample(step)
        advantages = compute_advantages(sampled.rewards, self.args.num_generations, self.config).to(self.device)
        times = {"time_rollout": time.perf_counter() - start}
        start = time.perf_counter()
        old, ref_logps = self._behaviour_logprobs(sampled.batch)
        times["time_logprobs"] = time.perf_counter() - start
        start = time.perf_counter()
        update = self._update(step, sampled.batch, advantages, old, ref_logps)
        times["time_update"] = time.perf_counter() - start
        if self.args.replay_staleness and not update.skipped:
            self.replay.add(ReplayItem(step, sampled.batch, advantages, old.logps, old.vocab_mean, ref_logps))
        return self._step_record(step, sampled, update, times)

    def _sample(self, step: int) -> SampledBatch:
        """The step's prompts, G completions each, and their scores (the reward functions run here)."""
        args = self.args
        rows = step_examples(self.train_rows, step, args.prompts_per_step, args.seed)
        prompts = [prompt_token_ids(self.tokenizer, row.prompt) for row in rows]
        batch = self.rollout.generate(prompts, args.num_generations, args.max_new_tokens, args.temperature)
        texts = self.tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
        truncated = batch_truncated(batch, self.rollout.stop_ids)
        scores = score(self.rewards, rows, args.num_generations, texts, batch, truncated, step, args.steps)
        return SampledBatch(batch, truncated, scores, torch.tensor(scores.total, dtype=torch.float32))

    def _behaviour_logprobs(self, batch: RolloutBatch):
        """(old, ref_logps): the behaviour policy's :class:`TokenLogprobs` when an update or the replay needs
        them (the sampler's recorded ones, free, unless ``--recompute-old-logps``), else None; the reference's
        (B, T) log-probs when ``beta`` > 0, else None."""
        args = self.args
        old = ref_logps = None
        needs_old = args.num_iterations > 1 or args.replay_staleness > 0  # replay keeps the behaviour log-probs
        if needs_old and batch.logps is not None and not args.recompute_old_logps:
            old = TokenLogprobs(batch.logps, None, batch.vocab_mean)  # recorded by the sampler: free
        elif needs_old:
            old = self._logprobs(self.model, batch, self.decoder, return_vocab_mean=self.config.loss_type == "rover")
        if self.config.beta > 0:
            ref_logps = self._ref_logps(batch)
        return old, ref_logps

    def _update(self, step: int, batch: RolloutBatch, advantages, old, ref_logps) -> StepUpdate:
        """``--num-iterations`` optimizer steps on the fresh batch (its informative groups) and the replayed ones;
        an update whose loss or gradient norm is not finite is skipped."""
        args = self.args
        replayed = list(self.replay)
        scale = 1 / (1 + len(replayed))  # the fresh batch and each replayed one weigh the same
        keep = torch.ones(advantages.shape[0], dtype=torch.bool, device=self.device)
        if args.skip_zero_advantage_groups and zero_advantage_has_zero_gradient(self.config):
            keep = informative_rows(advantages, args.num_generations)
        update = StepUpdate(keep, kept_share(batch.completion_mask, keep, self.config.loss_agg_mode))
        trained = batch if bool(keep.all()) else select_rows(batch, keep)
        for _ in range(args.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            update.loss, update.metrics = self._fresh_backward(trained, advantages, old, ref_logps, update,
                                                               scale if replayed else None)
            update.replay_record = replay_backward(replayed, step, self._replay_loss, scale)
            update.grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, args.max_grad_norm)
            if not (math.isfinite(update.loss.item()) and math.isfinite(update.grad_norm.item())):
                # Skipped, as Megatron and DeepSpeed skip such steps: AdamW would spread the NaN to every weight.
                self.optimizer.zero_grad(set_to_none=True)
                update.skipped += 1
                continue
            self.optimizer.step()
        return update

    def _fresh_backward(self, batch: RolloutBatch, advantages, old, ref_logps, update: StepUpdate,
                        scale: Optional[float]):
        """Backward of the fresh batch's loss on the rows ``update.keep`` (times ``scale`` when batches are
        replayed beside it); returns (loss, metrics). With no row kept the gradient is 0, and the optimizer still
        steps on it."""
        keep = update.keep
        if not bool(keep.any()):
            for param in self.trainable:
                param.grad = torch.zeros_like(param)
            return torch.zeros((), device=self.device), update.metrics
        # None means on-policy: one update per batch, so the sampling policy is the current one.
        old_logps = None if old is None or self.args.num_iterations == 1 else old.logps[keep]
        old_vocab_mean = None if old_logps is None or old.vocab_mean is None else old.vocab_mean[keep]
        loss, metrics = self._loss(batch, advantages[keep], old_logps,
                                   None if ref_logps is None else ref_logps[keep], old_vocab_mean)
        loss = loss * update.share
        (loss * scale if scale is not None else loss).backward()
        return loss, metrics

    def _step_record(self, step: int, sampled: SampledBatch, update: StepUpdate, times: Dict[str, float]):
        """The step's metrics record (``metrics.jsonl``)."""
        rewards, mask, metrics = sampled.rewards, sampled.batch.completion_mask, update.metrics
        record = {
            "step": step,
            "loss": update.loss.item(),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            **{f"reward/{name}": mean for name, mean in sampled.scores.means.items()},
            **sampled.scores.logged,
            "completion_len_mean": mask.sum(1).float().mean().item(),
            "truncated_rate": sampled.truncated.float().mean().item(),
            "kl": metrics["kl"].item() if metrics["kl"] is not None and self.config.beta > 0 else None,
            "clip_frac": _item(metrics["clip_frac"]),
            "ratio_mean": _item(metrics["ratio_mean"]),
            "entropy": _item(metrics["entropy"]),
            "trained_groups_frac": update.keep.float().mean().item(),
            "grad_norm": update.grad_norm.item(),
            "nonfinite_skipped": update.skipped,
            "tokens_per_s": sampled.batch.num_completion_tokens / sum(times.values()),
            **times,
            "peak_mem_gb": peak_memory_gb(self.device),
        }
        if self.math_reward is not None and self.math_reward.last is not None:
            scored, truncated = self.math_reward.last, sampled.truncated.tolist()
            record["accuracy"] = float(np.mean(solved(scored.correct, truncated)))
            record["format_rate"] = float(np.mean(scored.formatted))
            if scored.derived is not None:
                record["derived_rate"] = float(np.mean(solved(scored.derived, truncated)))
        if self.args.replay_staleness:
            record.update(update.replay_record)
        return record

    def _loss(self, batch: RolloutBatch, advantages, old_logps, ref_logps, old_vocab_mean):
        """The policy loss and its metrics (with ``entropy``) through ``--loss-impl``."""
        config, temperature = self.config, self.args.temperature  # both paths take it per call
        rover = config.loss_type == "rover"
        forward = dict(decoder=self.decoder, num_generations=self.args.num_generations,
                       checkpoint=self.args.gradient_checkpointing)
        if self.args.loss_impl == "fused_linear":
            hidden, weight, bias = completion_hidden_states(self.model, batch, **forward)
            return self.fused_linear_loss(hidden, weight, batch.completion_ids, old_logps, advantages,
                                          batch.completion_mask, ref_logps, old_vocab_mean, bias,
                                          temperature=temperature)
        out = completion_logprobs(self.model, batch, temperature, True, rover, **forward)
        # Entropy is only logged and V̄ enters ROVER's target under stop-gradient: detaching both frees
        # their (B, T, V) autograd buffers before the backward.
        logps, entropy = out.logps, out.entropy.detach()
        vocab_mean = out.vocab_mean.detach() if rover else None
        del out
        if old_logps is None:
            old_logps, old_vocab_mean = logps.detach(), vocab_mean
        loss, metrics = policy_loss(logps, old_logps, advantages, batch.completion_mask, config=config,
                                    ref_logps=ref_logps, vocab_mean=vocab_mean, old_vocab_mean=old_vocab_mean)
        mask = batch.completion_mask
        metrics["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        return loss, metrics

    def _replay_loss(self, item: ReplayItem):
        """The loss of a replayed batch against the behaviour policy that sampled it."""
        return self._loss(item.batch, item.advantages, item.behaviour_logps, item.ref_logps,
                          item.behaviour_vocab_mean)

    @torch.no_grad()
    def evaluate(self, step: Optional[int] = None) -> Dict[str, object]:
        """Metrics of the first ``eval_prompts`` evaluation prompts.

        With the math reward and GSM8K-format data: :func:`rlfuse.engine.evaluate.flat_metrics` (greedy
        ``eval_accuracy``; ``eval_pass@k`` and ``eval_diversity`` with ``--eval-samples``). Otherwise greedy
        completions scored by the run's reward functions (:func:`rlfuse.engine.scoring.evaluate_rewards`:
        ``eval_reward_mean``, ``eval_reward/<name>``).

        With a ``step``, the whole result, per-problem records included, is also written to
        ``<output_dir>/eval/step_<step>.json`` (written to a temporary file, then renamed)."""
        args = self.args
        with autocast(self.device, self.autocast_dtype):
            if self.eval_examples is not None:
                result = evaluate_examples(self.rollout, self.tokenizer, self.eval_examples, args.eval_samples,
                                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           batch_size=max(1, 32 // max(1, args.eval_samples)), seed=args.seed,
                                           prompt_style=args.prompt_style)
            else:
                result = evaluate_rewards(self.rollout, self.tokenizer, self.rewards, self.eval_rows,
                                          args.max_new_tokens, step, args.steps)
        if step is not None:
            folder = self.output_dir / EVAL_DIR
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".step_{step:06d}.json.tmp"
            partial.write_text(json.dumps({"step": step, **result}, indent=1) + "\n")
            partial.replace(folder / f"step_{step:06d}.json")
        if self.eval_examples is not None:
            return flat_metrics(result)
        return {key: value for key, value in result.items() if key != "problems"}


def train(args: TrainArgs, reward_funcs: Optional[Sequence[Union[str, RewardFunc]]] = None) -> Path:
    """Build a :class:`Trainer` for ``args`` (and ``reward_funcs``, see :class:`Trainer`) and run it; returns the
    output folder."""
    return Trainer(args, reward_funcs).train()

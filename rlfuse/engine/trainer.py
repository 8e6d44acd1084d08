"""The RL training loop: sample, score, compute advantages and log-probs, update, log, checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from rlfuse.algos import FusedLinearPolicyLoss, compute_advantages, policy_loss
from rlfuse.algos.fused_linear import masked_targets
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.checkpoint import (check_free_space, checkpoint_bytes, find_checkpoint, load_extra_state,
                                     load_training_state, save_checkpoint)
from rlfuse.engine.data import Example, build_prompt, load_examples
from rlfuse.engine.evaluate import evaluate_examples, flat_metrics
from rlfuse.engine.memory import peak_memory_gb, reset_peak_memory
from rlfuse.engine.metrics import METRICS_FILE, MetricsLog
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.model import add_lora, load_model_and_tokenizer, resolve_dtype
from rlfuse.engine.packing import shared_prefix_completion_hidden_states
from rlfuse.engine.precision import autocast, resolve_autocast_dtype
from rlfuse.engine.replay import ReplayBuffer, ReplayItem, replay_backward
from rlfuse.engine.rewards import ANSWER_LINE_STOP, gsm8k_rewards, solved
from rlfuse.engine.rollout import HFRollout, RolloutBatch, batch_truncated
from rlfuse.engine.sampler import SharedPrefixSampler
from rlfuse.engine.zero_advantage import informative_rows, kept_share, select_rows, zero_advantage_has_zero_gradient
from rlfuse.kernels import TokenLogprobs, linear_token_logprobs, token_logprobs

EVAL_DIR = "eval"  # <output_dir>/eval/step_<step>.json: each evaluation's whole result, per problem


def _item(value: Optional[torch.Tensor]) -> Optional[float]:
    return None if value is None else value.item()


def _forward_inputs(batch: RolloutBatch):
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def completion_hidden_states(model, batch: RolloutBatch, decoder: Optional[DecoderLM] = None,
                             num_generations: int = 1, checkpoint: bool = False):
    """(hidden (B, T, H), lm_head weight (V, H), bias or None): the last hidden states that predict the T
    completion tokens, and the LM head, for the fused-linear loss.

    With ``decoder`` (a :class:`DecoderLM` over ``model``) they come from the shared-prefix packed forward
    (:mod:`rlfuse.engine.packing`; rows in groups of ``num_generations`` sharing a prompt, ``checkpoint``
    recomputes layers in the backward); without it, from transformers' padded forward of every row (a
    strided view, never copied).

    Raises:
        ValueError: a model whose logits are not a plain linear map of the hidden states (logit soft-capping
            or scaling); use ``--loss-impl logits`` for it. Rows of a group with different prompts.
    """
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the model applies {name} to its logits, which the fused-linear loss does not; "
                             "pass --loss-impl logits")
    head = model.get_output_embeddings()
    if decoder is not None:
        hidden = shared_prefix_completion_hidden_states(decoder, batch, num_generations, checkpoint)
    else:
        num_completion = batch.completion_ids.shape[1]
        hidden = model.get_decoder()(**_forward_inputs(batch)).last_hidden_state[:, -num_completion - 1:-1]
    return hidden, head.weight, head.bias


def completion_logprobs(model, batch: RolloutBatch, temperature: float, return_entropy: bool = False,
                        return_vocab_mean: bool = False, loss_impl: str = "logits",
                        decoder: Optional[DecoderLM] = None, num_generations: int = 1,
                        checkpoint: bool = False) -> TokenLogprobs:
    """:class:`TokenLogprobs` (B, T) float32 of ``batch.completion_ids`` under ``model`` at ``temperature``.

    ``loss_impl="logits"`` forms the logits of the T positions that predict completion tokens and runs
    :func:`rlfuse.kernels.token_logprobs`; ``"fused_linear"`` stops at the hidden states and uses
    :func:`rlfuse.kernels.linear_token_logprobs`, never materializing the logits. ``decoder``,
    ``num_generations`` and ``checkpoint`` choose the forward, as in :func:`completion_hidden_states`.
    """
    if loss_impl == "fused_linear":
        hidden, weight, bias = completion_hidden_states(model, batch, decoder, num_generations, checkpoint)
        out = linear_token_logprobs(hidden, weight, masked_targets(batch.completion_ids, batch.completion_mask),
                                    bias, temperature, return_entropy, return_vocab_mean)
    else:
        if decoder is not None:
            hidden = shared_prefix_completion_hidden_states(decoder, batch, num_generations, checkpoint)
            logits = decoder.logits(hidden)
        else:
            num_completion = batch.completion_ids.shape[1]
            logits = model(**_forward_inputs(batch), logits_to_keep=num_completion + 1).logits[:, :-1]
        out = token_logprobs(logits, batch.completion_ids, temperature, return_entropy, return_vocab_mean)
    return out if isinstance(out, TokenLogprobs) else TokenLogprobs(out, None, None)


def step_examples(examples: List[Example], step: int, per_step: int, seed: int) -> List[Example]:
    """The prompts of 1-based ``step``: consecutive slices of a seeded shuffle, reshuffled every epoch.

    Depends only on (step, seed), so a resumed run sees the same prompts as an uninterrupted one.
    """
    chosen = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, index = divmod(position, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        chosen.append(examples[int(order[index])])
    return chosen


class Trainer:
    """Runs :class:`TrainArgs` end to end; ``train()`` returns the output folder."""

    def __init__(self, args: TrainArgs):
        args.validate()
        self.args = args
        self.config = args.loss_config()
        self.device = args.torch_device()
        self.output_dir = Path(args.output_dir or f"runs/{args.algo}-{datetime.now():%Y%m%d-%H%M%S}")
        checkpoint = self._find_resume_checkpoint()
        self.train_examples = load_examples(args.data, "train")
        eval_data = args.eval_data or args.data
        self.eval_examples = load_examples(eval_data, "test")[: args.eval_prompts] if args.eval_every else []
        self._seed(args.seed)
        dtype = resolve_dtype(args.dtype, self.device)
        # A LoRA checkpoint holds only the adapters: the base comes from --model.
        source = str(checkpoint) if checkpoint and not args.lora_rank else args.model
        self.model, self.tokenizer = load_model_and_tokenizer(source, dtype, str(self.device))
        self.autocast_dtype = resolve_autocast_dtype(args.mixed_precision, self.device, dtype)
        self.ref_model = None
        if self.config.beta > 0 and not args.lora_rank:  # the reference is the initial model, also when resuming
            ref = copy.deepcopy(self.model) if checkpoint is None else load_model_and_tokenizer(args.model, dtype, str(self.device))[0]
            ref_dtype = dtype if args.ref_dtype == "auto" and self.device.type == "cpu" else resolve_dtype(args.ref_dtype, self.device)
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
        if args.training_forward == "shared_prefix":
            self.decoder = self._decoder(self.model)
            self.ref_decoder = None if self.ref_model is None else self._decoder(self.ref_model)
        # Created only once every input has loaded, so a bad option leaves nothing behind.
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.learning_rate, weight_decay=0.0)
        self.rollout = self._make_rollout()
        self.fused_linear_loss = FusedLinearPolicyLoss(self.config, temperature=args.temperature)
        self.replay = ReplayBuffer(args.replay_staleness)
        self.log = MetricsLog(self.output_dir)
        self.start_step = 0
        if checkpoint is not None:
            state = load_training_state(checkpoint, self.optimizer)
            self.start_step = int(state["step"])
            self.log.truncate(self.start_step)
            extra = load_extra_state(checkpoint)
            if "replay" in extra:  # the batches an uninterrupted run would replay next
                self.replay.load_state_dict(extra["replay"], self.device)
        if args.save_every:  # fail now rather than at the first save, minutes in; AdamW's moments come later
            moments = 0 if self.optimizer.state else 2 * sum(p.numel() * p.element_size() for p in self.trainable)
            check_free_space(self.output_dir, checkpoint_bytes(self.model, self.optimizer) + moments)

    @staticmethod
    def _decoder(model) -> DecoderLM:
        try:
            return DecoderLM(model)
        except ValueError as error:
            raise ValueError(f"--training-forward shared_prefix: {error}; pass --training-forward padded") from None

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
        if self.args.rollout == "hf":
            return HFRollout(self.model, self.tokenizer)
        try:
            return SharedPrefixSampler(self.model, self.tokenizer,
                                       stop_pattern=ANSWER_LINE_STOP if self.args.stop_after_answer else None)
        except ValueError as error:
            raise ValueError(f"--rollout engine: {error}; pass --rollout hf for this model") from None

    def _find_resume_checkpoint(self) -> Optional[Path]:
        if self.args.resume:
            checkpoint = find_checkpoint(self.output_dir)
            if checkpoint is None:
                raise ValueError(f"--resume: {self.output_dir} holds no checkpoint; start a new run without --resume")
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
        (never when ``save_every`` is 0)."""
        args = self.args
        bar = tqdm(total=args.steps, initial=self.start_step, desc=f"{args.algo}", unit="step")
        for step in range(self.start_step + 1, args.steps + 1):
            record = self.step(step)
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                record.update(self.evaluate(step))
            self.log.append(record)
            if args.save_every and (step % args.save_every == 0 or step == args.steps):
                state = {"step": step, "args": dataclasses.asdict(args), "config": dataclasses.asdict(self.config),
                         "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype)}
                extra = {"replay": self.replay.state_dict()} if args.replay_staleness else None
                save_checkpoint(self.output_dir, self.model, self.tokenizer, self.optimizer, state, extra)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
        bar.close()
        return self.output_dir

    def step(self, step: int) -> Dict[str, object]:
        """One RL step on ``prompts_per_step`` prompts × G samples, under ``--mixed-precision``; returns its
        metrics record."""
        with autocast(self.device, self.autocast_dtype):
            return self._step(step)

    def _step(self, step: int) -> Dict[str, object]:
        args, config = self.args, self.config
        reset_peak_memory(self.device)
        start = time.perf_counter()
        examples = step_examples(self.train_examples, step, args.prompts_per_step, args.seed)
        prompts = [build_prompt(self.tokenizer, ex.question, self.args.prompt_style) for ex in examples]
        batch = self.rollout.generate(prompts, args.num_generations, args.max_new_tokens, args.temperature)
        texts = self.tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
        golds = [ex.gold for ex in examples for _ in range(args.num_generations)]
        truncated = batch_truncated(batch, self.rollout.stop_ids)
        questions = [ex.question for ex in examples for _ in range(args.num_generations)]
        scored = gsm8k_rewards(texts, golds, args.format_reward, incorrect_reward=config.incorrect_reward,
                               truncated=truncated.tolist(), questions=questions if args.require_derivation else None)
        rewards = torch.tensor(scored.rewards, dtype=torch.float32)
        advantages = compute_advantages(rewards, args.num_generations, config).to(self.device)
        time_rollout = time.perf_counter() - start

        start = time.perf_counter()
        rover = config.loss_type == "rover"
        old = ref_logps = None
        needs_old = args.num_iterations > 1 or args.replay_staleness > 0  # replay keeps the behaviour log-probs
        if needs_old and batch.logps is not None and not args.recompute_old_logps:
            old = TokenLogprobs(batch.logps, None, batch.vocab_mean)  # recorded by the sampler: free
        elif needs_old:
            old = self._logprobs(self.model, batch, self.decoder, return_vocab_mean=rover)
        if self.config.beta > 0:
            ref_logps = self._ref_logps(batch)
        time_logprobs = time.perf_counter() - start

        start = time.perf_counter()
        replayed = list(self.replay)
        scale = 1 / (1 + len(replayed))  # the fresh batch and each replayed one weigh the same
        keep = torch.ones(advantages.shape[0], dtype=torch.bool, device=self.device)
        if args.skip_zero_advantage_groups and zero_advantage_has_zero_gradient(config):
            keep = informative_rows(advantages, args.num_generations)
        share = kept_share(batch.completion_mask, keep, config.loss_agg_mode)
        trained = batch if bool(keep.all()) else select_rows(batch, keep)
        metrics = dict.fromkeys(("kl", "clip_frac", "ratio_mean", "entropy"))
        for _ in range(args.num_iterations):
            # None means on-policy: one update per batch, so the sampling policy is the current one.
            old_logps = None if old is None or args.num_iterations == 1 else old.logps[keep]
            old_vocab_mean = None if old_logps is None or old.vocab_mean is None else old.vocab_mean[keep]
            self.optimizer.zero_grad(set_to_none=True)
            if bool(keep.any()):
                loss, metrics = self._loss(trained, advantages[keep], old_logps,
                                           None if ref_logps is None else ref_logps[keep], old_vocab_mean)
                loss = loss * share
                (loss * scale if replayed else loss).backward()
            else:  # no group can move the policy: the gradient is 0, and the optimizer still steps on it
                loss = torch.zeros((), device=self.device)
                for param in self.trainable:
                    param.grad = torch.zeros_like(param)
            replay_record = replay_backward(replayed, step, self._replay_loss, scale)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, args.max_grad_norm)
            self.optimizer.step()
        time_update = time.perf_counter() - start
        if args.replay_staleness:
            self.replay.add(ReplayItem(step, batch, advantages, old.logps, old.vocab_mean, ref_logps))

        mask = batch.completion_mask
        elapsed = time_rollout + time_logprobs + time_update
        record = {
            "step": step,
            "loss": loss.item(),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "accuracy": float(np.mean(solved(scored.correct, truncated.tolist()))),
            "format_rate": float(np.mean(scored.formatted)),
            "completion_len_mean": mask.sum(1).float().mean().item(),
            "truncated_rate": truncated.float().mean().item(),
            "kl": metrics["kl"].item() if metrics["kl"] is not None and config.beta > 0 else None,
            "clip_frac": _item(metrics["clip_frac"]),
            "ratio_mean": _item(metrics["ratio_mean"]),
            "entropy": _item(metrics["entropy"]),
            "trained_groups_frac": keep.float().mean().item(),
            "grad_norm": grad_norm.item(),
            "tokens_per_s": batch.num_completion_tokens / elapsed,
            "time_rollout": time_rollout,
            "time_logprobs": time_logprobs,
            "time_update": time_update,
            "peak_mem_gb": peak_memory_gb(self.device),
        }
        if scored.derived is not None:
            record["derived_rate"] = float(np.mean(solved(scored.derived, truncated.tolist())))
        if args.replay_staleness:
            record.update(replay_record)
        return record

    def _loss(self, batch: RolloutBatch, advantages, old_logps, ref_logps, old_vocab_mean):
        """The policy loss and its metrics (with ``entropy``) through ``--loss-impl``."""
        config, temperature = self.config, self.args.temperature
        rover = config.loss_type == "rover"
        forward = dict(decoder=self.decoder, num_generations=self.args.num_generations,
                       checkpoint=self.args.gradient_checkpointing)
        if self.args.loss_impl == "fused_linear":
            hidden, weight, bias = completion_hidden_states(self.model, batch, **forward)
            return self.fused_linear_loss(hidden, weight, batch.completion_ids, old_logps, advantages,
                                          batch.completion_mask, ref_logps, old_vocab_mean, bias)
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
    def evaluate(self, step: Optional[int] = None) -> Dict[str, float]:
        """Metrics of the first ``eval_prompts`` test questions (:func:`rlfuse.engine.evaluate.flat_metrics`):
        greedy ``eval_accuracy``, and ``eval_pass@k`` and ``eval_diversity`` with ``--eval-samples``.

        With a ``step``, the whole result, per-problem records included, is also written to
        ``<output_dir>/eval/step_<step>.json`` (written to a temporary file, then renamed)."""
        args = self.args
        with autocast(self.device, self.autocast_dtype):
            result = evaluate_examples(self.rollout, self.tokenizer, self.eval_examples, args.eval_samples,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       batch_size=max(1, 32 // max(1, args.eval_samples)), seed=args.seed,
                                       prompt_style=args.prompt_style)
        if step is not None:
            folder = self.output_dir / EVAL_DIR
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".step_{step:06d}.json.tmp"
            partial.write_text(json.dumps({"step": step, **result}, indent=1) + "\n")
            partial.replace(folder / f"step_{step:06d}.json")
        return flat_metrics(result)


def train(args: TrainArgs) -> Path:
    """Build a :class:`Trainer` for ``args`` and run it; returns the output folder."""
    return Trainer(args).train()

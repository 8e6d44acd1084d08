"""Rollout: sample G completions per prompt. One small interface, so that samplers can be swapped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence

import torch


@dataclass
class RolloutBatch:
    """Prompts and sampled completions, B = prompts × G rows in contiguous groups of G.

    Attributes:
        prompt_ids: (B, P) int64, left-padded.
        prompt_mask: (B, P) int64, 1 on real prompt tokens.
        completion_ids: (B, T) int64, right-padded.
        completion_mask: (B, T) bool, True up to and including the first stop token.
        logps: (B, T) float32 log-probs of the sampled tokens under softmax(logits / temperature), when
            the sampler recorded them (None otherwise).
        vocab_mean: (B, T) float32 vocabulary means of those log-probs, likewise.
        truncated: (B,) bool, True for completions cut at the length limit, when the sampler knows it (it
            also stops at a pattern; None otherwise: see :func:`batch_truncated`).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: Optional[torch.Tensor] = None
    vocab_mean: Optional[torch.Tensor] = None
    truncated: Optional[torch.Tensor] = None

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens that count (before and including each stop token)."""
        return int(self.completion_mask.sum())


class Rollout(Protocol):
    """What the trainer needs from a sampler."""

    def generate(self, prompts: Sequence[List[int]], num_generations: int, max_new_tokens: int,
                 temperature: float, greedy: bool = False) -> RolloutBatch:
        """Sample ``num_generations`` completions of each prompt (token ids); greedy decoding when ``greedy``."""
        ...


def stop_token_ids(model, tokenizer) -> List[int]:
    """The ids that end a completion: the generation config's EOS ids plus the tokenizer's EOS token."""
    stop = model.generation_config.eos_token_id
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    return stop


def completion_mask_from_ids(completion_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) bool mask: True up to and including the first token in ``stop_ids``, everything if none."""
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device))
    stops_before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    return stops_before == 0


def truncated_rows(completion_ids: torch.Tensor, completion_mask: torch.Tensor, stop_ids) -> torch.Tensor:
    """(B,) bool: True for completions cut at the length limit, whose last real token is not a stop token.

    Args:
        completion_ids: (B, T) int64, right-padded.
        completion_mask: (B, T) bool, True up to and including each row's stop token.
        stop_ids: the stop token ids (a sequence or a 1-D int64 tensor).
    """
    last = (completion_mask.sum(1) - 1).clamp(min=0)
    last_ids = completion_ids.gather(1, last[:, None])[:, 0]
    stop = torch.as_tensor(stop_ids, dtype=torch.long, device=completion_ids.device)
    return ~torch.isin(last_ids, stop)


def batch_truncated(batch: RolloutBatch, stop_ids) -> torch.Tensor:
    """(B,) bool: the completions of ``batch`` cut at the length limit; ``batch.truncated`` when the sampler
    recorded it, otherwise those whose last token is none of ``stop_ids`` (:func:`truncated_rows`)."""
    if batch.truncated is not None:
        return batch.truncated
    return truncated_rows(batch.completion_ids, batch.completion_mask, stop_ids)


def left_pad(sequences: Sequence[List[int]], pad_id: int):
    """Left-pad token lists into ``(ids, mask)``, both (N, max_len) int64."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask


class HFRollout:
    """Sampling through transformers ``generate`` (pure ancestral sampling: no top-k, no top-p)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts, num_generations, max_new_tokens, temperature, greedy=False) -> RolloutBatch:
        """See :class:`Rollout`. Raises ``ValueError`` for an empty prompt list or non-positive lengths."""
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        if max_new_tokens < 1 or num_generations < 1:
            raise ValueError(f"max_new_tokens and num_generations must be >= 1, got {max_new_tokens}, {num_generations}")
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        ids = ids.repeat_interleave(num_generations, dim=0).to(device)
        mask = mask.repeat_interleave(num_generations, dim=0).to(device)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.stop_ids, **sampling,
            )
        finally:
            self.model.train(was_training)
        completion_ids = out[:, ids.shape[1]:]
        completion_mask = completion_mask_from_ids(completion_ids, self.stop_ids)
        completion_ids = torch.where(completion_mask, completion_ids, self.tokenizer.pad_token_id)
        return RolloutBatch(ids, mask, completion_ids, completion_mask)

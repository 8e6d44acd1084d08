"""Skipping the groups that cannot move the policy: rows whose advantages are all zero.

Under the advantage-weighted losses (``ppo_clip``: GRPO, Dr. GRPO, DAPO, GSPO; ``cispo``; ``gmpo``; ``rec``
without a regularizer) and no KL penalty, a sample whose advantage is 0 has a token loss of 0 and a gradient
of exactly 0, whatever its importance ratio. A group whose G rewards are equal (all wrong, or all right) has
advantage 0 in every row, and on a small model that is most groups: their training forward and backward are
pure waste. The trainer runs the loss on the other groups only and multiplies it by the share of the
aggregation's normalizer they hold (:func:`kept_share`), so the loss and its gradient equal those of the whole
batch. DAPO's "dynamic sampling" ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale") drops the
same groups but renormalizes over the ones left; here nothing is renormalized.
"""

from __future__ import annotations

import dataclasses

import torch

from rlfuse.algos import PolicyLossConfig
from rlfuse.engine.rollout import RolloutBatch

ADVANTAGE_WEIGHTED = ("ppo_clip", "cispo", "gmpo", "rec", "sapo", "vespo")


def zero_advantage_has_zero_gradient(config: PolicyLossConfig) -> bool:
    """True when a sample whose advantages are all 0 adds exactly 0 to ``config``'s loss and its gradient:
    an advantage-weighted loss type (not TOPR, whose negatives are weighted by their reward, nor ROVER),
    no KL penalty (beta 0) and no REC regularizer (OPMD's k2 term, AsymRE's forward KL)."""
    return config.loss_type in ADVANTAGE_WEIGHTED and config.beta == 0 and config.regularizer == "none"


def informative_rows(advantages: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) bool: the rows of the groups (G consecutive rows) in which some advantage is not 0.

    Args:
        advantages: (B,) or (B, T) float, B a multiple of ``num_generations``.

    Raises:
        ValueError: B not a multiple of ``num_generations``.
    """
    rows = advantages.reshape(advantages.shape[0], -1).ne(0).any(dim=1)
    if rows.numel() % num_generations:
        raise ValueError(f"{rows.numel()} rows are not groups of num_generations={num_generations}")
    return rows.view(-1, num_generations).any(dim=1).repeat_interleave(num_generations)


def kept_share(mask: torch.Tensor, keep: torch.Tensor, loss_agg_mode: str) -> float:
    """The share of ``rlfuse.algos.aggregate_loss``'s normalizer that the ``keep`` rows hold, so that
    ``aggregate_loss(l[keep], mask[keep], mode) * share == aggregate_loss(l, mask, mode)`` whenever the
    other rows' token losses are 0 (rows are selected without trimming columns, so T is unchanged).

    Args:
        mask: (B, T) bool completion mask.
        keep: (B,) bool rows kept.
        loss_agg_mode: one of ``rlfuse.algos.LOSS_AGG_MODES``.

    Raises:
        ValueError: an unknown ``loss_agg_mode``.
    """
    if loss_agg_mode == "token-mean":
        part, whole = mask[keep].sum(), mask.sum()
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        part, whole = keep.sum(), torch.tensor(keep.numel())
    elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        nonempty = mask.any(dim=1)
        part, whole = (nonempty & keep).sum(), nonempty.sum()
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")
    return float(part) / max(float(whole), 1.0)


def select_rows(batch: RolloutBatch, keep: torch.Tensor) -> RolloutBatch:
    """The rows ``keep`` ((B,) bool, whole groups) of every (B, ...) field of ``batch``; columns unchanged."""
    fields = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        fields[field.name] = None if value is None else value[keep.to(value.device)]
    return RolloutBatch(**fields)

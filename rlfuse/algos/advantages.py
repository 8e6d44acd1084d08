"""Group-relative advantages from scalar rewards (GRPO, Dr. GRPO, RLOO, RED-Drop) and TOPR's baseline advantage."""

from __future__ import annotations

from typing import Optional

import torch

from rlfuse.algos.configs import PolicyLossConfig
from rlfuse.kernels.dispatch import use_triton


def check_rewards(rewards: torch.Tensor, num_generations: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``rewards`` is a finite float (B,) tensor, B a multiple of G."""
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating-point tensor (B,), got {getattr(rewards, 'dtype', type(rewards))}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}")
    if rewards.numel() % num_generations:
        raise ValueError(
            f"the batch of {rewards.numel()} rewards is not a multiple of num_generations={num_generations}; "
            "rewards must come in contiguous groups of G samples of the same prompt"
        )
    # A host sync: done for CPU rewards (the engine's), skipped on an accelerator so the op stays async.
    if not rewards.is_cuda and not bool(torch.isfinite(rewards).all()):
        rows = (~torch.isfinite(rewards)).nonzero().flatten()[:8].tolist()
        raise ValueError(f"rewards contain NaN or infinite values (rows {rows}, first 8 shown); a group's mean and "
                         "std would turn every advantage of the batch into NaN. Fix the reward function before "
                         "computing advantages")


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages relative to the other samples of the same prompt.

    Args:
        rewards: (B,) float, in contiguous groups of G = ``num_generations`` samples of one prompt.
        num_generations: G, the group size.
        scale: ``group`` divides by the group's unbiased std + eps (GRPO, "DeepSeekMath", eq. 3);
            ``batch`` by the whole batch's unbiased std + eps; ``none`` keeps the centered reward
            (Dr. GRPO, "Understanding R1-Zero-Like Training").
        estimator: ``grpo`` centers on the group mean; ``rloo`` returns G/(G-1)·(r - group mean), the
            leave-one-out baseline ("Buy 4 REINFORCE Samples, Get a Baseline for Free!").
        eps: added to the std before dividing.

    Returns:
        (B,) float tensor of the rewards' dtype. A group of size 1 gets advantage 0. CUDA tensors (or
        ``RLFUSE_BACKEND=triton``) run a Triton kernel with no host sync; NaN and inf are then not checked.

    Raises:
        TypeError: rewards not a float tensor.
        ValueError: B not a multiple of G, NaN or infinite rewards, an unknown ``scale`` or ``estimator``.
    """
    check_rewards(rewards, num_generations)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"estimator must be 'grpo' or 'rloo', got {estimator!r}")
    if num_generations == 1:
        return torch.zeros_like(rewards)
    if use_triton(rewards):
        from rlfuse.kernels.advantages_triton import group_advantages_triton

        return group_advantages_triton(rewards, num_generations, scale, estimator, eps)
    # Shift each group by its first reward before averaging: the same math, but a group of equal rewards
    # centers to exactly 0 instead of a rounding residue that the std division would blow up.
    grouped = rewards.view(-1, num_generations)
    grouped = grouped - grouped[:, :1]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        centered = centered * (num_generations / (num_generations - 1))
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / ((rewards - rewards[:1]).std() + eps)
    return centered.reshape(-1)


def balanced_drop_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: str = "none",
    eps: float = 1e-6,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """RED-Drop's advantages: balance each group's below-mean samples against the others, then re-center.

    "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm" (Trinity-RFT's ``rec`` advantage with
    ``drop="balance"``): a sample is positive when its reward is >= the group mean. Where a group has more
    negatives than positives, the surplus negatives (chosen uniformly at random by ``generator``) get advantage
    0; the kept samples get reward - mean of the kept, divided by their population std + eps under
    ``scale="group"``. A group of one sample gets 0, like :func:`group_advantages`.

    Args:
        rewards: (B,) float, in contiguous groups of G = ``num_generations`` samples of one prompt.
        scale: ``none`` (the paper's) or ``group``.
        generator: the torch random generator that picks the dropped samples (default: the global one).

    Returns:
        (B,) float tensor of the rewards' dtype and device (computed on the CPU).

    Raises:
        TypeError, ValueError: as :func:`group_advantages`; a ``scale`` other than none or group.
    """
    check_rewards(rewards, num_generations)
    if scale not in ("none", "group"):
        raise ValueError(f"scale must be 'none' or 'group' with drop='balance', got {scale!r}")
    if num_generations == 1:
        return torch.zeros_like(rewards)
    grouped = rewards.detach().cpu().view(-1, num_generations)
    grouped = grouped - grouped[:, :1]  # equal rewards center to exactly 0, as in group_advantages
    out = torch.zeros_like(grouped)
    for row, values in enumerate(grouped):
        negatives = (values < values.mean()).nonzero().flatten()
        keep = torch.ones_like(values, dtype=torch.bool)
        surplus = 2 * len(negatives) - num_generations  # negatives minus positives
        if surplus > 0:
            keep[negatives[torch.randperm(len(negatives), generator=generator)[:surplus]]] = False
        kept = values[keep]
        centered = values - kept.mean()
        if scale == "group":
            centered = centered / (kept.std(unbiased=False) + eps)
        out[row] = torch.where(keep, centered, 0.0)
    return out.reshape(-1).to(rewards.device)


def compute_advantages(rewards: torch.Tensor, num_generations: int, config: PolicyLossConfig,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Advantages for ``config``'s algorithm: ``reward - baseline`` for TOPR, :func:`balanced_drop_advantages`
    under ``config.drop="balance"`` (``generator`` picks the dropped samples), :func:`group_advantages` otherwise.

    Shapes: rewards (B,) float -> (B,) float. Raises as :func:`group_advantages`.
    """
    if config.loss_type == "topr":
        check_rewards(rewards, num_generations)
        return rewards - config.baseline
    if config.drop == "balance":
        return balanced_drop_advantages(rewards, num_generations, config.advantage_scale, generator=generator)
    return group_advantages(rewards, num_generations, config.advantage_scale, config.advantage_estimator)

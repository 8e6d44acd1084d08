"""Group-relative advantages from scalar rewards (GRPO, Dr. GRPO, RLOO) and TOPR's baseline advantage."""

from __future__ import annotations

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
    if not rewards.is_cuda and torch.isnan(rewards).any():
        raise ValueError("rewards contain NaN; fix the reward function before computing advantages")


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
        ``RLFUSE_BACKEND=triton``) run a Triton kernel with no host sync; NaN is then not checked.

    Raises:
        TypeError: rewards not a float tensor.
        ValueError: B not a multiple of G, NaN rewards, an unknown ``scale`` or ``estimator``.
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


def compute_advantages(rewards: torch.Tensor, num_generations: int, config: PolicyLossConfig) -> torch.Tensor:
    """Advantages for ``config``'s algorithm: ``reward - baseline`` for TOPR, :func:`group_advantages` otherwise.

    Shapes: rewards (B,) float -> (B,) float. Raises as :func:`group_advantages`.
    """
    if config.loss_type == "topr":
        check_rewards(rewards, num_generations)
        return rewards - config.baseline
    return group_advantages(rewards, num_generations, config.advantage_scale, config.advantage_estimator)

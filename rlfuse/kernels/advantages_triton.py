"""Triton kernel for group-relative advantages: one program per group of G rewards, no host sync.

Same numbers as ``rlfuse.algos.group_advantages``: each group is shifted by its first reward before
averaging (so equal rewards give exactly 0), centered, multiplied by G/(G-1) for RLOO, and divided by
the group's (or the batch's) unbiased std plus eps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch

SCALES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _group_advantages_kernel(rewards_ptr, out_ptr, batch_std_ptr, G, eps, factor,
                             SCALE: tl.constexpr, BLOCK_G: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    rewards = tl.load(rewards_ptr + group * G + offs, mask=valid, other=0.0)
    first = tl.load(rewards_ptr + group * G)
    shifted = tl.where(valid, rewards - first, 0.0)
    centered = tl.where(valid, shifted - tl.sum(shifted, 0) / G, 0.0)
    advantages = centered * factor
    if SCALE == 1:
        advantages = advantages / (tl.sqrt(tl.sum(centered * centered, 0) / (G - 1)) + eps)
    if SCALE == 2:
        advantages = advantages / (tl.load(batch_std_ptr) + eps)
    tl.store(out_ptr + group * G + offs, advantages, mask=valid)


def group_advantages_triton(rewards: torch.Tensor, num_generations: int, scale: str, estimator: str,
                            eps: float) -> torch.Tensor:
    """Launch the kernel on (B,) float ``rewards`` (already validated); returns (B,) of their dtype."""
    if num_generations == 1:
        return torch.zeros_like(rewards)
    rewards = rewards.contiguous()
    out = torch.empty_like(rewards)
    batch_std = (rewards - rewards[:1]).std().reshape(1) if scale == "batch" else rewards[:1]
    factor = num_generations / (num_generations - 1) if estimator == "rloo" else 1.0
    _group_advantages_kernel[(rewards.numel() // num_generations,)](
        rewards, out, batch_std, num_generations, eps, factor,
        SCALE=SCALES[scale], **launch.advantages_config(launch.target_of(rewards.device),
                                                        num_generations).launch_kwargs(),
    )
    return out


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    """Run the wrapper's launches on meta tensors (``bench.compiled`` captures them): rewards of ``dtype`` in
    groups of G = 16, every scale mode."""
    rewards = torch.empty(256, dtype=dtype, device="meta")
    for scale in SCALES:
        group_advantages_triton(rewards, 16, scale, "grpo", 1e-4)

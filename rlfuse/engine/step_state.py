"""What one training step carries from phase to phase (:meth:`rlfuse.engine.trainer.Trainer._step`)."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from rlfuse.engine.rollout import RolloutBatch


@dataclasses.dataclass
class SampledBatch:
    """A step's samples: the batch, which completions were cut, their scores and (B,) float32 rewards."""
    batch: RolloutBatch
    truncated: torch.Tensor
    scores: object
    rewards: torch.Tensor


@dataclasses.dataclass
class StepUpdate:
    """A step's update: the rows trained (``keep``) and their loss share, and the last iteration's loss,
    metrics, gradient norm and replay record, with the count of skipped (non-finite) iterations."""
    keep: torch.Tensor
    share: object
    loss: Optional[torch.Tensor] = None
    metrics: Dict[str, Optional[torch.Tensor]] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(("kl", "clip_frac", "ratio_mean", "entropy")))
    grad_norm: Optional[torch.Tensor] = None
    replay_record: Dict[str, object] = dataclasses.field(default_factory=dict)
    skipped: int = 0

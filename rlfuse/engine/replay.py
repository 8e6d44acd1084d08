"""Stale-batch replay: keep the last k sampled batches with their behaviour log-probs and train on them again.

Group-relative REINFORCE and its clipped or regularized variants tolerate data from older policies
("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm: Demystifying Some Myths About GRPO and Its
Friends"). The sampler already records the behaviour policy's log-probs, so a replayed batch costs one more
forward and backward and no sampling: each step trains on the fresh batch plus the stored ones, each loss
taking its own batch's behaviour log-probs as ``old_logps`` (the algorithm's own ratio, clip or regularizer
then corrects for the staleness). Checkpoints hold the buffer (:meth:`ReplayBuffer.state_dict`), so a resumed
run replays the batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from rlfuse.engine.rollout import RolloutBatch

LossFn = Callable[["ReplayItem"], Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]]


@dataclass
class ReplayItem:
    """One sampled batch as the trainer needs it to train on it again.

    Attributes:
        step: the 1-based training step that sampled it.
        batch: the prompts and completions, B rows in groups of G.
        advantages: (B,) float32, computed from the batch's rewards when it was sampled.
        behaviour_logps: (B, T) float32 log-probs of the completion tokens under the sampling policy.
        behaviour_vocab_mean: (B, T) float32 vocabulary means under the sampling policy (ROVER), or None.
        ref_logps: (B, T) float32 log-probs under the frozen reference (when beta > 0), or None.
    """

    step: int
    batch: RolloutBatch
    advantages: torch.Tensor
    behaviour_logps: torch.Tensor
    behaviour_vocab_mean: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None


class ReplayBuffer:
    """The last ``staleness`` sampled batches, oldest first; ``staleness=0`` keeps nothing.

    Raises:
        ValueError: ``staleness`` not an int >= 0.
    """

    def __init__(self, staleness: int):
        if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
            raise ValueError(f"staleness must be an int >= 0 (0 disables replay), got {staleness!r}")
        self.staleness = staleness
        self._items: deque = deque(maxlen=staleness)

    def add(self, item: ReplayItem) -> None:
        """Store ``item``, evicting the oldest batch once ``staleness`` are held (no-op at staleness 0)."""
        if self.staleness:
            self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[ReplayItem]:
        return iter(list(self._items))

    def state_dict(self) -> Dict[str, Any]:
        """The stored batches, oldest first, with every tensor on the CPU (for a checkpoint)."""
        return {"staleness": self.staleness, "items": [_to_device(item, "cpu") for item in self._items]}

    def load_state_dict(self, state: Dict[str, Any], device) -> None:
        """Replace the contents with :meth:`state_dict`'s batches, moved to ``device``. A buffer with a smaller
        ``staleness`` than the saved one keeps the newest batches; staleness 0 keeps none.

        Raises:
            ValueError: ``state`` is not what :meth:`state_dict` returns.
        """
        items = state.get("items") if isinstance(state, dict) else None
        if not isinstance(items, list) or not all(isinstance(item, ReplayItem) for item in items):
            raise ValueError("replay state must be ReplayBuffer.state_dict()'s {'staleness', 'items'} dict")
        self._items.clear()
        for item in items:
            self.add(_to_device(item, device))


def _to_device(item, device):
    """A copy of a ReplayItem (or RolloutBatch) whose tensors, nested ones included, are on ``device``."""
    moved = {}
    for field in dataclasses.fields(item):
        value = getattr(item, field.name)
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif dataclasses.is_dataclass(value):
            value = _to_device(value, device)
        moved[field.name] = value
    return dataclasses.replace(item, **moved)


def replay_backward(items: List[ReplayItem], step: int, loss_fn: LossFn, scale: float) -> Dict[str, Optional[float]]:
    """Accumulate ``scale`` × the loss of every replayed batch into the parameters' ``.grad``.

    One backward per batch, so that only one batch's activations are alive at a time. ``loss_fn(item)``
    returns ``(loss, metrics)`` as :func:`rlfuse.algos.policy_loss` does, ``metrics`` holding ``ratio_mean``
    and, when the loss path reports it, ``ratio_max``: the importance ratio of the current policy to the
    behaviour policy that sampled the batch.

    Returns:
        ``replay_batches`` (count), ``replay_staleness`` (mean of ``step - item.step``, in steps; 0 with none),
        ``replay_ratio_mean`` (token-weighted over the replayed tokens) and ``replay_ratio_max`` (None with none
        replayed, or when the loss path gives no ``ratio_max``).
    """
    ratio_sum, tokens, ratio_max, staleness = 0.0, 0, None, []
    for item in items:
        loss, metrics = loss_fn(item)
        (loss * scale).backward()
        count = int(item.batch.completion_mask.sum())
        ratio_sum += float(metrics["ratio_mean"]) * count
        tokens += count
        if metrics.get("ratio_max") is not None:
            ratio_max = max(float(metrics["ratio_max"]), ratio_max or 0.0)
        staleness.append(step - item.step)
    return {
        "replay_batches": len(items),
        "replay_staleness": sum(staleness) / len(staleness) if staleness else 0.0,
        "replay_ratio_mean": ratio_sum / tokens if tokens else None,
        "replay_ratio_max": ratio_max,
    }

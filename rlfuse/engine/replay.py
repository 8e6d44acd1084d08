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
import typing
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

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
        """The stored batches, oldest first, as plain values and CPU tensors (for a checkpoint's safe files):
        ``{"staleness": int, "items": [{"step": int, "advantages": T, "behaviour_logps": T,
        "behaviour_vocab_mean": T | None, "ref_logps": T | None, "batch": {every RolloutBatch field: T | None}}]}``.
        A tensor held twice (``behaviour_logps`` is ``batch.logps``) stays one tensor."""
        memo: Dict[int, torch.Tensor] = {}
        return {"staleness": self.staleness, "items": [_plain(item, memo) for item in self._items]}

    def load_state_dict(self, state: Dict[str, Any], device) -> None:
        """Replace the contents with :meth:`state_dict`'s batches, rebuilt as ``ReplayItem``s with their tensors on
        ``device``. A buffer with a smaller ``staleness`` than the saved one keeps the newest batches; staleness
        0 keeps none. A field missing from ``state`` that has a default takes it (a checkpoint older than it).

        Raises:
            ValueError: ``state`` is not what :meth:`state_dict` returns; the message names the wrong entry.
        """
        if not isinstance(state, dict) or set(state) != {"staleness", "items"}:
            raise ValueError("replay state must be ReplayBuffer.state_dict()'s {'staleness', 'items'} dict, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if type(state["staleness"]) is not int or not isinstance(state["items"], list):
            raise ValueError("replay state must be ReplayBuffer.state_dict()'s dict: staleness an int, items a list")
        memo: Dict[int, torch.Tensor] = {}
        items = [_rebuild(ReplayItem, item, f"replay items[{i}]", device, memo)
                 for i, item in enumerate(state["items"])]
        self._items.clear()
        for item in items:
            self.add(item)


def _moved(tensor: torch.Tensor, device, memo: Dict[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` detached on ``device``, the same result for the same tensor object (``memo``: id to result)."""
    if id(tensor) not in memo:
        memo[id(tensor)] = tensor.detach().to(device)
    return memo[id(tensor)]


def _plain(item, memo: Dict[int, torch.Tensor]) -> Dict[str, Any]:
    """A ReplayItem (or RolloutBatch) as a dict of its fields, nested ones as dicts, tensors on the CPU (each
    tensor object moved once)."""
    out = {}
    for field in dataclasses.fields(item):
        value = getattr(item, field.name)
        if isinstance(value, torch.Tensor):
            value = _moved(value, "cpu", memo)
        elif dataclasses.is_dataclass(value):
            value = _plain(value, memo)
        out[field.name] = value
    return out


def _rebuild(cls, state, where: str, device, memo: Dict[int, torch.Tensor]):
    """``cls`` (a dataclass) from :func:`_plain`'s dict, each value checked against its field's type, tensors
    moved to ``device`` (each tensor object once).

    Raises:
        ValueError: ``state`` is not a dict of ``cls``'s fields, or a value is not of its field's type.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a dict of {cls.__name__} fields, got {type(state).__name__}")
    fields, hints = dataclasses.fields(cls), typing.get_type_hints(cls)
    unknown = sorted(set(state) - {field.name for field in fields})
    if unknown:
        raise ValueError(f"{where} has keys {unknown} that are not {cls.__name__} fields")
    values = {}
    for field in fields:
        name, hint = field.name, hints[field.name]
        if name not in state:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where} lacks {cls.__name__}'s field {name!r}")
            continue
        value, args = state[name], typing.get_args(hint)
        if typing.get_origin(hint) is Union and type(None) in args:  # Optional[X]
            if value is None:
                values[name] = None
                continue
            hint = next(arg for arg in args if arg is not type(None))
        if dataclasses.is_dataclass(hint):
            values[name] = _rebuild(hint, value, f"{where}[{name!r}]", device, memo)
        elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            values[name] = _moved(value, device, memo) if hint is torch.Tensor else value
        else:
            raise ValueError(f"{where}[{name!r}] must be {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return cls(**values)


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

"""The entropy bonus of TRL's ``GRPOConfig`` (``entropy_coef``, ``use_adaptive_entropy``) for rlfuse's TRL trainer.

The loss becomes L = L_policy - c·H, with H the mean per-token entropy (nats) over the tokens the policy term acts
on, scaled only for gradient accumulation, whatever the loss type's own normalizer. The entropies are the ones
rlfuse's kernel already returned for the loss, with their gradient: nothing is recomputed.

- Static: c = ``entropy_coef``.
- Adaptive ("Reasoning with Exploration: An Entropy Perspective"; TRL 1.16's controller): c is applied only while
  the entropy measured over the previous optimizer step's whole accumulation window (all ranks, token-weighted)
  is at most ``entropy_target``; after each optimizer step c moves by ``entropy_coef_delta`` towards
  ``entropy_coef_max`` when that entropy is at or below the target, else towards ``entropy_coef_min``.

The controller's state lives on the trainer under TRL's own attribute names (``entropy_coef``,
``_last_world_entropy``, ``_entropy_window_stats``), so TRL's checkpointing of it (``entropy_ctrl_state.json``)
saves and restores it unchanged.
"""

from __future__ import annotations

import torch


class EntropyBonus:
    """The bonus term of one ``trl.GRPOTrainer`` subclass instance; ``enabled`` is fixed for the run."""

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def enabled(self) -> bool:
        """Whether the run has a bonus: a non-zero ``entropy_coef``, or the adaptive controller (which stays on
        when its coefficient reaches 0 so that it can recover)."""
        return bool(self.trainer._entropy_bonus_enabled)

    def __call__(self, entropies: torch.Tensor, mask: torch.Tensor, mode: str,
                 policy_loss: torch.Tensor) -> torch.Tensor:
        """The term c·H to subtract from the loss, with grad through ``entropies``; logs ``policy_loss`` (the policy
        term before accumulation scaling) and, on training optimizer steps, ``entropy_coef``.

        Args:
            entropies: (B, T) float32 per-token entropies (nats), with grad.
            mask: (B, T) 0/1, the tokens the policy term acts on (completion, tool and high-entropy masks).
            mode: "train" or "eval"; only training updates the adaptive controller.
            policy_loss: scalar, detached.
        """
        trainer = self.trainer
        accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
        mean_entropy = (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        coef = trainer.entropy_coef
        if trainer.use_adaptive_entropy and trainer._last_world_entropy > trainer.args.entropy_target:
            coef = 0.0  # the previous step's entropy is above the target: no bonus this step
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
        if trainer.use_adaptive_entropy and mode == "train":
            self._observe(entropies, mask)
        if mode == "train" and trainer.accelerator.sync_gradients:
            trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
        return coef * mean_entropy

    def _observe(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Add this micro-batch's entropy sum and token count to the window; at an optimizer step, move the
        coefficient by the window's world-wide mean entropy and start a new window."""
        trainer, args = self.trainer, self.trainer.args
        stats = torch.stack([(entropies * mask).sum(), mask.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if not trainer.accelerator.sync_gradients:
            return
        totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        if world_entropy <= args.entropy_target:
            trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        trainer._last_world_entropy = world_entropy
        trainer._entropy_window_stats = None

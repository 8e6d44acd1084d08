"""``policy_loss``: one entry point for every algorithm's loss, from per-token log-probs."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig
from rlfuse.algos.losses import TOKEN_LOSSES, aggregate_loss, kl_penalty, masked_mean


def _masked(tensor: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
    return None if tensor is None else torch.where(mask, tensor, 0.0)


def _check_like(name: str, tensor: Optional[torch.Tensor], logps: torch.Tensor) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(logps.shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logps has {tuple(logps.shape)}; they must match")
    if tensor.device != logps.device:
        raise ValueError(f"{name} is on {tensor.device} but logps on {logps.device}; move them to one device")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")


def check_policy_loss_inputs(logps, old_logps, advantages, completion_mask, config, ref_logps, vocab_mean, old_vocab_mean):
    """Validate :func:`policy_loss` arguments without a host sync; raise ``TypeError``/``ValueError``."""
    if not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig such as GRPOConfig(), got {type(config).__name__}")
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a float (B, T) tensor, got {getattr(logps, 'shape', type(logps))}")
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("vocab_mean", vocab_mean),
                         ("old_vocab_mean", old_vocab_mean)):
        _check_like(name, tensor, logps)
    if not isinstance(completion_mask, torch.Tensor) or tuple(completion_mask.shape) != tuple(logps.shape):
        raise ValueError(
            f"completion_mask must be a (B, T) tensor like logps {tuple(logps.shape)}, "
            f"got {tuple(getattr(completion_mask, 'shape', ()))}"
        )
    if completion_mask.device != logps.device:
        raise ValueError(f"completion_mask is on {completion_mask.device} but logps on {logps.device}")
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError(f"advantages must be a float tensor (B,) or (B, T), got {getattr(advantages, 'dtype', type(advantages))}")
    if tuple(advantages.shape) not in ((logps.shape[0],), tuple(logps.shape)):
        raise ValueError(f"advantages must be (B,) or (B, T) = {tuple(logps.shape)}, got {tuple(advantages.shape)}")
    if advantages.device != logps.device:
        raise ValueError(f"advantages are on {advantages.device} but logps on {logps.device}")
    if config.beta > 0 and ref_logps is None:
        raise ValueError(f"beta={config.beta} > 0 needs ref_logps (B, T) from the reference policy; pass them or set beta=0")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    config: PolicyLossConfig,
    ref_logps: Optional[torch.Tensor] = None,
    vocab_mean: Optional[torch.Tensor] = None,
    old_vocab_mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """The policy loss of ``config``'s algorithm, aggregated by ``config.loss_agg_mode``.

    Token loss by ``config.loss_type`` (see :mod:`rlfuse.algos.losses`), plus ``beta`` times the
    ``kl_estimator`` per token when ``beta > 0``.

    Args:
        logps: (B, T) float32 log-probs of the sampled tokens under the current policy (with grad).
        old_logps: (B, T) float32 log-probs under the policy that sampled them.
        advantages: (B,) or (B, T) float32; see ``rlfuse.algos.compute_advantages``.
        completion_mask: (B, T) bool or 0/1; 1 on completion tokens that count.
        config: a :class:`PolicyLossConfig` (``GRPOConfig()``, ``DAPOConfig()``, ...).
        ref_logps: (B, T) float32 under the reference policy; required when ``config.beta > 0``.
        vocab_mean, old_vocab_mean: (B, T) float32 vocabulary means of the log-probs (ROVER only).

    Returns:
        ``(loss, metrics)``: a scalar float32 loss, and detached scalar tensors ``clip_frac`` (share of
        unmasked tokens whose clip or taper is active), ``kl`` (masked mean per-token KL, nats; None
        without ``ref_logps``), ``ratio_mean`` and ``ratio_max`` (masked mean and max importance ratio; 0
        when no token counts).

    Raises:
        TypeError: a non-tensor or non-float input, or a config of the wrong type.
        ValueError: mismatched shapes or devices, or missing ``ref_logps``/``vocab_mean`` the config needs.
    """
    check_policy_loss_inputs(logps, old_logps, advantages, completion_mask, config, ref_logps, vocab_mean, old_vocab_mean)
    mask = completion_mask.bool()
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else _masked(advantages, mask)
    # Inputs are zeroed at masked positions first, so that padding holding NaN or inf can reach neither
    # the loss nor, through 0·NaN in the backward, the gradients.
    logps, old_logps, ref_logps, vocab_mean, old_vocab_mean = (
        _masked(t, mask) for t in (logps, old_logps, ref_logps, vocab_mean, old_vocab_mean)
    )
    token_loss, clipped, ratio = TOKEN_LOSSES[config.loss_type](
        logps, old_logps, adv.to(logps.dtype), mask, config, vocab_mean, old_vocab_mean
    )
    kl = None
    if ref_logps is not None:
        kl_tokens = kl_penalty(logps, ref_logps, config.kl_estimator)
        if config.beta > 0:
            token_loss = token_loss + config.beta * kl_tokens
        kl = masked_mean(kl_tokens.detach(), mask)
    loss = aggregate_loss(token_loss, mask, config.loss_agg_mode)
    masked_ratio = torch.where(mask, ratio.detach(), 0.0)
    metrics = {
        "clip_frac": masked_mean(clipped.to(logps.dtype), mask).detach(),
        "kl": kl,
        "ratio_mean": masked_mean(ratio.detach(), mask),
        "ratio_max": masked_ratio.amax() if masked_ratio.numel() else masked_ratio.new_zeros(()),
    }
    return loss, metrics

"""``policy_loss_from_logits``: every algorithm's policy loss straight from logits, in one fused op."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig
from rlfuse.algos.losses import masked_mean
from rlfuse.algos.policy_loss import check_policy_loss_inputs, policy_loss
from rlfuse.kernels.dispatch import use_triton
from rlfuse.kernels.logprobs import check_logits_targets, token_logprobs_reference


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    config: PolicyLossConfig,
    ref_logps: Optional[torch.Tensor] = None,
    old_vocab_mean: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """:func:`rlfuse.algos.policy_loss` composed with :func:`rlfuse.kernels.token_logprobs`, fused.

    On CUDA (or ``RLFUSE_BACKEND=triton``) one Triton pass reads the logits for the per-token log-prob,
    entropy and vocabulary mean; the (B, T) loss math (ratio, clip, KL, taper or ROVER's Q-target, the
    GSPO sequence ratio, the aggregation) runs on those O(B·T) values; one more pass writes d(loss)/d(logits)
    in the forward, and the backward only scales it. On CPU tensors it is the plain composition.

    Args:
        logits: (B, T, V) float32/bf16/fp16, position t predicting ``targets[:, t]``; strided views such as
            ``logits[:, :-1]`` are read in place.
        targets: (B, T) int64 completion token ids.
        old_logps, advantages, completion_mask, config, ref_logps: as :func:`rlfuse.algos.policy_loss`.
        old_vocab_mean: (B, T) float32, ROVER only: the sampling policy's vocabulary mean of log-probs.
        temperature: the sampling temperature; logits are divided by it.
        inplace_backward: write d(logits) into the logits' storage (Triton path only).

    Returns:
        ``(loss, metrics)``: scalar float32 loss, and detached scalar tensors ``clip_frac``, ``kl`` (None
        without ``ref_logps``), ``ratio_mean`` and ``entropy`` (mean over unmasked tokens, nats). No host
        sync happens in the forward beyond the input checks.

    Raises:
        TypeError, ValueError: as :func:`rlfuse.algos.policy_loss` and :func:`rlfuse.kernels.token_logprobs`.
    """
    rover = config.loss_type == "rover"
    if not use_triton(logits):
        out = token_logprobs_reference(logits, targets, temperature, return_entropy=True, return_vocab_mean=rover)
        loss, metrics = policy_loss(out.logps, old_logps, advantages, completion_mask, config=config,
                                    ref_logps=ref_logps, vocab_mean=out.vocab_mean, old_vocab_mean=old_vocab_mean)
        metrics["entropy"] = masked_mean(out.entropy.detach(), completion_mask.bool())
        return loss, metrics
    check_logits_targets(logits, targets, temperature)
    if targets.dim() != 2:
        raise ValueError(f"targets must be (B, T), got shape {tuple(targets.shape)}")
    shaped = torch.empty(targets.shape, device=logits.device)  # stands in for logps in the input check
    check_policy_loss_inputs(shaped, old_logps, advantages, completion_mask, config, ref_logps,
                             shaped if rover else None, old_vocab_mean)
    from rlfuse.kernels.fused_logprob_loss import fused_logprob_loss

    mask = completion_mask.bool()

    def loss_fn(logps, vocab_mean, entropy):
        loss, metrics = policy_loss(logps, old_logps, advantages, completion_mask, config=config,
                                    ref_logps=ref_logps, vocab_mean=vocab_mean if rover else None,
                                    old_vocab_mean=old_vocab_mean)
        metrics["entropy"] = masked_mean(entropy, mask)
        return loss, metrics

    return fused_logprob_loss(logits, targets, loss_fn, temperature, inplace_backward)

"""``FusedLinearPolicyLoss``: every algorithm's policy loss from hidden states and the LM head.

The logits are never materialized: :func:`rlfuse.kernels.linear_token_logprobs` gives per-token
log-probs, entropy and vocabulary means with O(N) memory (Triton on CUDA, chunked PyTorch on CPU), and
:func:`rlfuse.algos.policy_loss` turns them into the loss. Argument names and order follow Liger-Kernel's
``LigerFusedLinearGRPOLoss``, so switching is a one-line change.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig
from rlfuse.algos.losses import masked_mean
from rlfuse.algos.policy_loss import policy_loss
from rlfuse.kernels.linear_logprobs import linear_token_logprobs
from rlfuse.kernels.logprobs import IGNORE_INDEX


def masked_targets(targets: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``targets`` (B, T) int64 with ``IGNORE_INDEX`` where ``completion_mask`` (B, T) is 0, so that the
    log-prob op skips padding (no logits are formed for it); unchanged when the shapes differ, which
    :func:`rlfuse.algos.policy_loss` then reports."""
    if not isinstance(completion_mask, torch.Tensor) or completion_mask.shape != targets.shape:
        return targets
    return targets.masked_fill(completion_mask == 0, IGNORE_INDEX)


class FusedLinearPolicyLoss(torch.nn.Module):
    """Policy loss of ``config``'s algorithm straight from the last hidden states.

    Args:
        config: a :class:`PolicyLossConfig` (``GRPOConfig()``, ``DAPOConfig()``, ``ROVERConfig()``, ...).
        temperature: the sampling temperature; logits are divided by it.
        chunk_size: tokens per chunk on the PyTorch (CPU) path (default: sized to the vocabulary).
    """

    def __init__(self, config: PolicyLossConfig, temperature: float = 1.0, chunk_size: Optional[int] = None):
        super().__init__()
        if not isinstance(config, PolicyLossConfig):
            raise TypeError(f"config must be a PolicyLossConfig such as GRPOConfig(), got {type(config).__name__}")
        self.config, self.temperature, self.chunk_size = config, temperature, chunk_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        lm_head_weight: torch.Tensor,
        targets: torch.Tensor,
        old_logps: Optional[torch.Tensor],
        advantages: torch.Tensor,
        completion_mask: torch.Tensor,
        ref_logps: Optional[torch.Tensor] = None,
        old_vocab_mean: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        temperature: Optional[float] = None,
    ) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
        """Compute ``(loss, metrics)``.

        Args:
            hidden_states: (B, T, H) bf16/fp16/fp32, position t predicting ``targets[:, t]`` (strided
                slices such as ``h[:, P - 1:-1]`` are read in place).
            lm_head_weight: (V, H), the same dtype; tied embeddings receive this gradient too.
            targets: (B, T) int64 completion token ids; positions where ``completion_mask`` is 0 are
                skipped (no logits formed), whatever id they hold.
            old_logps, advantages, completion_mask, ref_logps: as :func:`rlfuse.algos.policy_loss`;
                ``old_logps=None`` means on-policy (one update per batch): the current log-probs, detached.
            old_vocab_mean: (B, T) float32, ROVER only; None means on-policy, like ``old_logps``.
            bias: optional (V,) LM-head bias.
            temperature: the sampling temperature for this call, as ``policy_loss_from_logits`` takes it;
                None uses the module's.

        Returns:
            A scalar float32 loss with gradients to hidden states, weight and bias, and detached metrics
            ``clip_frac``, ``kl`` (None without ``ref_logps``), ``ratio_mean`` and ``entropy`` (nats).

        Raises:
            TypeError, ValueError: as :func:`rlfuse.kernels.linear_token_logprobs` and ``policy_loss``.
        """
        rover = self.config.loss_type == "rover"
        targets = masked_targets(targets, completion_mask)  # padding forms no logits
        temperature = self.temperature if temperature is None else temperature
        out = linear_token_logprobs(hidden_states, lm_head_weight, targets, bias, temperature,
                                    return_entropy=True, return_vocab_mean=rover, chunk_size=self.chunk_size)
        if old_logps is None:
            old_logps = out.logps.detach()
        if rover and old_vocab_mean is None:
            old_vocab_mean = out.vocab_mean.detach()
        loss, metrics = policy_loss(out.logps, old_logps, advantages, completion_mask, config=self.config,
                                    ref_logps=ref_logps, vocab_mean=out.vocab_mean, old_vocab_mean=old_vocab_mean)
        metrics["entropy"] = masked_mean(out.entropy.detach(), completion_mask.bool())
        return loss, metrics

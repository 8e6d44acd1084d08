"""``policy_loss_from_logits``: every algorithm's policy loss straight from logits, in one fused op.

Token-local losses (the token-level PPO clip of GRPO, Dr. GRPO and DAPO, TOPR, CISPO and the REC family at
token level, any KL estimator, any ``loss_agg_mode``) run as a single kernel that reads the logits twice and
writes d(logits) once (``rlfuse.kernels.token_loss_triton``). Losses that couple tokens (GSPO, GMPO and the
sequence-level ratios, ROVER's next-state values) take two kernels: the log-prob statistics, the (B, T) loss
math in PyTorch, then d(logits) (``rlfuse.kernels.fused_logprob_loss``).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig
from rlfuse.algos.losses import aggregation_weights, masked_mean
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

    On CUDA (or ``RLFUSE_BACKEND=triton``), for a token-local loss (:func:`is_token_local`), one kernel
    per row reads the logits for the log-prob and entropy, forms the token loss and its gradient, and
    sweeps the row again to write d(loss)/d(logits): two passes over the logits. Otherwise one pass gives
    the per-token log-prob, entropy and vocabulary mean; the (B, T) loss math (the GSPO or TOPR sequence
    ratio, ROVER's Q-target) runs on those O(B·T) values; one more kernel writes d(loss)/d(logits): three
    passes. Either way d(logits) is formed in the forward and the backward only scales it. On CPU
    tensors it is the plain composition.

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
    mask = completion_mask.bool()
    if is_token_local(config):
        return _token_local_loss(logits, targets, old_logps, advantages, mask, config, ref_logps, temperature,
                                 inplace_backward)
    from rlfuse.kernels.fused_logprob_loss import fused_logprob_loss


    def loss_fn(logps, vocab_mean, entropy):
        loss, metrics = policy_loss(logps, old_logps, advantages, completion_mask, config=config,
                                    ref_logps=ref_logps, vocab_mean=vocab_mean if rover else None,
                                    old_vocab_mean=old_vocab_mean)
        metrics["entropy"] = masked_mean(entropy, mask)
        return loss, metrics

    return fused_logprob_loss(logits, targets, loss_fn, temperature, inplace_backward)


def token_loss_params(config: PolicyLossConfig) -> "TokenLossParams":  # noqa: F821 (imported lazily)
    """The kernel's scalars of ``config``: each field of :class:`rlfuse.kernels.token_loss_triton.TokenLossParams`
    read from the config field of the same name, so a setting is declared once, in :class:`PolicyLossConfig`."""
    from rlfuse.kernels.token_loss_triton import TokenLossParams

    return TokenLossParams(**{name: getattr(config, name) for name in TokenLossParams._fields})


def is_token_local(config: PolicyLossConfig) -> bool:
    """Whether ``config``'s loss gradient at a token needs only that token's log-prob plus constants known
    before the forward (old and reference log-probs, advantage, aggregation weight): the single-kernel path.

    Token-level PPO clip, TOPR, CISPO, and REC unless a clip or weight uses the sequence ratio; GSPO,
    sequence-level TOPR and CISPO, GMPO and ROVER couple the tokens of a sequence."""
    if config.importance_sampling_level != "token":
        return False
    if config.loss_type == "rec":
        return config.clip_mode != "gspo-one-side" and config.weight != "gspo_importance_sampling"
    return config.loss_type in ("ppo_clip", "topr", "cispo")


def passes_over_logits(config: PolicyLossConfig) -> int:
    """Passes over the (N, V) logits in memory that :func:`policy_loss_from_logits` makes on the Triton
    path, the d(logits) write included: 2 for a token-local loss (one read, one write: the second sweep
    of a row follows the first in the same program, so it reads from L2 while the rows in flight fit
    there), 3 otherwise (a read by the statistics kernel, a read and a write by the gradient kernel)."""
    return 2 if is_token_local(config) else 3


def _token_local_loss(logits, targets, old_logps, advantages, mask, config, ref_logps, temperature,
                      inplace_backward):
    from rlfuse.kernels.token_loss_triton import fused_token_loss

    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand(targets.shape)
    params = token_loss_params(config)
    loss, per_token = fused_token_loss(logits, targets, old_logps, adv, aggregation_weights(mask, config.loss_agg_mode),
                                       params, ref_logps=ref_logps, temperature=temperature,
                                       inplace_backward=inplace_backward)
    metrics = {
        "clip_frac": masked_mean(per_token["clipped"], mask),
        "kl": None if ref_logps is None else masked_mean(per_token["kl"], mask),
        "ratio_mean": masked_mean(per_token["ratio"], mask),
        "ratio_max": torch.where(mask, per_token["ratio"], 0.0).amax() if mask.numel() else loss.new_zeros(()),
        "entropy": masked_mean(per_token["entropy"], mask),
    }
    return loss, metrics

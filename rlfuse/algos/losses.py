"""Token-level policy losses of GRPO, Dr. GRPO, DAPO, GSPO, LUSPO, TOPR, ROVER, the REC family, CISPO, GMPO, SAPO
and VESPO, their KL penalty and aggregation.

Pure PyTorch, the reference every fused kernel must match. Shapes: B sequences, T completion positions.
Each token loss is registered by ``config.loss_type`` in :data:`TOKEN_LOSSES`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where the bool ``mask`` is True (0 when none is). Same shapes."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs ("Approximating KL Divergence").

    ``k1`` = logp - ref, ``k2`` = ½(logp - ref)², ``k3`` = exp(ref - logp) - (ref - logp) - 1.
    Shapes: (B, T) float32 in, (B, T) float32 out; units are nats.
    """
    if kl_estimator == "k1":
        return logps - ref_logps
    if kl_estimator == "k2":
        return 0.5 * (logps - ref_logps) ** 2
    if kl_estimator == "k3":
        delta = ref_logps - logps
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")


def aggregate_loss(token_losses: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Reduce (B, T) token losses under the bool (B, T) ``mask`` to a scalar.

    - ``token-mean``: sum(l·m) / sum(m) (DAPO);
    - ``seq-mean-token-mean``: mean over sequences of sum_t(l·m) / sum_t(m) (GRPO);
    - ``seq-mean-token-sum``: mean over sequences of sum_t(l·m);
    - ``seq-mean-token-sum-norm``: sum(l·m) / (B·T), T the padded length (Dr. GRPO).

    Sequence means run over the sequences that have at least one unmasked token; an all-masked batch
    gives 0. Masked positions never contribute, even if they hold NaN.
    """
    losses = torch.where(mask, token_losses, 0.0)
    if loss_agg_mode == "token-mean":
        return losses.sum() / mask.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return losses.sum() / max(losses.numel(), 1)
    tokens_per_seq = mask.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = losses.sum(-1) / tokens_per_seq.clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = losses.sum(-1)
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")
    return seq_losses.sum() / (tokens_per_seq > 0).sum().clamp(min=1)


def aggregation_weights(mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Per-token weights w with ``aggregate_loss(l, mask, mode) == sum(w·l)`` for any token losses l.

    ``mask`` is (B, T) bool; returns (B, T) float32, 0 on masked tokens. Formed without a host sync, so a
    fused kernel can take the aggregation's per-sequence constants before it launches.
    """
    m = mask.float()
    if loss_agg_mode == "token-mean":
        return m / m.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return m / max(m.numel(), 1)
    tokens_per_seq = m.sum(-1, keepdim=True)
    sequences = (tokens_per_seq > 0).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-mean":
        return m / (tokens_per_seq.clamp(min=1) * sequences)
    if loss_agg_mode == "seq-mean-token-sum":
        return m / sequences
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Per-sequence log ratio (B, 1): masked mean over tokens (GSPO) or masked sum (trajectory ratio)."""
    total = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True)
    return total / mask.sum(-1, keepdim=True).clamp(min=1) if normalize else total


TokenLossOut = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def ppo_clip_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """PPO clipped surrogate max(-A·r, -A·clip(r, 1-eps_low, 1+eps_high)), optional dual clip at -A·c.

    r = exp(logp - old_logp) at ``importance_sampling_level="token"`` (GRPO, Dr. GRPO, DAPO). At
    ``"sequence"`` it is GSPO-token's exp(logp - sg(logp) + sg(log s)), with log s the masked mean of
    logp - old_logp ("Group Sequence Policy Optimization", eq. 10). Returns (loss, clipped, ratio), (B, T).
    """
    log_ratio = logps - old_logps
    if config.importance_sampling_level == "sequence":
        seq = sequence_log_ratio(log_ratio, mask, normalize=True)
        log_ratio = logps - logps.detach() + seq.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if config.clip_ratio_c is not None:
        cap = -advantages * config.clip_ratio_c
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    return loss, clipped, ratio


def topr_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """TOPR: -sg(alpha)·A·logp, alpha = 1 where A >= 0 and clamp(r, 0, 1) where A < 0.

    "Tapered Off-Policy REINFORCE", eq. 7. r is the token ratio exp(logp - old_logp), or at
    ``importance_sampling_level="sequence"`` the trajectory ratio exp(sum_t (logp - old_logp)).
    ``clipped`` marks tokens whose ratio was truncated (A < 0 and r < 1).
    """
    log_ratio = logps - old_logps
    if config.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask, normalize=False).expand_as(logps)
    ratio = torch.exp(log_ratio).detach()
    negative = advantages < 0
    alpha = torch.where(negative, ratio.clamp(0.0, 1.0), torch.ones_like(ratio))
    loss = -alpha * advantages * logps
    return loss, negative & (ratio < 1.0), ratio


def rover_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """ROVER: (Q_t - sg(target_t))², Q_t = rho·(logp_t - old_logp_t).

    target_t = A + rho·(V̄_θ(s_{t+1}) - V̄_old(s_{t+1}))·m_{t+1}, with V̄ the vocabulary mean of the
    log-probs at the next position and 0 past the last one ("Random Policy Valuation is Enough for LLM
    Reasoning with Verifiable Rewards"). A is the GRPO-normalized reward.
    """
    if vocab_mean is None or old_vocab_mean is None:
        raise ValueError(
            "ROVER needs vocab_mean and old_vocab_mean (B, T); get them from "
            "token_logprobs(..., return_vocab_mean=True) for the current and the old policy"
        )
    q = config.rho * (logps - old_logps)
    next_value = torch.zeros_like(q)
    next_value[:, :-1] = torch.where(mask[:, 1:], config.rho * (vocab_mean[:, 1:] - old_vocab_mean[:, 1:]), 0.0)
    target = (advantages + next_value).detach()
    ratio = torch.exp(logps - old_logps).detach()
    return (q - target) ** 2, torch.zeros_like(mask), ratio


def rec_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """REC: -w·A·logp·1[in range] + regularizer, Trinity-RFT's ``rec`` loss.

    "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm". r = sg(exp(logp - old_logp)) per token; s the
    sg length-normalized sequence ratio. ``config.clip_mode`` picks the kept tokens (a mask, not PPO's min:
    a masked token gets no policy gradient at all), ``config.weight`` the factor w (1, r, clip(r, 1 - eps_low',
    1 + eps_high'), s, or exp(A / weight_temperature)), ``config.regularizer`` adds coef·(logp - old_logp)² (k2)
    or -coef·logp (forward-kl). ``clipped`` marks tokens outside the range; ``ratio`` is r.
    """
    ratio = torch.exp(logps - old_logps).detach()
    seq_ratio = None
    if config.clip_mode == "gspo-one-side" or config.weight == "gspo_importance_sampling":
        seq_ratio = torch.exp(sequence_log_ratio(logps - old_logps, mask, normalize=True)).detach()
    keep = _rec_in_range(ratio, seq_ratio, advantages, config)
    if config.weight == "importance_sampling":
        advantages = advantages * ratio
    elif config.weight == "truncated_importance_sampling":
        advantages = advantages * ratio.clamp(1.0 - config.epsilon_low_prime, 1.0 + config.epsilon_high_prime)
    elif config.weight == "gspo_importance_sampling":
        advantages = advantages * seq_ratio
    elif config.weight == "advantage":
        advantages = advantages * torch.exp(advantages / config.weight_temperature)
    loss = torch.where(keep, -advantages * logps, 0.0)
    if config.regularizer == "k2":
        loss = loss + config.regularizer_coef * (logps - old_logps) ** 2
    elif config.regularizer == "forward-kl":
        loss = loss - config.regularizer_coef * logps
    return loss, ~keep, ratio


def _rec_in_range(ratio, seq_ratio, advantages, config) -> torch.Tensor:
    """(B, T) bool: the tokens whose -A·logp term REC keeps, by ``config.clip_mode``."""
    low, high = 1.0 - config.epsilon_low, 1.0 + config.epsilon_high
    up, down = advantages >= 0, advantages <= 0
    if config.clip_mode == "none":
        return torch.ones_like(ratio, dtype=torch.bool)
    if config.clip_mode == "two-side":
        return (ratio >= low) & (ratio <= high)
    if config.clip_mode == "one-side":
        return (up & (ratio <= high)) | (down & (ratio >= low))
    if config.clip_mode == "gspo-one-side":
        return (up & (seq_ratio <= high)) | (down & (seq_ratio >= low))
    # ring: the band, plus the outer regions where the update moves r back towards 1
    band = (ratio >= low) & (ratio <= high)
    return band | (up & (ratio <= 1.0 - config.epsilon_low_prime)) | (down & (ratio >= 1.0 + config.epsilon_high_prime))


def cispo_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """CISPO: -sg(min(r, 1 + epsilon_high))·A·logp ("MiniMax-M1: Scaling Test-Time Compute Efficiently with
    Lightning Attention"; TRL's ``cispo``, whose ``epsilon_high`` is the cap 1 + epsilon_high here).

    r is the token ratio, or at ``importance_sampling_level="sequence"`` the length-normalized sequence ratio.
    ``clipped`` marks tokens whose weight was capped.
    """
    log_ratio = logps - old_logps
    if config.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask, normalize=True).expand_as(logps)
    ratio = torch.exp(log_ratio).detach()
    cap = 1.0 + config.epsilon_high
    return -ratio.clamp(max=cap) * advantages * logps, ratio > cap, ratio


def gmpo_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """GMPO: -A·exp(mean_t c_t) on every token of the sequence, c_t the one-side clipped log-ratio.

    "Geometric-Mean Policy Optimization": c_t = min(l_t, clamp(l_t, -epsilon_low, epsilon_high)) where A > 0
    and max(l_t, clamp(...)) where A <= 0, l_t = logp_t - old_logp_t; the mean runs over the sequence's
    unmasked tokens (the geometric mean of the clipped ratios). Under ``seq-mean-token-mean`` the loss is the
    mean over sequences of -A·exp(mean_t c_t), as TRL's experimental GMPO trainer computes it. ``clipped``
    marks tokens whose log-ratio was clipped; ``ratio`` is the token ratio exp(l_t).
    """
    log_ratio = logps - old_logps
    bounded = log_ratio.clamp(-config.epsilon_low, config.epsilon_high)
    positive = advantages > 0
    clipped_log_ratio = torch.where(positive, torch.minimum(log_ratio, bounded), torch.maximum(log_ratio, bounded))
    geometric = torch.exp(sequence_log_ratio(clipped_log_ratio, mask, normalize=True))
    clipped = torch.where(positive, log_ratio > config.epsilon_high, log_ratio < -config.epsilon_low)
    clipped = clipped & (advantages != 0)
    return (-advantages * geometric).expand_as(logps), clipped, torch.exp(log_ratio).detach()


def sapo_gate_loss(ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float,
                   temperature_neg: float) -> torch.Tensor:
    """SAPO's token loss -(4 / tau)·sigmoid(tau·(r - 1))·A for ratios ``r`` (with grad), tau = ``temperature_pos``
    where A > 0, else ``temperature_neg`` ("Soft Adaptive Policy Optimization"). Shapes broadcast."""
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg).to(ratio.dtype)
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages


@torch.no_grad()
def vespo_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                  sampler_ratio: Optional[torch.Tensor] = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's sequence weight phi(w) = exp(lambda + k·log w - lambda·w), detached: a gamma-shaped weight with
    phi(1) = 1 on the sequence ratio w = exp(sum_t (logp_t - old_logp_t)), times the product of ``sampler_ratio``
    (pi_old / pi_sampler per token) when given ("VESPO: Variational Sequence-Level Soft Policy Optimization";
    the clamps of TRL 1.16's ``get_gamma_weights``: each token's log-ratio to [-20, 20], each log sampler ratio
    and log w to [log 1e-8, 20]). (k, lambda) are the ``_pos`` pair where A >= 0, else the ``_neg`` pair.

    Args:
        advantages: (B, 1) or (B, T); log_ratio: (B, T); mask: (B, T) bool or 0/1.
        sampler_ratio: (B, T) or (B, 1), or None.

    Returns:
        (B, 1) weights in log_ratio's dtype ((B, T) for per-token advantages); NaN and inf set to 0.
    """
    low = math.log(1e-8)
    log_w = torch.where(mask.bool(), log_ratio.clamp(-20.0, 20.0), 0.0).sum(-1, keepdim=True)
    if sampler_ratio is not None:
        log_w = log_w + torch.clamp(torch.log(sampler_ratio), low, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(low, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4).to(log_w.dtype)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def sapo_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """SAPO: :func:`sapo_gate_loss` ("Soft Adaptive Policy Optimization"; TRL's ``sapo``).

    The gate's gradient, sigmoid'(tau·(r - 1))·4·r·d logp, is r·d logp at r = 1 and fades smoothly as r leaves 1,
    where PPO's clip cuts it off. r is the token ratio exp(logp - old_logp), or at
    ``importance_sampling_level="sequence"`` the length-normalized sequence ratio exp(mean_t(logp_t - old_logp_t)),
    its gradient through the mean, as TRL's. ``clipped`` marks tokens whose gate has faded below half its peak
    (|tau·(r - 1)| > log(3 + 2·sqrt 2)).
    """
    log_ratio = logps - old_logps
    if config.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask, normalize=True)
    ratio = torch.exp(log_ratio)
    loss = sapo_gate_loss(ratio, advantages, config.sapo_temperature_pos, config.sapo_temperature_neg)
    tau = torch.where(advantages > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
    faded = (tau * (ratio.detach() - 1.0)).abs() > math.log(3.0 + 2.0 * math.sqrt(2.0))
    return loss, faded.expand_as(logps), ratio.detach().expand_as(logps)


def vespo_token_loss(logps, old_logps, advantages, mask, config, vocab_mean, old_vocab_mean) -> TokenLossOut:
    """VESPO: -sg(phi(w))·A·logp, phi from :func:`vespo_weights` with the config's (k, lambda) pairs ("VESPO:
    Variational Sequence-Level Soft Policy Optimization"; TRL's ``vespo``). ``clipped`` marks the tokens of
    sequences whose weight is below 1/2; ``ratio`` is the token ratio."""
    log_ratio = (logps - old_logps).detach()
    phi = vespo_weights(advantages, log_ratio, mask, None, config.vespo_k_pos, config.vespo_lambda_pos,
                        config.vespo_k_neg, config.vespo_lambda_neg)
    return -phi * advantages * logps, (phi < 0.5).expand_as(logps), torch.exp(log_ratio)


TOKEN_LOSSES: Dict[str, Callable[..., TokenLossOut]] = {
    "ppo_clip": ppo_clip_token_loss,
    "topr": topr_token_loss,
    "rover": rover_token_loss,
    "rec": rec_token_loss,
    "cispo": cispo_token_loss,
    "gmpo": gmpo_token_loss,
    "sapo": sapo_token_loss,
    "vespo": vespo_token_loss,
}

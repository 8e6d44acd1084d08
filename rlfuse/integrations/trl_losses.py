"""The ``loss_type`` values of rlfuse's TRL ``GRPOTrainer``: option checks, token losses and aggregation.

TRL's own loss types (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) are reproduced by
:func:`grpo_token_loss`. rlfuse's
presets (:data:`RLFUSE_LOSS_TYPES`: topr, rover, and the off-policy family of "Group-Relative REINFORCE Is
Secretly an Off-Policy Algorithm" plus GMPO) run :func:`rlfuse_token_loss`, the token losses of
:data:`rlfuse.algos.losses.TOKEN_LOSSES` that :func:`rlfuse.algos.policy_loss` calls, with the preset's config
from :func:`rlfuse.algos.get_config`, so TRL and rlfuse compute the same loss. Pure PyTorch: TRL's config
objects are read by attribute only.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import PolicyLossConfig, get_config
from rlfuse.algos.losses import TOKEN_LOSSES, sapo_gate_loss, sequence_log_ratio

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# rlfuse's presets that TRL's inputs suffice for (rlfuse.algos.ALGO_CONFIGS names).
RLFUSE_LOSS_TYPES = ("topr", "rover", "reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_weight", "gmpo")
LOSS_TYPES = TRL_LOSS_TYPES + RLFUSE_LOSS_TYPES
# Presets whose loss clips a ratio: TRL's epsilon / epsilon_high become their epsilon_low / epsilon_high.
CLIPPING_LOSS_TYPES = ("rec", "rec_is", "rec_ring", "gmpo")
# Presets that take their advantages from TRL as its scale_rewards option forms them (topr and rover predate this
# check and keep taking TRL's advantages whatever the scaling; see docs/trl.md).
PRESET_ADVANTAGE_LOSS_TYPES = ("reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_weight", "gmpo")
# TRL's loss_type whose normalizer reproduces each rlfuse loss_agg_mode.
TRL_AGGREGATION = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}
# TRL's loss types that share another's normalizer.
TRL_SHARED_AGGREGATION = {"sapo": "grpo", "vespo": "dapo"}

RED_DROP_ERROR = (
    "loss_type='red_drop' is not supported by rlfuse's GRPOTrainer: RED-Drop shapes the data, zeroing the advantages "
    "of randomly chosen surplus below-mean samples of each group and re-centering the rest "
    "(rlfuse.algos.balanced_drop_advantages), which needs each group's rewards. TRL forms the advantages itself in "
    "_generate_and_score_completions and shuffles the generation batch before the loss, so the loss sees neither "
    "rewards nor whole groups. Use loss_type='reinforce' with scale_rewards='none' (the same loss without the drop), "
    "or rlfuse's own trainer: rlfuse train --algo red_drop"
)


def rlfuse_loss_config(loss_type: str, importance_sampling_level: str = "token", epsilon_low: Optional[float] = None,
                       epsilon_high: Optional[float] = None) -> PolicyLossConfig:
    """rlfuse's config of preset ``loss_type``, with TRL's clip range where the preset clips a ratio.

    ``epsilon_low`` / ``epsilon_high`` (TRL's ``epsilon`` / ``epsilon_high``) override the preset's only for
    :data:`CLIPPING_LOSS_TYPES` (for gmpo they bound the log-ratio, as in TRL's experimental ``GMPOConfig``);
    every other dial is the preset's (:data:`rlfuse.algos.ALGO_CONFIGS`).

    Raises:
        ValueError: an unknown preset, or a value the preset's config rejects (e.g. epsilon_low >= 1 for rec).
    """
    overrides = {"importance_sampling_level": importance_sampling_level}
    if loss_type in CLIPPING_LOSS_TYPES:
        overrides.update(epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    return get_config(loss_type, **overrides)


def trl_aggregation(loss_type: str) -> str:
    """The TRL ``loss_type`` whose reduction :class:`GRPOTrainer` applies: itself for TRL's own, else the one that
    matches the preset's ``loss_agg_mode`` (token-mean: dapo; seq-mean-token-mean: grpo)."""
    if loss_type in TRL_LOSS_TYPES:
        return TRL_SHARED_AGGREGATION.get(loss_type, loss_type)
    mode = rlfuse_loss_config(loss_type).loss_agg_mode
    if mode not in TRL_AGGREGATION:
        raise ValueError(f"loss_type={loss_type!r} aggregates by {mode!r}, which rlfuse's GRPOTrainer does not map to "
                         f"a TRL normalizer; supported: {', '.join(TRL_AGGREGATION)}")
    return TRL_AGGREGATION[mode]


def check_grpo_config(args) -> None:
    """Raise ``ValueError`` naming the first ``trl.GRPOConfig`` option that :class:`GRPOTrainer` cannot honour.

    Unsupported: ``loss_type`` other than :data:`LOSS_TYPES` (``red_drop``: see :data:`RED_DROP_ERROR`);
    ``use_liger_kernel`` (a second kernel provider). For rlfuse's presets, the options
    :func:`check_rlfuse_loss_options` refuses.
    """
    if args.loss_type == "red_drop":
        raise ValueError(RED_DROP_ERROR)
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported by rlfuse's GRPOTrainer; set loss_type to one of "
            f"{', '.join(LOSS_TYPES)}, or train with trl.GRPOTrainer"
        )
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level={args.importance_sampling_level!r} is unknown; use 'token' or 'sequence'"
        )
    if args.loss_type in RLFUSE_LOSS_TYPES:
        check_rlfuse_loss_options(args)
    if args.use_liger_kernel:
        raise ValueError(
            "use_liger_kernel=True is not supported together with rlfuse's GRPOTrainer, which computes the "
            "log-probs with rlfuse's kernels; set use_liger_kernel=False, or train with trl.GRPOTrainer"
        )


def _default(args, name: str):
    fields = {f.name: f.default for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
    return fields.get(name, getattr(args, name))


def check_rlfuse_loss_options(args) -> None:
    """Raise ``ValueError`` for a ``trl.GRPOConfig`` option without meaning for rlfuse's preset ``args.loss_type``.

    - ``delta`` (a cap on PPO's ratio) for every preset; ``epsilon_high``, and ``epsilon`` away from its default,
      for the presets that clip no ratio (all but :data:`CLIPPING_LOSS_TYPES`);
    - ``importance_sampling_level="sequence"`` for all but topr: their ratios are per token;
    - for :data:`PRESET_ADVANTAGE_LOSS_TYPES`, TRL's advantages must be the preset's: ``scale_rewards`` equal to
      its ``advantage_scale`` (``"none"`` for the REINFORCE family, group-mean-centered rewards without std
      scaling; ``"group"`` for gmpo) and ``multi_objective_aggregation="sum_then_normalize"`` (the other mode
      always divides by a std);
    - for gmpo, whose loss is one number per sequence, the per-token weights ``top_entropy_quantile < 1`` and the
      vLLM importance-sampling correction;
    - a clip range the preset's config rejects (e.g. ``epsilon >= 1`` for rec).
    """
    loss_type = args.loss_type
    clips = loss_type in CLIPPING_LOSS_TYPES
    if args.delta is not None:
        raise ValueError(f"delta={args.delta!r} has no meaning for loss_type={loss_type!r}: it caps the ratio of TRL's "
                         "clipped surrogate (two-sided clipping), which that loss does not use; leave delta=None")
    if not clips and args.epsilon_high is not None:
        raise ValueError(f"epsilon_high={args.epsilon_high!r} has no meaning for loss_type={loss_type!r}, which clips "
                         "no ratio; leave epsilon_high=None")
    if not clips and args.epsilon != _default(args, "epsilon"):
        raise ValueError(f"epsilon={args.epsilon!r} has no meaning for loss_type={loss_type!r}, which clips no ratio; "
                         f"leave epsilon at its default {_default(args, 'epsilon')!r}")
    if loss_type != "topr" and args.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level={args.importance_sampling_level!r} has no meaning for "
                         f"loss_type={loss_type!r}, whose ratios and values are per token; set "
                         "importance_sampling_level='token'")
    if loss_type in PRESET_ADVANTAGE_LOSS_TYPES:
        _check_preset_advantages(args)
    if loss_type == "gmpo":
        _check_gmpo_weights(args)
    try:
        rlfuse_loss_config(loss_type, args.importance_sampling_level, args.epsilon,
                           args.epsilon if args.epsilon_high is None else args.epsilon_high)
    except ValueError as error:
        raise ValueError(f"epsilon={args.epsilon!r}, epsilon_high={args.epsilon_high!r} do not fit loss_type="
                         f"{loss_type!r} (TRL's epsilon is its epsilon_low): {error}") from error


def _check_preset_advantages(args) -> None:
    preset = get_config(args.loss_type)
    scale = {True: "group", False: "none"}.get(args.scale_rewards, args.scale_rewards)
    if scale != preset.advantage_scale:
        why = ("rewards centered on their group's mean, not divided by the std, as in \"Group-Relative REINFORCE Is "
               "Secretly an Off-Policy Algorithm\"" if preset.advantage_scale == "none"
               else "GRPO's advantages, divided by the group's std")
        raise ValueError(f"loss_type={args.loss_type!r} takes {why}; TRL forms the advantages, so set "
                         f"scale_rewards={preset.advantage_scale!r} (got {args.scale_rewards!r})")
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")
    if aggregation != "sum_then_normalize":
        raise ValueError(f"multi_objective_aggregation={aggregation!r} divides every reward by its std, which "
                         f"loss_type={args.loss_type!r} does not take; set multi_objective_aggregation="
                         "'sum_then_normalize'")


def _check_gmpo_weights(args) -> None:
    if args.top_entropy_quantile < 1.0:
        raise ValueError(f"top_entropy_quantile={args.top_entropy_quantile!r} masks single tokens, which has no "
                         "meaning for loss_type='gmpo' (one loss per sequence, the geometric mean of its token "
                         "ratios); set top_entropy_quantile=1.0, or train with trl.experimental.gmpo.GMPOTrainer")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        raise ValueError("vllm_importance_sampling_correction=True weights single tokens, which has no meaning for "
                         "loss_type='gmpo' (one loss per sequence); set vllm_importance_sampling_correction=False")


def rlfuse_token_loss(
    loss_type: str,
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_level: str = "token",
    vocab_mean: Optional[torch.Tensor] = None,
    old_vocab_mean: Optional[torch.Tensor] = None,
    *,
    epsilon_low: Optional[float] = None,
    epsilon_high: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rlfuse's token loss of preset ``loss_type`` (:data:`RLFUSE_LOSS_TYPES`) before masking and aggregation:
    ``TOKEN_LOSSES[config.loss_type]`` with ``config = rlfuse_loss_config(...)``, as :func:`rlfuse.algos.policy_loss`.

    - topr: -sg(alpha)·A·logp, alpha = clamp(r, 0, 1) where A < 0, else 1 ("Tapered Off-Policy REINFORCE", eq. 7);
    - rover: (rho·(logp - old_logp) - sg(A + rho·(V̄(s_{t+1}) - V̄_old(s_{t+1}))))² ("Random Policy Valuation is
      Enough for LLM Reasoning with Verifiable Rewards"), rho = 1;
    - reinforce, rec, rec_is, rec_ring, opmd, asymre, red_weight: -w·A·logp kept where the preset's clip mode
      allows, plus its regularizer ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm");
    - gmpo: -A·exp(mean_t clip(logp_t - old_logp_t)) on every token ("Geometric-Mean Policy Optimization").

    Args:
        per_token_logps: (B, T) float32 with grad; old_per_token_logps: (B, T) float32.
        advantages: (B, 1) or (B, T) float32, TRL's.
        mask: (B, T) 0/1, completion tokens that count.
        vocab_mean, old_vocab_mean: (B, T) float32 vocabulary means of the log-probs (rover only).
        epsilon_low, epsilon_high: TRL's clip range (used by :data:`CLIPPING_LOSS_TYPES` only).

    Returns:
        ``(per_token_loss, clipped, ratio)``, each (B, T): float32 losses; bool tokens whose clip, mask or taper is
        active (all False for rover and the unclipped presets); float32 detached ratio r = exp(logp - old_logp).

    Raises:
        ValueError: as :func:`rlfuse_loss_config`.
    """
    config = rlfuse_loss_config(loss_type, importance_sampling_level, epsilon_low, epsilon_high)
    keep = mask.bool()
    logps, old, vm, old_vm = (None if t is None else torch.where(keep, t, 0.0)
                              for t in (per_token_logps, old_per_token_logps, vocab_mean, old_vocab_mean))
    adv = advantages if advantages.shape[1] == 1 else torch.where(keep, advantages, 0.0)
    loss, clipped, ratio = TOKEN_LOSSES[config.loss_type](logps, old, adv.to(logps.dtype), keep, config, vm, old_vm)
    return loss, clipped.expand_as(loss), ratio.expand_as(loss)


def rlfuse_loss_metrics(loss_type: str, per_token_loss: torch.Tensor, clipped: torch.Tensor,
                        per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Each preset's own (B, T) float32 per-token metric, detached, to average over counted tokens.

    ``topr/tapered_ratio`` (A < 0 and r < 1: the taper truncated the weight), ``rover/td_error`` (|Q - target|),
    ``{rec,rec_is,rec_ring}/masked_ratio`` (tokens whose -A·logp term the clip mask dropped), ``opmd/k2``
    ((logp - old_logp)², the regularizer before its coefficient). gmpo logs TRL's ``clip_ratio/*`` keys instead
    (see the trainer); reinforce, asymre and red_weight clip nothing and log none.
    """
    if loss_type == "topr":
        return {"topr/tapered_ratio": clipped.float()}
    if loss_type == "rover":
        return {"rover/td_error": per_token_loss.detach().sqrt()}
    if loss_type in ("rec", "rec_is", "rec_ring"):
        return {f"{loss_type}/masked_ratio": clipped.float()}
    if loss_type == "opmd":
        return {"opmd/k2": (per_token_logps.detach() - old_per_token_logps) ** 2}
    return {}


def trl_importance_ratio(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, mask: torch.Tensor,
                         importance_sampling_level: str) -> torch.Tensor:
    """TRL's importance ratio (its ``coef_1``), with grad: exp(logp - old_logp) per token, (B, T); at sequence level
    exp of the masked mean of logp - old_logp, (B, 1) ("Group Sequence Policy Optimization"). Float32."""
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask.bool(), normalize=True)
    return torch.exp(log_ratio)


def grpo_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    importance_sampling_level: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: Optional[float] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token losses of TRL's GRPO family before masking and aggregation, as TRL 1.16 computes them.

    - grpo, bnpo, dr_grpo, dapo, luspo: -min(r·A, clip(r, 1 - epsilon_low, 1 + epsilon_high)·A), the clipped
      surrogate of GRPO ("DeepSeekMath", eq. 3) with DAPO's decoupled clip ("DAPO: An Open-Source LLM
      Reinforcement Learning System at Scale"); ``delta`` caps r first (two-sided clipping); luspo differs in
      its aggregation only ("Length-Unbiased Sequence Policy Optimization": a sum over each sequence's tokens);
    - cispo: -sg(min(r, epsilon_high))·A·logp ("MiniMax-M1");
    - sapo: -(4 / tau)·sigmoid(tau·(r - 1))·A, a soft gate in place of the clip, tau = ``sapo_temperature_pos``
      where A > 0, else ``sapo_temperature_neg`` ("Soft Adaptive Policy Optimization");
    - vespo: -phi·A·logp with ``vespo_weights`` phi from :func:`rlfuse.algos.losses.vespo_weights` ("VESPO:
      Variational Sequence-Level Soft Policy Optimization").

    r is :func:`trl_importance_ratio` at ``importance_sampling_level``.

    Args:
        per_token_logps: (B, T) float32 log-probs of the completion tokens under the policy (with grad).
        old_per_token_logps: (B, T) float32 under the policy that sampled them.
        advantages: (B, 1) or (B, T) float32.
        mask: (B, T) int64 or float, 1 on completion tokens that count.
        vespo_weights: (B, 1) float32, needed by vespo only.

    Returns:
        ``(per_token_loss, ratio)``: ratio r is (B, T) at token level and (B, 1) at sequence level; the
        loss has r's shape, or (B, T) for cispo and vespo. Both float32.

    Raises:
        ValueError: vespo without ``vespo_weights``.
    """
    ratio = trl_importance_ratio(per_token_logps, old_per_token_logps, mask, importance_sampling_level)
    if loss_type == "cispo":
        return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps, ratio
    if loss_type == "sapo":
        return sapo_gate_loss(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg), ratio
    if loss_type == "vespo":
        if vespo_weights is None:
            raise ValueError("loss_type='vespo' needs vespo_weights (rlfuse.algos.losses.vespo_weights of the batch)")
        return -vespo_weights * advantages * per_token_logps, ratio
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(capped * advantages, clipped * advantages), ratio

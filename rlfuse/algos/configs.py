"""One config dataclass per algorithm. All share the field names of :class:`PolicyLossConfig`.

An algorithm is a choice of a few dials: which token loss (``loss_type``), how advantages are formed,
the clip range, the KL penalty and how token losses are aggregated. Look configs up by name with
:func:`get_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("ppo_clip", "topr", "rover", "rec", "cispo", "gmpo", "sapo", "vespo")
CLIP_MODES = ("none", "one-side", "two-side", "ring", "gspo-one-side")
WEIGHTS = ("none", "importance_sampling", "truncated_importance_sampling", "gspo_importance_sampling", "advantage")
REGULARIZERS = ("none", "k2", "forward-kl")
DROPS = ("none", "balance")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Dials shared by every algorithm.

    Attributes:
        algo: the algorithm's name, as ``rlfuse train --algo`` spells it.
        loss_type: which token loss: ``ppo_clip`` (GRPO, Dr. GRPO, DAPO, GSPO, LUSPO), ``topr``, ``rover``, ``rec``
            (REINFORCE, REC, OPMD, AsymRE, RED), ``cispo``, ``gmpo``, ``sapo`` or ``vespo``; see
            :mod:`rlfuse.algos.losses`.
        epsilon_low, epsilon_high: the ratio clip range [1 - epsilon_low, 1 + epsilon_high]. For ``cispo`` only
            the upper end 1 + epsilon_high caps the weight; for ``gmpo`` they bound the log-ratio to
            [-epsilon_low, epsilon_high].
        clip_ratio_c: dual-clip constant c > 1 (where A < 0 the loss is capped at -A·c); None disables it.
        beta: weight of the per-token KL penalty to the reference policy; 0 loads no reference.
        kl_estimator: ``k1`` = logp - ref, ``k2`` = ½(logp - ref)², ``k3`` = exp(ref - logp) - (ref - logp) - 1
            ("Approximating KL Divergence", Schulman 2020).
        loss_agg_mode: how token losses become one number; see ``rlfuse.algos.aggregate_loss``.
        advantage_scale: ``group`` divides by the group std, ``batch`` by the batch std, ``none`` not at all.
        advantage_estimator: ``grpo`` (r - group mean, scaled) or ``rloo`` (G/(G-1)·(r - group mean)).
        importance_sampling_level: ``token`` or ``sequence`` ratios (GSPO and TOPR).
        baseline: TOPR's constant baseline, A = reward - baseline.
        rho: ROVER's Q scale, Q_t = rho·(logp_t - old_logp_t).
        incorrect_reward: the correctness reward of a wrong answer (TOPR scores ±1, the others 1/0).
        clip_mode: ``rec`` only; which tokens the clip masks out of -A·logp ("Group-Relative REINFORCE Is
            Secretly an Off-Policy Algorithm", as Trinity-RFT's ``rec`` loss): ``none``; ``one-side`` keeps
            r <= 1 + epsilon_high where A >= 0 and r >= 1 - epsilon_low where A <= 0; ``two-side`` keeps
            1 - epsilon_low <= r <= 1 + epsilon_high; ``ring`` keeps the two-side band plus r <= 1 -
            epsilon_low_prime where A >= 0 and r >= 1 + epsilon_high_prime where A <= 0; ``gspo-one-side`` is
            one-side on the length-normalized sequence ratio (and needs ``seq-mean-token-mean``).
        epsilon_low_prime, epsilon_high_prime: the outer ring of ``ring`` (and the bounds of
            ``truncated_importance_sampling``).
        weight: ``rec`` only; what multiplies A: ``none``; ``importance_sampling`` sg(r);
            ``truncated_importance_sampling`` sg(clip(r, 1 - epsilon_low_prime, 1 + epsilon_high_prime));
            ``gspo_importance_sampling`` the sg length-normalized sequence ratio; ``advantage`` exp(A / weight_temperature)
            (RED-Weight).
        weight_temperature: the temperature of ``weight="advantage"``.
        regularizer: ``rec`` only; ``k2`` adds regularizer_coef·(logp - old_logp)² (OPMD, the ½ absorbed in the
            coefficient), ``forward-kl`` adds -regularizer_coef·logp (AsymRE); ``none``.
        regularizer_coef: the regularizer's weight (>= 0).
        drop: ``balance`` zeroes the advantage of randomly chosen below-mean samples of a group until they are
            no more than the others, then re-centers on the kept samples (RED-Drop); ``none``.
        sapo_temperature_pos, sapo_temperature_neg: ``sapo`` only; the gate's temperature tau where A > 0, and
            where A <= 0 (> 0).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: ``vespo`` only; the gamma weight's power
            k (>= 0) and decay lambda (> 0) where A >= 0, and where A < 0.
    """

    algo: str = "grpo"
    loss_type: str = "ppo_clip"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    loss_agg_mode: str = "seq-mean-token-mean"
    advantage_scale: str = "group"
    advantage_estimator: str = "grpo"
    importance_sampling_level: str = "token"
    baseline: float = 0.0
    rho: float = 1.0
    incorrect_reward: float = 0.0
    clip_mode: str = "none"
    epsilon_low_prime: float = 0.6
    epsilon_high_prime: float = 2.0
    weight: str = "none"
    weight_temperature: float = 1.0
    regularizer: str = "none"
    regularizer_coef: float = 0.0
    drop: str = "none"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("advantage_scale", self.advantage_scale, ("group", "batch", "none"))
        _check_choice("advantage_estimator", self.advantage_estimator, ("grpo", "rloo"))
        _check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        _check_choice("clip_mode", self.clip_mode, CLIP_MODES)
        _check_choice("weight", self.weight, WEIGHTS)
        _check_choice("regularizer", self.regularizer, REGULARIZERS)
        _check_choice("drop", self.drop, DROPS)
        for name in ("epsilon_low", "epsilon_high", "beta", "rho", "baseline", "incorrect_reward", "epsilon_low_prime",
                     "epsilon_high_prime", "weight_temperature", "regularizer_coef", "sapo_temperature_pos",
                     "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.epsilon_low >= 1 and self.loss_type != "gmpo":
            raise ValueError(f"epsilon_low must be < 1 so that the lower clip 1 - epsilon_low stays positive, got {self.epsilon_low}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {self.clip_ratio_c}")
        self._check_offpolicy_dials()
        self._check_soft_dials()

    def _check_soft_dials(self) -> None:
        if not (self.sapo_temperature_pos > 0 and self.sapo_temperature_neg > 0):
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0, got "
                             f"{self.sapo_temperature_pos}, {self.sapo_temperature_neg}")
        if self.vespo_k_pos < 0 or self.vespo_k_neg < 0:
            raise ValueError(f"vespo_k_pos and vespo_k_neg must be >= 0, got {self.vespo_k_pos}, {self.vespo_k_neg}")
        if not (self.vespo_lambda_pos > 0 and self.vespo_lambda_neg > 0):
            raise ValueError("vespo_lambda_pos and vespo_lambda_neg must be > 0, got "
                             f"{self.vespo_lambda_pos}, {self.vespo_lambda_neg}")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type='vespo' forms its own sequence weight from the token log-ratios; set "
                             f"importance_sampling_level='token' (got {self.importance_sampling_level!r})")

    def _check_offpolicy_dials(self) -> None:
        if not 0 < self.epsilon_low_prime <= 1:
            raise ValueError(f"epsilon_low_prime must be in (0, 1], got {self.epsilon_low_prime}")
        if not self.epsilon_high_prime > 0:
            raise ValueError(f"epsilon_high_prime must be > 0, got {self.epsilon_high_prime}")
        if not self.weight_temperature > 0:
            raise ValueError(f"weight_temperature must be > 0, got {self.weight_temperature}")
        if self.regularizer_coef < 0:
            raise ValueError(f"regularizer_coef must be >= 0, got {self.regularizer_coef}")
        rec_dials = {"clip_mode": self.clip_mode, "weight": self.weight, "regularizer": self.regularizer}
        changed = [name for name, value in rec_dials.items() if value != "none"]
        if changed and self.loss_type != "rec":
            raise ValueError(f"{', '.join(changed)} apply to loss_type='rec' only, not {self.loss_type!r}; "
                             "leave them at 'none' or use a REC config such as RECConfig()")
        if self.clip_mode == "gspo-one-side" and self.loss_agg_mode != "seq-mean-token-mean":
            raise ValueError("clip_mode='gspo-one-side' aggregates per sequence, as Trinity-RFT's rec loss does; set "
                             f"loss_agg_mode='seq-mean-token-mean' (got {self.loss_agg_mode!r})")
        if self.loss_type in ("rec", "gmpo") and self.importance_sampling_level != "token":
            raise ValueError(f"importance_sampling_level must be 'token' for loss_type={self.loss_type!r} (its "
                             "sequence-level forms are clip_mode/weight 'gspo-*' for rec); got "
                             f"{self.importance_sampling_level!r}")
        if self.drop != "none" and (self.loss_type == "topr" or self.advantage_estimator != "grpo"
                                    or self.advantage_scale == "batch"):
            raise ValueError("drop='balance' re-centers group-mean advantages: it needs advantage_estimator='grpo', "
                             "advantage_scale 'none' or 'group', and a loss_type other than 'topr'")

    @property
    def uses_group_baseline(self) -> bool:
        """True when advantages are relative to the group, so a group of one sample carries no signal."""
        return self.loss_type != "topr"

    def replace(self, **changes) -> "PolicyLossConfig":
        """A copy with some fields changed; ``None`` values are ignored (CLI options left unset)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class GRPOConfig(PolicyLossConfig):
    """GRPO ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", eq. 3)."""


@dataclass(frozen=True)
class DrGRPOConfig(PolicyLossConfig):
    """Dr. GRPO ("Understanding R1-Zero-Like Training: A Critical Perspective"): no std scaling, constant normalizer."""

    algo: str = "dr_grpo"
    advantage_scale: str = "none"
    loss_agg_mode: str = "seq-mean-token-sum-norm"


@dataclass(frozen=True)
class DAPOConfig(PolicyLossConfig):
    """DAPO ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): clip-higher, token-mean."""

    algo: str = "dapo"
    epsilon_high: float = 0.28
    loss_agg_mode: str = "token-mean"


@dataclass(frozen=True)
class GSPOConfig(PolicyLossConfig):
    """GSPO ("Group Sequence Policy Optimization"): length-normalized sequence ratio, GSPO-token form."""

    algo: str = "gspo"
    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    importance_sampling_level: str = "sequence"


@dataclass(frozen=True)
class TOPRConfig(PolicyLossConfig):
    """TOPR ("Tapered Off-Policy REINFORCE"): truncated ratio on negative examples, ±1 correctness."""

    algo: str = "topr"
    loss_type: str = "topr"
    loss_agg_mode: str = "token-mean"
    incorrect_reward: float = -1.0


@dataclass(frozen=True)
class ROVERConfig(PolicyLossConfig):
    """ROVER ("Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards")."""

    algo: str = "rover"
    loss_type: str = "rover"
    loss_agg_mode: str = "token-mean"


# The off-policy family of "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm: Demystifying Some Myths
# About GRPO and Its Friends", with the dials of its reference code (Trinity-RFT's ``rec`` policy loss and
# ``rec`` advantage, ``examples/rec_gsm8k``): group-mean advantages without std scaling, token-mean.


@dataclass(frozen=True)
class REINFORCEConfig(PolicyLossConfig):
    """Group-relative REINFORCE: -A·logp, A = r - group mean (no std scaling), token-mean.

    The baseline of "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm". No clip, no weight, no
    regularizer. Defaults: advantage_scale none, loss_agg_mode token-mean.
    """

    algo: str = "reinforce"
    loss_type: str = "rec"
    advantage_scale: str = "none"
    loss_agg_mode: str = "token-mean"


@dataclass(frozen=True)
class RECConfig(REINFORCEConfig):
    """REC-OneSide-NoIS, the recommendation of "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm".

    -A·logp masked where the token ratio r left the trust region on the side A pushes it: r > 1 + epsilon_high
    with A >= 0, r < 1 - epsilon_low with A <= 0. Defaults: epsilon 0.2/0.2, clip_mode one-side, weight none.
    """

    algo: str = "rec"
    clip_mode: str = "one-side"


@dataclass(frozen=True)
class RECISConfig(RECConfig):
    """REC-OneSide-IS ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): REC's one-side mask on
    -sg(r)·A·logp, the importance-sampled gradient. Defaults: epsilon 0.2/0.2, weight importance_sampling."""

    algo: str = "rec_is"
    weight: str = "importance_sampling"


@dataclass(frozen=True)
class RECRingConfig(REINFORCEConfig):
    """REC-Ring-NoIS ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): -A·logp kept inside
    [1 - epsilon_low, 1 + epsilon_high] and in the outer ring where the update pulls r back (r <= 1 -
    epsilon_low_prime with A >= 0, r >= 1 + epsilon_high_prime with A <= 0). Defaults: epsilon 0.2/0.2,
    epsilon_low_prime 0.6, epsilon_high_prime 2.0."""

    algo: str = "rec_ring"
    clip_mode: str = "ring"


@dataclass(frozen=True)
class OPMDConfig(REINFORCEConfig):
    """Kimi's OPMD ("Kimi k1.5: Scaling Reinforcement Learning with LLMs") as regularized REINFORCE
    ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): -A·logp + tau·(logp - old_logp)².
    Defaults: regularizer k2, regularizer_coef 0.1 (tau, the ½ absorbed), no clip."""

    algo: str = "opmd"
    regularizer: str = "k2"
    regularizer_coef: float = 0.1


@dataclass(frozen=True)
class AsymREConfig(REINFORCEConfig):
    """AsymRE ("Asymmetric REINFORCE for off-Policy Reinforcement Learning: Balancing positive and negative
    rewards") as regularized REINFORCE: -(A + coef)·logp, a baseline lowered by coef, the forward-KL
    regularizer of "Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm". Defaults: regularizer
    forward-kl, regularizer_coef 0.1."""

    algo: str = "asymre"
    regularizer: str = "forward-kl"
    regularizer_coef: float = 0.1


@dataclass(frozen=True)
class REDDropConfig(REINFORCEConfig):
    """RED-Drop ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): REINFORCE on data shaped so
    that no group has more below-mean than at-or-above-mean samples: the surplus below-mean samples (chosen at
    random) get advantage 0 and the rest are re-centered on their own mean. Defaults: drop balance."""

    algo: str = "red_drop"
    drop: str = "balance"


@dataclass(frozen=True)
class REDWeightConfig(REINFORCEConfig):
    """RED-Weight ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): -A·exp(A / T)·logp, up-weighting
    the best samples of each group. Defaults: weight advantage, weight_temperature T = 1.0."""

    algo: str = "red_weight"
    weight: str = "advantage"


@dataclass(frozen=True)
class CISPOConfig(PolicyLossConfig):
    """CISPO ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"), as TRL's ``cispo``:
    -sg(min(r, 1 + epsilon_high))·A·logp, REINFORCE with a clipped stop-gradient importance weight; token-mean.

    TRL's ``epsilon_high`` is the cap itself: the default epsilon_high 4.0 is TRL's recommended ε_max = 5.0
    ("The Art of Scaling Reinforcement Learning Compute for LLMs"). Advantages are GRPO's (group std scaling).
    """

    algo: str = "cispo"
    loss_type: str = "cispo"
    epsilon_high: float = 4.0
    loss_agg_mode: str = "token-mean"


@dataclass(frozen=True)
class GMPOConfig(PolicyLossConfig):
    """GMPO ("Geometric-Mean Policy Optimization"): -A·exp(mean_t clip(log r_t)) per sequence, mean over sequences.

    The clip is one-sided in log-ratio space (log r_t capped at epsilon_high where A > 0, floored at
    -epsilon_low where A <= 0), as TRL's experimental ``GMPOTrainer`` and Liger-Kernel's ``loss_type="gmpo"``.
    Defaults: epsilon_low = epsilon_high = 0.4 (log space, ratios in (e^-0.4, e^0.4)), GRPO advantages,
    seq-mean-token-mean.
    """

    algo: str = "gmpo"
    loss_type: str = "gmpo"
    epsilon_low: float = 0.4
    epsilon_high: float = 0.4


@dataclass(frozen=True)
class SAPOConfig(PolicyLossConfig):
    """SAPO ("Soft Adaptive Policy Optimization"), as TRL's ``sapo``: -(4 / tau)·sigmoid(tau·(r - 1))·A, a smooth
    gate in place of PPO's hard clip, with a temperature per advantage sign. Defaults: tau 1.0 where A > 0 and
    1.05 where A <= 0 (TRL's), token ratios, GRPO advantages, seq-mean-token-mean (TRL's normalizer for sapo)."""

    algo: str = "sapo"
    loss_type: str = "sapo"


@dataclass(frozen=True)
class LUSPOConfig(GSPOConfig):
    """LUSPO ("Length-Unbiased Sequence Policy Optimization: Revealing and Controlling Response Length Variation
    in RLVR"): GSPO's clipped sequence ratio, each sequence's loss summed over its tokens instead of averaged,
    so that a sequence weighs by its length (TRL's ``luspo``: (l·m).sum(-1).mean()). Defaults: GSPO's ratio and
    clip range, seq-mean-token-sum."""

    algo: str = "luspo"
    loss_agg_mode: str = "seq-mean-token-sum"


@dataclass(frozen=True)
class VESPOConfig(PolicyLossConfig):
    """VESPO ("VESPO: Variational Sequence-Level Soft Policy Optimization"), as TRL's ``vespo``: -sg(phi(w))·A·logp,
    phi(w) = exp(lambda + k·log w - lambda·w) a gamma-shaped weight of the sequence ratio w = prod_t r_t with
    phi(1) = 1. Defaults: (k, lambda) = (2, 3) where A >= 0, (3, 2) where A < 0 (TRL's), GRPO advantages,
    token-mean (TRL's normalizer for vespo)."""

    algo: str = "vespo"
    loss_type: str = "vespo"
    loss_agg_mode: str = "token-mean"


ALGO_CONFIGS = {
    "grpo": GRPOConfig,
    "dr_grpo": DrGRPOConfig,
    "dapo": DAPOConfig,
    "gspo": GSPOConfig,
    "topr": TOPRConfig,
    "rover": ROVERConfig,
    "reinforce": REINFORCEConfig,
    "rec": RECConfig,
    "rec_is": RECISConfig,
    "rec_ring": RECRingConfig,
    "opmd": OPMDConfig,
    "asymre": AsymREConfig,
    "red_drop": REDDropConfig,
    "red_weight": REDWeightConfig,
    "cispo": CISPOConfig,
    "gmpo": GMPOConfig,
    "sapo": SAPOConfig,
    "luspo": LUSPOConfig,
    "vespo": VESPOConfig,
}


def get_config(algo: str, **overrides) -> PolicyLossConfig:
    """The default config of ``algo`` (one of :data:`ALGO_CONFIGS`), with non-None ``overrides`` applied.

    Raises:
        ValueError: an unknown algorithm name or an invalid field value.
    """
    if algo not in ALGO_CONFIGS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGO_CONFIGS)}")
    return ALGO_CONFIGS[algo]().replace(**overrides)

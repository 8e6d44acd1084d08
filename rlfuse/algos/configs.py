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
LOSS_TYPES = ("ppo_clip", "topr", "rover")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Dials shared by every algorithm.

    Attributes:
        algo: the algorithm's name, as ``rlfuse train --algo`` spells it.
        loss_type: which token loss: ``ppo_clip`` (GRPO, Dr. GRPO, DAPO, GSPO), ``topr`` or ``rover``.
        epsilon_low, epsilon_high: the ratio clip range [1 - epsilon_low, 1 + epsilon_high].
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

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("advantage_scale", self.advantage_scale, ("group", "batch", "none"))
        _check_choice("advantage_estimator", self.advantage_estimator, ("grpo", "rloo"))
        _check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        for name in ("epsilon_low", "epsilon_high", "beta", "rho", "baseline", "incorrect_reward"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {self.epsilon_low}, {self.epsilon_high}")
        if self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low must be < 1 so that the lower clip 1 - epsilon_low stays positive, got {self.epsilon_low}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {self.clip_ratio_c}")

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


ALGO_CONFIGS = {
    "grpo": GRPOConfig,
    "dr_grpo": DrGRPOConfig,
    "dapo": DAPOConfig,
    "gspo": GSPOConfig,
    "topr": TOPRConfig,
    "rover": ROVERConfig,
}


def get_config(algo: str, **overrides) -> PolicyLossConfig:
    """The default config of ``algo`` (one of :data:`ALGO_CONFIGS`), with non-None ``overrides`` applied.

    Raises:
        ValueError: an unknown algorithm name or an invalid field value.
    """
    if algo not in ALGO_CONFIGS:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGO_CONFIGS)}")
    return ALGO_CONFIGS[algo]().replace(**overrides)

"""rlfuse's policy losses as verl policy losses: ``rlfuse_grpo``, ``rlfuse_dapo``, ``rlfuse_gspo``, ``rlfuse_topr``
and ``rlfuse_rover``.

Each is a plain function with the signature of verl's policy-loss registry (verl 0.9,
``verl.trainer.ppo.core_algos.PolicyLossFn``)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        -> (pg_loss, {"actor/pg_clipfrac": float, "actor/ppo_kl": float, "actor/pg_clipfrac_lower": float})

The token losses are rlfuse's (:data:`rlfuse.algos.losses.TOKEN_LOSSES`); the clip range, dual clip,
aggregation, global-batch normalization and rollout importance weights are read from verl's actor config and
applied as verl's own ``vanilla`` loss applies them, so ``rlfuse_grpo`` is a drop-in for ``vanilla``. In verl::

    actor_rollout_ref.model.external_lib=rlfuse.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=rlfuse_dapo

verl imports ``external_lib`` in every worker; importing this module registers the losses whenever verl is
already imported, and :func:`register` does it explicitly. Registering also installs the ``rlfuse``
fused-kernel backend (:mod:`rlfuse.integrations.verl_backend`) and the actor wrappers that give
``rlfuse_rover`` its vocabulary means (:mod:`rlfuse.integrations.verl_actor`). The loss functions themselves
never need verl, and ``import rlfuse`` never imports this module.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

import torch

from rlfuse.algos.configs import LOSS_AGG_MODES, PolicyLossConfig, get_config
from rlfuse.algos.losses import TOKEN_LOSSES, masked_mean
from rlfuse.algos.policy_loss import check_policy_loss_inputs
from rlfuse.integrations.verl_actor import VOCAB_MEANS, install_actor

VERL_LOSS_AGG_MODES = (
    "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean",
)
DUAL_CLIP_ALGOS = ("grpo", "dapo")  # verl's vanilla always dual-clips; GSPO (like verl's gspo) never does


def _read(config: Any, name: str, default: Any) -> Any:
    """``config.name`` from a verl ``ActorConfig``, an omegaconf ``DictConfig``, a dict or None; None -> default."""
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def rlfuse_config_from_verl(algo: str, config: Any = None, loss_agg_mode: Optional[str] = None) -> PolicyLossConfig:
    """rlfuse's config of ``algo`` with the dials of verl's actor ``config``, read as verl's vanilla reads them.

    ``clip_ratio_low`` / ``clip_ratio_high`` (each falling back to ``clip_ratio``, default 0.2) become
    ``epsilon_low`` / ``epsilon_high`` and ``clip_ratio_c`` (default 3.0) the dual clip of grpo and dapo; GSPO
    has no dual clip, and TOPR and ROVER use none of them. ``beta`` stays 0: verl adds its own KL loss
    (``actor.use_kl_loss``). ``loss_agg_mode`` is copied where rlfuse knows the mode (all but ``token-sum``).

    Raises:
        ValueError: an unknown ``algo`` or a value rlfuse's config rejects (e.g. ``clip_ratio_c <= 1``).
    """
    overrides: Dict[str, Any] = {"loss_agg_mode": loss_agg_mode if loss_agg_mode in LOSS_AGG_MODES else None}
    if algo in ("grpo", "dapo", "gspo"):
        clip_ratio = _read(config, "clip_ratio", 0.2)
        overrides["epsilon_low"] = float(_read(config, "clip_ratio_low", clip_ratio))
        overrides["epsilon_high"] = float(_read(config, "clip_ratio_high", clip_ratio))
    if algo in DUAL_CLIP_ALGOS:
        overrides["clip_ratio_c"] = float(_read(config, "clip_ratio_c", 3.0))
    return get_config(algo, **overrides)


def aggregate_loss_verl(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[Any] = None,
    global_batch_size: Optional[Any] = None,
    loss_scale_factor: Optional[Any] = None,
) -> torch.Tensor:
    """Reduce (B, T) token losses under the bool (B, T) ``mask`` as verl's ``core_algos.agg_loss`` does.

    The local sums are divided by the global counts verl passes in ``config.global_batch_info``
    (``batch_num_tokens``, ``global_batch_size``) and multiplied by ``dp_size``, so that gradients summed over
    micro-batches and averaged over data-parallel ranks give the global-batch mean; without them the counts
    are this micro-batch's. Sequence means count only sequences with an unmasked token, so
    ``seq-mean-token-sum-norm`` is sum / (non-empty sequences · ``loss_scale_factor`` or T), where rlfuse's own
    :func:`rlfuse.algos.aggregate_loss` divides by B·T. Masked positions never contribute, even if NaN.

    Raises:
        ValueError: an unknown ``loss_agg_mode``, or ``dp_size > 1`` without the global count the mode needs.
    """
    losses = torch.where(mask, token_losses, 0.0)
    if loss_agg_mode == "token-sum":
        return losses.sum() * dp_size
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            _check_local(dp_size, "batch_num_tokens")
            batch_num_tokens = mask.sum().clamp(min=1)
        return losses.sum() / batch_num_tokens * dp_size
    tokens_per_seq = mask.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = losses.sum(-1) / tokens_per_seq.clamp(min=1)
    elif loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = losses.sum(-1)
    else:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(VERL_LOSS_AGG_MODES)}; got {loss_agg_mode!r}")
    if global_batch_size is None:
        _check_local(dp_size, "global_batch_size")
        global_batch_size = (tokens_per_seq > 0).sum().clamp(min=1)
    loss = seq_losses.sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _check_local(dp_size: int, name: str) -> None:
    if dp_size > 1:
        raise ValueError(f"dp_size={dp_size} > 1 needs the global {name} in config.global_batch_info")


def verl_policy_loss(
    algo: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    vocab_mean: Optional[torch.Tensor] = None,
    old_vocab_mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """rlfuse's ``algo`` token loss, weighted and aggregated the way verl's policy losses are.

    Args:
        algo: ``grpo``, ``dapo``, ``gspo``, ``topr`` or ``rover``.
        old_log_prob: (B, T) float log-probs of the sampled tokens under the policy that sampled them.
        log_prob: (B, T) float log-probs under the current policy (with grad).
        advantages: (B, T) or (B,) float advantages from verl's estimator.
        response_mask: (B, T) bool or 0/1, True on response tokens that count.
        loss_agg_mode: one of :data:`VERL_LOSS_AGG_MODES`; see :func:`aggregate_loss_verl`.
        config: verl's actor config (``ActorConfig``, ``DictConfig`` or dict), read for ``clip_ratio``,
            ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` and ``global_batch_info``; None for
            verl's defaults on a single micro-batch.
        rollout_is_weights: (B, T) float rollout-correction weights multiplying the token losses, or None.
        vocab_mean, old_vocab_mean: (B, T) float vocabulary means of the log-probs under the current and old
            policy; required by ROVER, ignored by the others.

    Returns:
        ``(pg_loss, pg_metrics)``: a scalar loss, and floats ``actor/pg_clipfrac`` (share of response tokens
        whose ratio clip, or TOPR's taper, is active), ``actor/ppo_kl`` (masked mean of old_log_prob -
        log_prob, nats) and ``actor/pg_clipfrac_lower`` (share where the dual clip caps the loss).

    Unlike verl's vanilla, the log ratio is not clamped to [-20, 20], nor GSPO's sequence log ratio at 10;
    both give the same values up to |A|·e^-20, except GSPO sequences with a mean log ratio above 10.

    Raises:
        ValueError: ROVER without ``vocab_mean``/``old_vocab_mean``, an unknown ``loss_agg_mode``, mismatched
            shapes or devices, or a config value rlfuse rejects.
        TypeError: non-tensor or non-float inputs.
    """
    cfg = rlfuse_config_from_verl(algo, config, loss_agg_mode)
    if cfg.loss_type == "rover" and (vocab_mean is None or old_vocab_mean is None):
        raise ValueError(
            "rlfuse_rover needs vocab_mean and old_vocab_mean, the (B, T) vocabulary means of the log-probs under "
            "the current and the old policy, which verl's policy-loss interface does not pass. In verl, run the "
            "actor with use_fused_kernels=True and fused_kernel_options.impl_backend=rlfuse and load "
            "rlfuse.integrations.verl (docs/verl.md); elsewhere pass rlfuse_rover(..., vocab_mean=..., "
            "old_vocab_mean=...)."
        )
    check_policy_loss_inputs(log_prob, old_log_prob, advantages, response_mask, cfg, None, vocab_mean, old_vocab_mean)
    mask = response_mask.bool()
    # Zero every input at masked positions so that NaN padding reaches neither the loss nor the gradients.
    logps, old_logps, vm, old_vm = (
        None if t is None else torch.where(mask, t, 0.0) for t in (log_prob, old_log_prob, vocab_mean, old_vocab_mean)
    )
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else torch.where(mask, advantages, 0.0)
    adv = adv.to(logps.dtype)
    token_loss, clipped, ratio = TOKEN_LOSSES[cfg.loss_type](logps, old_logps, adv, mask, cfg, vm, old_vm)
    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights
    loss = aggregate_loss_verl(token_loss, mask, loss_agg_mode, **dict(_read(config, "global_batch_info", {})))
    return loss, _verl_metrics(cfg, logps.detach(), old_logps, adv, mask, clipped, ratio.detach())


def _verl_metrics(cfg, logps, old_logps, adv, mask, clipped, ratio) -> Dict[str, float]:
    """verl's metrics; for the PPO-clip losses the ratio clip and the dual clip are counted apart, as verl does."""
    lower = torch.zeros_like(mask)
    if cfg.loss_type == "ppo_clip":
        unclipped = -adv * ratio
        clipped_loss = -adv * ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
        clipped = clipped_loss > unclipped
        if cfg.clip_ratio_c is not None:
            lower = (adv < 0) & (torch.maximum(unclipped, clipped_loss) > -adv * cfg.clip_ratio_c)
    return {
        "actor/pg_clipfrac": masked_mean(clipped.to(logps.dtype), mask).item(),
        "actor/ppo_kl": masked_mean(old_logps - logps, mask).item(),
        "actor/pg_clipfrac_lower": masked_mean(lower.to(logps.dtype), mask).item(),
    }


def rlfuse_grpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """GRPO's PPO-clip loss, dual-clipped at ``clip_ratio_c`` as verl's vanilla ("DeepSeekMath: Pushing the Limits
    of Mathematical Reasoning in Open Language Models", eq. 3). Arguments and errors: :func:`verl_policy_loss`."""
    return verl_policy_loss("grpo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)


def rlfuse_dapo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """DAPO's clip-higher PPO loss ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale"): set
    ``clip_ratio_high=0.28`` and ``loss_agg_mode=token-mean`` in verl. Arguments: :func:`verl_policy_loss`."""
    return verl_policy_loss("dapo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)


def rlfuse_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """GSPO-token's loss on the length-normalized sequence ratio, no dual clip ("Group Sequence Policy
    Optimization", eq. 10): set ``clip_ratio_low=3e-4``, ``clip_ratio_high=4e-4``. See :func:`verl_policy_loss`."""
    return verl_policy_loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)


def rlfuse_topr(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """TOPR's -sg(alpha)·A·logp, alpha = clamp(ratio, 0, 1) where A < 0 ("Tapered Off-Policy REINFORCE", eq. 7).

    The advantages are verl's as given; the paper's are R - baseline with correctness rewards R = +1 (correct)
    and -1 (wrong), which ``algorithm.adv_estimator=rlfuse_topr`` (:func:`rlfuse_topr_advantage`) computes
    from a reward function scoring ±1. The clip dials are unused. Arguments and errors: :func:`verl_policy_loss`.
    """
    return verl_policy_loss("topr", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)


def rlfuse_rover(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                 rollout_is_weights=None, *, vocab_mean=None, old_vocab_mean=None):
    """ROVER's (Q - sg(target))² ("Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards").

    Needs ``vocab_mean`` and ``old_vocab_mean`` (B, T); when not passed they are read from
    :data:`rlfuse.integrations.verl_actor.VOCAB_MEANS`, which that module's actor wrapper sets around verl's call. Without either it
    raises ``ValueError`` rather than compute another loss. Arguments: :func:`verl_policy_loss`.
    """
    if vocab_mean is None and old_vocab_mean is None and VOCAB_MEANS.get() is not None:
        vocab_mean, old_vocab_mean = VOCAB_MEANS.get()
    return verl_policy_loss("rover", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights, vocab_mean, old_vocab_mean)


def rlfuse_topr_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None,
                          **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """TOPR's advantage as a verl advantage estimator: A = R on every response token, no group statistics
    ("Tapered Off-Policy REINFORCE" with baseline 0 and correctness rewards R = ±1; rlfuse's ``TOPRConfig``).

    Args:
        token_level_rewards: (B, T) float, the score on the last response token (verl's layout); R is the row sum.
        response_mask: (B, T) 0/1 or bool.
        config, kwargs: what verl passes to every estimator (``AlgoConfig``, ``index``, ...), unused.

    Returns:
        ``(advantages, returns)``, both (B, T) float32: R·mask.
    """
    scores = token_level_rewards.float().sum(-1, keepdim=True)
    advantages = scores * response_mask.to(scores.dtype)
    return advantages, advantages


VERL_POLICY_LOSSES = {
    "rlfuse_grpo": rlfuse_grpo,
    "rlfuse_dapo": rlfuse_dapo,
    "rlfuse_gspo": rlfuse_gspo,
    "rlfuse_topr": rlfuse_topr,
    "rlfuse_rover": rlfuse_rover,
}


def _offpolicy_loss(algo: str):
    """verl's policy-loss function for rlfuse's ``algo`` preset (its own clip range and dials; verl's clip_ratio
    keys are not read). Arguments and errors: :func:`verl_policy_loss`."""
    preset = get_config(algo)

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        if preset.drop != "none":
            raise ValueError(
                f"rlfuse_{algo} shapes the advantages (drop={preset.drop!r}), which verl computes before "
                "its policy loss; use rlfuse_reinforce with advantages computed by "
                "rlfuse.algos.balanced_drop_advantages instead"
            )
        return verl_policy_loss(algo, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                                rollout_is_weights)

    loss_fn.__name__ = loss_fn.__qualname__ = f"rlfuse_{algo}"
    loss_fn.__doc__ = f"rlfuse's ``{algo}`` loss in verl: {type(preset).__doc__.splitlines()[0]}"
    return loss_fn


# The off-policy family ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"), CISPO, GMPO, SAPO, LUSPO
# and VESPO.
VERL_POLICY_LOSSES.update({f"rlfuse_{algo}": _offpolicy_loss(algo) for algo in (
    "reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_drop", "red_weight", "cispo", "gmpo", "sapo",
    "luspo", "vespo")})


def register(install: bool = True) -> Tuple[str, ...]:
    """Register :data:`VERL_POLICY_LOSSES` in verl's ``POLICY_LOSS_REGISTRY`` and :func:`rlfuse_topr_advantage`
    as the advantage estimator ``rlfuse_topr``; returns the losses' names.

    With ``install`` also make verl accept ``fused_kernel_options.impl_backend=rlfuse``
    (:func:`rlfuse.integrations.verl_backend.install_backend`) and wrap its actor for ``rlfuse_rover``
    (:func:`rlfuse.integrations.verl_actor.install_actor`).

    Raises:
        ImportError: ``verl.trainer.ppo.core_algos`` cannot be imported (verl or one of its dependencies missing).
    """
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    for name, fn in VERL_POLICY_LOSSES.items():
        register_policy_loss(name)(fn)
    register_adv_est("rlfuse_topr")(rlfuse_topr_advantage)
    if install:
        from rlfuse.integrations.verl_backend import install_backend  # imports verl at its top

        install_backend()
        install_actor()
    return tuple(VERL_POLICY_LOSSES)


if "verl" in sys.modules:  # imported by verl itself (external_lib, VERL_USE_EXTERNAL_MODULES) or after it
    register()

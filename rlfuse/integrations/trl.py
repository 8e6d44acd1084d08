"""TRL's ``GRPOTrainer`` on rlfuse's fused log-prob kernels: switching is a one-line import change.

``from rlfuse.integrations.trl import GRPOTrainer`` gives a subclass of ``trl.GRPOTrainer`` (TRL >= 1.16) that

- computes every per-token log-prob and entropy (policy, old policy, reference model) from the last hidden
  states and the LM head with :func:`rlfuse.kernels.linear_token_logprobs`, never materializing the
  (B, T, V) logits. Models whose logits are more than ``hidden @ lm_head.weight.T + bias`` (soft-capping,
  logit scaling) or whose head cannot be read as one plain weight (quantized, ZeRO-3 or FSDP-sharded) run
  their own forward for the completion logits and :func:`rlfuse.kernels.token_logprobs` instead;
- computes TRL 1.16's GRPO loss with the same math, normalizers and logged metric keys
  (:meth:`GRPOTrainer._compute_loss`), and adds ``loss_type="topr"`` and ``loss_type="rover"``, rlfuse's TOPR
  and ROVER token losses on the same log-probs;
- raises ``ValueError`` at construction for every TRL option it does not reproduce, instead of dropping it.

TRL is imported with this module only; ``import rlfuse`` never needs it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from trl.trainer.utils import nanmax, nanmin

from rlfuse.algos.configs import get_config
from rlfuse.algos.losses import TOKEN_LOSSES, kl_penalty, sequence_log_ratio
from rlfuse.integrations.trl_head import add_rlfuse_head, head_reproduces_logits, plain_lm_head
from rlfuse.kernels import IGNORE_INDEX, TokenLogprobs

MIN_TRL_VERSION = "1.16.0"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"rlfuse.integrations.trl reproduces the GRPO loss of trl>={MIN_TRL_VERSION}, but trl {trl.__version__} "
        f"is installed; upgrade with: pip install 'trl>={MIN_TRL_VERSION}'"
    )

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "topr", "rover")
RLFUSE_LOSS_TYPES = ("topr", "rover")  # rlfuse's token losses, not TRL's


def check_grpo_config(args) -> None:
    """Raise ``ValueError`` naming the first ``trl.GRPOConfig`` option that :class:`GRPOTrainer` cannot honour.

    Unsupported: ``loss_type`` other than grpo, bnpo, dr_grpo, dapo, cispo, topr and rover; the entropy bonus
    (``entropy_coef != 0``, ``use_adaptive_entropy``); ``use_liger_kernel`` (a second kernel provider). With
    topr or rover, the ratio-clip dials ``epsilon_high`` and ``delta`` (neither loss clips a ratio; ``epsilon``
    is ignored), and ``importance_sampling_level="sequence"`` with rover (ROVER's Q is per token).
    """
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
        _check_rlfuse_loss_options(args)
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError(
            "the entropy bonus (entropy_coef != 0 or use_adaptive_entropy=True) is not supported by rlfuse's "
            "GRPOTrainer; set entropy_coef=0.0 and use_adaptive_entropy=False, or train with trl.GRPOTrainer"
        )
    if args.use_liger_kernel:
        raise ValueError(
            "use_liger_kernel=True is not supported together with rlfuse's GRPOTrainer, which computes the "
            "log-probs with rlfuse's kernels; set use_liger_kernel=False, or train with trl.GRPOTrainer"
        )


def _check_rlfuse_loss_options(args) -> None:
    for name in ("epsilon_high", "delta"):
        if getattr(args, name) is not None:
            raise ValueError(f"{name}={getattr(args, name)!r} has no meaning for loss_type={args.loss_type!r}, which "
                             f"clips no ratio; leave {name}=None")
    if args.loss_type == "rover" and args.importance_sampling_level != "token":
        raise ValueError("importance_sampling_level='sequence' has no meaning for loss_type='rover', whose Q-values "
                         "are per token; set importance_sampling_level='token'")


def rlfuse_token_loss(
    loss_type: str,
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_level: str = "token",
    vocab_mean: Optional[torch.Tensor] = None,
    old_vocab_mean: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rlfuse's TOPR or ROVER token losses (:data:`rlfuse.algos.losses.TOKEN_LOSSES`) before masking and
    aggregation, with rlfuse's default dials (ROVER's rho = 1).

    - topr: -sg(alpha)·A·logp, alpha = clamp(r, 0, 1) where A < 0, else 1 ("Tapered Off-Policy REINFORCE", eq. 7);
    - rover: (rho·(logp - old_logp) - sg(A + rho·(V̄(s_{t+1}) - V̄_old(s_{t+1}))))² ("Random Policy Valuation is
      Enough for LLM Reasoning with Verifiable Rewards").

    Args:
        per_token_logps: (B, T) float32 with grad; old_per_token_logps: (B, T) float32.
        advantages: (B, 1) or (B, T) float32, TRL's.
        mask: (B, T) 0/1, completion tokens that count.
        vocab_mean, old_vocab_mean: (B, T) float32 vocabulary means of the log-probs (rover only).

    Returns:
        ``(per_token_loss, tapered, ratio)``, each (B, T): float32 losses, bool tokens whose TOPR weight was
        truncated (all False for rover), float32 ratio r = exp(logp - old_logp).
    """
    config = get_config(loss_type, importance_sampling_level=importance_sampling_level)
    keep = mask.bool()
    logps, old, vm, old_vm = (None if t is None else torch.where(keep, t, 0.0)
                              for t in (per_token_logps, old_per_token_logps, vocab_mean, old_vocab_mean))
    adv = advantages if advantages.shape[1] == 1 else torch.where(keep, advantages, 0.0)
    return TOKEN_LOSSES[config.loss_type](logps, old, adv.to(logps.dtype), keep, config, vm, old_vm)


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token losses of TRL's GRPO family before masking and aggregation, as TRL 1.16 computes them.

    - grpo, bnpo, dr_grpo, dapo: -min(r·A, clip(r, 1 - epsilon_low, 1 + epsilon_high)·A), the clipped
      surrogate of GRPO ("DeepSeekMath", eq. 3) with DAPO's decoupled clip ("DAPO: An Open-Source LLM
      Reinforcement Learning System at Scale"); ``delta`` caps r first (two-sided clipping);
    - cispo: -sg(min(r, epsilon_high))·A·logp ("MiniMax-M1").

    r = exp(logp - old_logp) per token at ``importance_sampling_level="token"``; at ``"sequence"`` one ratio
    per sequence, exp of the masked mean of logp - old_logp ("Group Sequence Policy Optimization").

    Args:
        per_token_logps: (B, T) float32 log-probs of the completion tokens under the policy (with grad).
        old_per_token_logps: (B, T) float32 under the policy that sampled them.
        advantages: (B, 1) or (B, T) float32.
        mask: (B, T) int64 or float, 1 on completion tokens that count.

    Returns:
        ``(per_token_loss, ratio)``: ratio r is (B, T) at token level and (B, 1) at sequence level; the
        loss has r's shape, or (B, T) for cispo. Both float32.
    """
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask.bool(), normalize=True)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        return -torch.clamp(ratio, max=epsilon_high).detach() * advantages * per_token_logps, ratio
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(capped * advantages, clipped * advantages), ratio


class FusedGRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with log-probs from rlfuse's kernels and TRL's GRPO loss; also exported as ``GRPOTrainer``.

    Takes exactly ``trl.GRPOTrainer``'s arguments. Supported: ``loss_type`` grpo ("DeepSeekMath"), bnpo,
    dr_grpo ("Understanding R1-Zero-Like Training: A Critical Perspective"), dapo ("DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale") and cispo ("MiniMax-M1"); ``importance_sampling_level`` token
    or sequence ("Group Sequence Policy Optimization"); ``epsilon``/``epsilon_high``; ``delta``; ``beta``
    with TRL's k3 KL to the reference model and ``use_bias_correction_kl``; ``top_entropy_quantile``;
    ``off_policy_mask_threshold``; vLLM's importance-sampling correction; tool masks; PEFT (a LoRA policy,
    the reference by disabling the adapter); ``cast_lm_head_to_fp32``. ``loss_type`` topr ("Tapered Off-Policy
    REINFORCE") and rover ("Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards") use
    rlfuse's token losses (:func:`rlfuse_token_loss`) on TRL's advantages, reduced as dapo (token mean over the
    accumulated batch), with the same masks and KL; ROVER's old vocabulary means come from TRL's old-policy pass
    (:meth:`_generate_and_score_completions`), or from the current pass when the step is on-policy.

    Raises:
        ValueError: at construction, for options listed in :func:`check_grpo_config`, vision-language
            models, and Mixture-of-Experts router auxiliary losses (set ``router_aux_loss_coef=0.0``).
    """

    _tag_names = ["trl", "grpo", "rlfuse"]

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, **trainer_kwargs):
        if args is not None:
            check_grpo_config(args)
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        if self._is_vlm:
            raise ValueError("vision-language models are not supported by rlfuse's GRPOTrainer; train them with "
                             "trl.GRPOTrainer")
        if self.aux_loss_enabled:
            raise ValueError(
                "the Mixture-of-Experts router auxiliary loss is not supported by rlfuse's GRPOTrainer; set "
                "router_aux_loss_coef=0.0 in GRPOConfig, or train with trl.GRPOTrainer"
            )
        for target in (self.model, self.ref_model):
            if target is not None:
                target = self.accelerator.unwrap_model(target)
                add_rlfuse_head(target.get_base_model() if is_peft_model(target) else target,
                                self.args.cast_lm_head_to_fp32)

    _recorded_passes = None  # TokenLogprobs of each no-grad pass while ROVER's generation step records them

    def _generate_and_score_completions(self, inputs):
        """TRL's generation step; for ROVER it also stores ``old_vocab_mean`` (B, T) float32, the vocabulary means
        of TRL's own old-policy pass, beside ``old_per_token_logps`` (absent when TRL skips that pass)."""
        if self.loss_type != "rover":
            return super()._generate_and_score_completions(inputs)
        self._recorded_passes = []
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            recorded, self._recorded_passes = self._recorded_passes, None
        old = output.get("old_per_token_logps")
        if old is not None:
            (match,) = [out for out in recorded if out.logps is old][:1] or [None]
            if match is None:
                raise RuntimeError("TRL's old_per_token_logps is not the output of an old-policy pass of this "
                                   "trainer, so ROVER's old vocabulary means are unknown")
            output["old_vocab_mean"] = match.vocab_mean
        return output

    def _token_outputs(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None) -> TokenLogprobs:
        """:class:`rlfuse.kernels.TokenLogprobs` of the last ``logits_to_keep`` tokens, via :func:`add_rlfuse_head`:
        ``logps``, ``entropy`` and (rover only) ``vocab_mean``, each (B, T) float32, 0 at padding."""
        batch_size = batch_size or input_ids.size(0)
        vocab_mean = self.loss_type == "rover"
        parts = []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            targets = ids[:, -logits_to_keep:].masked_fill(attn[:, -logits_to_keep:] == 0, IGNORE_INDEX)
            with self.accelerator.autocast():
                parts.append(model(input_ids=ids, attention_mask=attn, rlfuse_targets=targets,
                                   rlfuse_temperature=self.temperature, rlfuse_vocab_mean=vocab_mean))
        return TokenLogprobs(*(None if part[0] is None else torch.cat(part) for part in zip(*parts)))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal_inputs):
        """Per-token log-probs and entropies of the last ``logits_to_keep`` tokens, via :func:`add_rlfuse_head`.

        Args:
            input_ids, attention_mask: (B, P + T) int64, prompt then completion; T = ``logits_to_keep``.
            batch_size: sequences per forward (all when None).

        Returns:
            ``(logps, entropies, None)``: (B, T) float32, 0 at padding; entropies (nats) are None unless
            ``compute_entropy``. The third item stands for TRL's MoE auxiliary loss, never computed here.
        """
        extra = sorted(name for name, value in multimodal_inputs.items() if value is not None)
        if compute_aux_loss or extra:
            raise ValueError(f"rlfuse's GRPOTrainer takes text-only models without router auxiliary loss; got "
                             f"{', '.join(extra) or 'compute_aux_loss=True'}")
        out = self._token_outputs(model, input_ids, attention_mask, logits_to_keep, batch_size)
        if self._recorded_passes is not None and not torch.is_grad_enabled():
            self._recorded_passes.append(out)
        return out.logps, out.entropy if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        """TRL 1.16's GRPO loss on log-probs from :meth:`_get_per_token_logps_and_entropies`.

        ``inputs`` as TRL's ``_generate_and_score_completions`` makes them: ``prompt_ids``/``prompt_mask``
        (B, P) int64, ``completion_ids``/``completion_mask`` (B, T) int64, ``advantages`` (B,) or (B, T)
        float32, optional ``old_per_token_logps``, ``ref_per_token_logps``, ``sampling_per_token_logps``
        (B, T) float32, ``importance_sampling_ratio`` (B, T) or (B, 1) float32, ``tool_mask`` (B, T) int64,
        and ``num_items_in_batch`` (scalar, completion tokens in the generation batch).

        Token losses from :func:`grpo_token_loss` (:func:`rlfuse_token_loss` for topr and rover), times the
        off-policy mask, the high-entropy mask and the vLLM importance ratio when enabled, plus beta·k3 KL; then reduced as TRL's ``loss_type`` does
        (grpo: mean over sequences of token means; bnpo: token mean; dr_grpo: sum / (B·max_completion_length);
        dapo, cispo, topr, rover: sum / tokens of the accumulated batch), scaled for gradient accumulation.
        ROVER also reads ``old_vocab_mean`` (B, T) float32, or uses the current pass's when on-policy.

        Returns:
            The scalar float32 loss. Logs TRL's metrics under TRL's keys: ``entropy``, ``kl``,
            ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` or ``cispo_clip_ratio``; for topr
            ``topr/tapered_ratio`` (share of tokens whose weight the taper truncated: A < 0 and r < 1), for rover
            ``rover/td_error`` (mean |Q - target|).
        """
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        out = self._token_outputs(model, input_ids, attention_mask, completion_ids.size(1))
        per_token_logps, entropies = out.logps, out.entropy
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        on_policy = old_per_token_logps is None
        old_per_token_logps = per_token_logps.detach() if on_policy else old_per_token_logps

        own_metrics = {}
        if self.loss_type in RLFUSE_LOSS_TYPES:
            old_vocab_mean = out.vocab_mean.detach() if on_policy and out.vocab_mean is not None else None
            per_token_loss, tapered, ratio = rlfuse_token_loss(
                self.loss_type, per_token_logps, old_per_token_logps, advantages, mask, self.importance_sampling_level,
                out.vocab_mean, inputs.get("old_vocab_mean", old_vocab_mean))
            own_metrics = ({"topr/tapered_ratio": tapered.float()} if self.loss_type == "topr"
                           else {"rover/td_error": per_token_loss.detach().sqrt()})
        else:
            per_token_loss, ratio = grpo_token_loss(
                per_token_logps, old_per_token_logps, advantages, mask, loss_type=self.loss_type,
                importance_sampling_level=self.importance_sampling_level, epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high, delta=self.args.delta)
        if self.off_policy_mask_threshold is not None:
            sampling_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages, per_token_logps, sampling_logps, mask, self.off_policy_mask_threshold)
        if self.top_entropy_quantile < 1.0:
            per_token_loss = per_token_loss * self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if self.beta != 0.0:
            per_token_kl = kl_penalty(per_token_logps, inputs["ref_per_token_logps"], "k3")
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        mode = "train" if self.model.training else "eval"
        loss = self._aggregate(per_token_loss, mask, inputs, mode)
        self._log_loss_metrics(mode, mask, ratio, advantages, entropies, per_token_kl, own_metrics)
        return loss

    def _aggregate(self, per_token_loss, mask, inputs, mode) -> torch.Tensor:
        if self.loss_type in ("dapo", "cispo", *RLFUSE_LOSS_TYPES):
            # num_items_in_batch spans the generation batch; rescale it to one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return (per_token_loss * mask).sum() / normalizer
        if self.loss_type == "grpo":
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        else:  # dr_grpo
            loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)

    def _log_loss_metrics(self, mode, mask, ratio, advantages, entropies, per_token_kl, own_metrics=None) -> None:
        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # sequence level: one value per sequence
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * mask).sum(), mask.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if per_token_kl is not None:
            metrics["kl"].append(global_masked_mean(per_token_kl.detach()))
        metrics["entropy"].append(global_masked_mean(entropies.detach()))
        ratio = ratio.detach()
        if self.loss_type in RLFUSE_LOSS_TYPES:  # no ratio clip; each loss's own (B, T) metric instead
            for key, value in own_metrics.items():
                metrics[key].append(global_masked_mean(value))
            return
        if self.loss_type == "cispo":
            clipped = (ratio > self.epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if self.args.delta is not None:
            ratio = torch.clamp(ratio, max=self.args.delta)  # TRL reports clipping of the delta-capped ratio
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())


GRPOTrainer = FusedGRPOTrainer

__all__ = ["FusedGRPOTrainer", "GRPOTrainer", "add_rlfuse_head", "check_grpo_config", "grpo_token_loss",
           "head_reproduces_logits", "plain_lm_head", "rlfuse_token_loss"]

"""TRL's ``GRPOTrainer`` on rlfuse's fused log-prob kernels: switching is a one-line import change.

``from rlfuse.integrations.trl import GRPOTrainer`` gives a subclass of ``trl.GRPOTrainer`` (TRL >= 1.16) that

- computes every per-token log-prob and entropy (policy, old policy, reference model) from the last hidden
  states and the LM head with :func:`rlfuse.kernels.linear_token_logprobs`, never materializing the
  (B, T, V) logits. Models whose logits are more than ``hidden @ lm_head.weight.T + bias`` (soft-capping,
  logit scaling) or whose head cannot be read as one plain weight (quantized, ZeRO-3 or FSDP-sharded) run
  their own forward for the completion logits and :func:`rlfuse.kernels.token_logprobs` instead;
- computes TRL 1.16's GRPO loss with the same math, normalizers and logged metric keys
  (:meth:`GRPOTrainer._compute_loss`), the entropy bonus (:mod:`rlfuse.integrations.trl_entropy`) and the MoE
  router's load-balancing loss included, and adds rlfuse's presets as ``loss_type`` values (topr, rover, reinforce,
  rec, rec_is, rec_ring, opmd, asymre, red_weight, gmpo; :mod:`rlfuse.integrations.trl_losses`), each computed by
  rlfuse's own token loss on the same log-probs;
- runs TRL's own computation, said once in the log, where its path cannot serve (vision-language models), and
  raises ``ValueError`` at construction for the options it refuses (``use_liger_kernel``), never dropping one.

TRL is imported with this module only; ``import rlfuse`` never needs it.
"""

from __future__ import annotations

import logging

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from trl.trainer.utils import nanmax, nanmin

from rlfuse.algos.losses import kl_penalty, vespo_weights
from rlfuse.integrations.trl_head import add_rlfuse_head, head_reproduces_logits, plain_lm_head
from rlfuse.integrations.trl_entropy import EntropyBonus
from rlfuse.integrations.trl_losses import (
    LOSS_TYPES, RLFUSE_LOSS_TYPES, TRL_LOSS_TYPES, check_grpo_config, grpo_token_loss, rlfuse_loss_metrics,
    rlfuse_token_loss, trl_aggregation, trl_importance_ratio,
)
from rlfuse.kernels import IGNORE_INDEX, TokenLogprobs

logger = logging.getLogger(__name__)

MIN_TRL_VERSION = "1.16.0"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"rlfuse.integrations.trl reproduces the GRPO loss of trl>={MIN_TRL_VERSION}, but trl {trl.__version__} "
        f"is installed; upgrade with: pip install 'trl>={MIN_TRL_VERSION}'"
    )


class FusedGRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with log-probs from rlfuse's kernels and TRL's GRPO loss; also exported as ``GRPOTrainer``.

    Takes exactly ``trl.GRPOTrainer``'s arguments. Supported: ``loss_type`` grpo ("DeepSeekMath"), bnpo,
    dr_grpo ("Understanding R1-Zero-Like Training: A Critical Perspective"), dapo ("DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale"), cispo ("MiniMax-M1"), sapo ("Soft Adaptive Policy Optimization"),
    luspo ("Length-Unbiased Sequence Policy Optimization") and vespo ("VESPO: Variational Sequence-Level Soft
    Policy Optimization"); the entropy bonus, static or adaptive; Mixture-of-Experts router losses;
    ``importance_sampling_level`` token or sequence ("Group Sequence Policy Optimization");
    ``epsilon``/``epsilon_high``; ``delta``; ``beta`` with TRL's k3 KL to the reference model and
    ``use_bias_correction_kl``; ``top_entropy_quantile``; ``off_policy_mask_threshold``; vLLM's
    importance-sampling correction; tool masks; PEFT (a LoRA policy, the reference by disabling the adapter);
    ``cast_lm_head_to_fp32``.

    rlfuse's presets (:data:`rlfuse.integrations.trl_losses.RLFUSE_LOSS_TYPES`) use rlfuse's token losses
    (:func:`rlfuse_token_loss`, the functions :func:`rlfuse.algos.policy_loss` calls) on TRL's advantages and
    old log-probs, with the same masks and KL, reduced by the preset's ``loss_agg_mode`` with TRL's normalizer
    (token-mean: dapo's; seq-mean-token-mean: grpo's): topr ("Tapered Off-Policy REINFORCE"), rover ("Random
    Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards"; its old vocabulary means come from
    TRL's old-policy pass, :meth:`_generate_and_score_completions`), reinforce, rec, rec_is, rec_ring, opmd,
    asymre, red_weight ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm") and gmpo ("Geometric-Mean
    Policy Optimization"). When TRL skips the old-policy pass the step is on-policy and the old log-probs are
    the current ones, detached: exactly the sampling policy's, so ratios are 1 and OPMD's k2 regularizer and its
    gradient are 0, as they are at the behaviour policy. red_drop is refused (``RED_DROP_ERROR``).

    Raises:
        ValueError: at construction, for options listed in :func:`check_grpo_config`, and rlfuse's presets
            with a vision-language model (TRL's loss types fall back to TRL's own computation there).
    """

    _tag_names = ["trl", "grpo", "rlfuse"]

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, **trainer_kwargs):
        if args is not None:
            check_grpo_config(args)
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        if self._is_vlm:
            if self.loss_type not in TRL_LOSS_TYPES:
                raise ValueError(f"loss_type={self.loss_type!r} (an rlfuse preset) needs rlfuse's log-prob path, "
                                 "which does not serve vision-language models; use one of TRL's loss types "
                                 f"({', '.join(TRL_LOSS_TYPES)}), which fall back to TRL's own computation")
            self._fall_back("vision-language models (the image inputs reach the model's own forward only)")
        self.entropy_bonus = EntropyBonus(self)
        for target in (self.model, self.ref_model):
            if target is not None and not self._trl_fallback:
                target = self.accelerator.unwrap_model(target)
                add_rlfuse_head(target.get_base_model() if is_peft_model(target) else target,
                                self.args.cast_lm_head_to_fp32)

    _trl_fallback = None  # why TRL computes this run's log-probs and loss (set by _fall_back), or None
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

    def _fall_back(self, why: str) -> None:
        """Compute log-probs and the loss TRL's own way for this run (materialized logits), and say so once."""
        self._trl_fallback = why
        logger.warning("rlfuse's GRPOTrainer: TRL computes the log-probs and the loss of this run, not rlfuse's "
                       "kernels: %s", why)

    def _token_outputs(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                       router_aux=False):
        """:class:`rlfuse.kernels.TokenLogprobs` of the last ``logits_to_keep`` tokens, via :func:`add_rlfuse_head`:
        ``logps``, ``entropy`` and (rover only) ``vocab_mean``, each (B, T) float32, 0 at padding, and the MoE
        load-balancing loss averaged over the forward chunks as TRL averages it (None unless ``router_aux``)."""
        batch_size = batch_size or input_ids.size(0)
        vocab_mean = self.loss_type == "rover"
        parts, aux = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            targets = ids[:, -logits_to_keep:].masked_fill(attn[:, -logits_to_keep:] == 0, IGNORE_INDEX)
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=attn, rlfuse_targets=targets,
                            rlfuse_temperature=self.temperature, rlfuse_vocab_mean=vocab_mean,
                            rlfuse_router_aux=router_aux)
            if router_aux:
                out, chunk_aux = out
                aux.append(chunk_aux)
            parts.append(out)
        out = TokenLogprobs(*(None if part[0] is None else torch.cat(part) for part in zip(*parts)))
        return out, torch.stack(aux).mean() if router_aux else None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal_inputs):
        """Per-token log-probs and entropies of the last ``logits_to_keep`` tokens, via :func:`add_rlfuse_head`.

        Args:
            input_ids, attention_mask: (B, P + T) int64, prompt then completion; T = ``logits_to_keep``.
            batch_size: sequences per forward (all when None).

        Returns:
            ``(logps, entropies, aux_loss)``: (B, T) float32, 0 at padding; entropies (nats) are None unless
            ``compute_entropy``; aux_loss, the MoE router's load-balancing loss (scalar), None unless
            ``compute_aux_loss``. Image inputs (a vision-language model) go to TRL's own method.
        """
        if self._trl_fallback or any(value is not None for value in multimodal_inputs.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal_inputs)
        out, aux = self._token_outputs(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                       router_aux=compute_aux_loss)
        if self._recorded_passes is not None and not torch.is_grad_enabled():
            self._recorded_passes.append(out)
        return out.logps, out.entropy if compute_entropy else None, aux

    def _compute_loss(self, model, inputs):
        """TRL 1.16's GRPO loss on log-probs from :meth:`_get_per_token_logps_and_entropies`.

        ``inputs`` as TRL's ``_generate_and_score_completions`` makes them: ``prompt_ids``/``prompt_mask``
        (B, P) int64, ``completion_ids``/``completion_mask`` (B, T) int64, ``advantages`` (B,) or (B, T)
        float32, optional ``old_per_token_logps``, ``ref_per_token_logps``, ``sampling_per_token_logps``
        (B, T) float32, ``importance_sampling_ratio`` (B, T) or (B, 1) float32, ``tool_mask`` (B, T) int64,
        and ``num_items_in_batch`` (scalar, completion tokens in the generation batch).

        Token losses from :func:`grpo_token_loss` (:func:`rlfuse_token_loss` for rlfuse's presets), times the
        off-policy mask, the high-entropy mask and the vLLM importance ratio when enabled, plus beta·k3 KL (times
        TRL's differentiable ratio under ``use_bias_correction_kl``); then reduced as TRL's ``loss_type`` does, a
        preset as the TRL type of its ``loss_agg_mode`` (:func:`trl_aggregation`): grpo: mean over sequences of
        token means; bnpo: token mean; dr_grpo: sum / (B·max_completion_length); dapo, cispo: sum / tokens of the
        accumulated batch; scaled for gradient accumulation. ROVER also reads ``old_vocab_mean`` (B, T) float32,
        or uses the current pass's when on-policy.

        Returns:
            The scalar float32 loss. Logs TRL's metrics under TRL's keys: ``entropy``, ``kl``,
            ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` (also gmpo's, in log-ratio space as
            TRL's experimental GMPO trainer) or ``cispo_clip_ratio``; for the other presets their own metric
            (:func:`rlfuse.integrations.trl_losses.rlfuse_loss_metrics`), e.g. ``topr/tapered_ratio``,
            ``rover/td_error``, ``rec/masked_ratio``, ``opmd/k2``.
        """
        if self._trl_fallback:
            return super()._compute_loss(model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        out, aux_loss = self._token_outputs(model, input_ids, attention_mask, completion_ids.size(1),
                                            router_aux=self.aux_loss_enabled)
        per_token_logps, entropies = out.logps, out.entropy
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        on_policy = old_per_token_logps is None
        old_per_token_logps = per_token_logps.detach() if on_policy else old_per_token_logps

        own_metrics, clipped, phi = {}, None, None
        if self.loss_type in RLFUSE_LOSS_TYPES:
            old_vocab_mean = out.vocab_mean.detach() if on_policy and out.vocab_mean is not None else None
            per_token_loss, clipped, _ = rlfuse_token_loss(
                self.loss_type, per_token_logps, old_per_token_logps, advantages, mask, self.importance_sampling_level,
                out.vocab_mean, inputs.get("old_vocab_mean", old_vocab_mean), epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high)
            own_metrics = rlfuse_loss_metrics(self.loss_type, per_token_loss, clipped, per_token_logps,
                                              old_per_token_logps)
            # TRL's ratio, with grad: what use_bias_correction_kl multiplies the KL by, whichever the loss
            ratio = trl_importance_ratio(per_token_logps, old_per_token_logps, mask, self.importance_sampling_level)
        else:
            if self.loss_type == "vespo":
                args = self.args
                phi = vespo_weights(
                    advantages, per_token_logps - old_per_token_logps, mask, inputs.get("importance_sampling_ratio"),
                    args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg)
            per_token_loss, ratio = grpo_token_loss(
                per_token_logps, old_per_token_logps, advantages, mask, loss_type=self.loss_type,
                importance_sampling_level=self.importance_sampling_level, epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high, delta=self.args.delta,
                sapo_temperature_pos=self.args.sapo_temperature_pos,
                sapo_temperature_neg=self.args.sapo_temperature_neg, vespo_weights=phi)
        if self.off_policy_mask_threshold is not None:
            sampling_logps = inputs.get("sampling_per_token_logps", old_per_token_logps)
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages, per_token_logps, sampling_logps, mask, self.off_policy_mask_threshold)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            per_token_loss = per_token_loss * entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if self.beta != 0.0:
            per_token_kl = kl_penalty(per_token_logps, inputs["ref_per_token_logps"], "k3")
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        mode = "train" if self.model.training else "eval"
        loss, policy_loss = self._aggregate(per_token_loss, mask, inputs, mode)
        if self.entropy_bonus.enabled:
            loss = loss - self.entropy_bonus(entropies, mask if entropy_mask is None else mask * entropy_mask, mode,
                                             policy_loss)
        if aux_loss is not None:
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, mask, ratio, advantages, entropies, per_token_kl, own_metrics, clipped,
                               phi)
        return loss

    def _aggregate(self, per_token_loss, mask, inputs, mode):
        """``(loss, policy_loss)``: the loss as TRL's ``loss_type`` reduces it, scaled for gradient accumulation,
        and (detached) the value TRL logs as ``policy_loss``: before that scaling, except for the token-sum
        normalizers (dapo, cispo, vespo), whose normalizer already spans the accumulation window."""
        aggregation = trl_aggregation(self.loss_type)
        if aggregation in ("dapo", "cispo"):
            # num_items_in_batch spans the generation batch; rescale it to one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = (per_token_loss * mask).sum() / normalizer
            return loss, loss.detach()
        if aggregation == "grpo":
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif aggregation == "bnpo":
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        elif aggregation == "luspo":  # a sum over each sequence's tokens, then the mean over sequences
            loss = (per_token_loss * mask).sum(-1).mean()
        else:  # dr_grpo
            loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0), loss.detach()

    def _log_loss_metrics(self, mode, mask, ratio, advantages, entropies, per_token_kl, own_metrics=None,
                          clipped=None, phi=None) -> None:
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
        if self.loss_type == "gmpo":  # rlfuse's clipped log-ratios, split by the side TRL's GMPO trainer logs
            low, high = (clipped & (advantages < 0)).float(), (clipped & (advantages > 0)).float()
        elif self.loss_type in RLFUSE_LOSS_TYPES:  # no TRL ratio clip; each loss's own (B, T) metric instead
            for key, value in own_metrics.items():
                metrics[key].append(global_masked_mean(value))
            return
        elif self.loss_type == "cispo":
            clipped = (ratio > self.epsilon_high) & (advantages > 0)
            metrics["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        elif self.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            return
        elif self.loss_type == "sapo":  # a soft gate: no clip to report
            return
        else:
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

__all__ = ["LOSS_TYPES", "RLFUSE_LOSS_TYPES", "FusedGRPOTrainer", "GRPOTrainer", "add_rlfuse_head", "check_grpo_config",
           "grpo_token_loss", "head_reproduces_logits", "plain_lm_head", "rlfuse_token_loss"]

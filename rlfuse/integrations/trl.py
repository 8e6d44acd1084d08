"""TRL's ``GRPOTrainer`` on rlfuse's fused log-prob kernels: switching is a one-line import change.

``from rlfuse.integrations.trl import GRPOTrainer`` gives a subclass of ``trl.GRPOTrainer`` (TRL >= 1.16) that

- computes every per-token log-prob and entropy (policy, old policy, reference model) from the last hidden
  states and the LM head with :func:`rlfuse.kernels.linear_token_logprobs`, never materializing the
  (B, T, V) logits. Models whose logits are more than ``hidden @ lm_head.weight.T + bias`` (soft-capping,
  logit scaling) or whose head cannot be read as one plain weight (quantized, ZeRO-3 or FSDP-sharded) run
  their own forward for the completion logits and :func:`rlfuse.kernels.token_logprobs` instead;
- computes TRL 1.16's GRPO loss with the same math, normalizers and logged metric keys
  (:meth:`GRPOTrainer._compute_loss`);
- raises ``ValueError`` at construction for every TRL option it does not reproduce, instead of dropping it.

TRL is imported with this module only; ``import rlfuse`` never needs it.
"""

from __future__ import annotations

import functools
import types
from typing import Optional, Tuple

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from trl.trainer.utils import nanmax, nanmin

from rlfuse.algos.losses import kl_penalty, sequence_log_ratio
from rlfuse.kernels import IGNORE_INDEX, TokenLogprobs, linear_token_logprobs, token_logprobs

MIN_TRL_VERSION = "1.16.0"
if Version(trl.__version__) < Version(MIN_TRL_VERSION):
    raise ImportError(
        f"rlfuse.integrations.trl reproduces the GRPO loss of trl>={MIN_TRL_VERSION}, but trl {trl.__version__} "
        f"is installed; upgrade with: pip install 'trl>={MIN_TRL_VERSION}'"
    )

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
# Text-config fields that change the logits beyond hidden @ W.T (the same ones TRL's fused head reads).
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def check_grpo_config(args) -> None:
    """Raise ``ValueError`` naming the first ``trl.GRPOConfig`` option that :class:`GRPOTrainer` cannot honour.

    Unsupported: ``loss_type`` other than grpo, bnpo, dr_grpo, dapo and cispo; the entropy bonus
    (``entropy_coef != 0``, ``use_adaptive_entropy``); ``use_liger_kernel`` (a second kernel provider).
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


def plain_lm_head(model) -> bool:
    """True when ``model``'s config and head say its logits are ``hidden @ lm_head.weight.T + bias``.

    False for soft-capped or scaled logits, a head that is not a plain ``torch.nn.Linear`` (quantized or
    adapted), and weights sharded by DeepSpeed ZeRO-3 or FSDP2 (DTensor).
    """
    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        return False
    if any(getattr(config, name, None) not in (None, 1) for name in LOGIT_SCALES):
        return False
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or hasattr(head.weight, "ds_id"):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return True
    return not isinstance(head.weight, DTensor)


@torch.no_grad()
def head_reproduces_logits(model, rtol: float = 1e-2) -> bool:
    """Whether ``hidden @ lm_head.weight.T + bias`` gives the model's own logits on a 4-token probe.

    Catches logit transforms that no config field announces (a model that rescales its hidden states or
    logits in its own ``forward``). Runs the backbone and the full forward once, in eval mode.
    """
    head = model.get_output_embeddings()
    ids = torch.arange(4, device=head.weight.device).unsqueeze(0) % model.config.get_text_config().vocab_size
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        expected = torch.nn.functional.linear(hidden.to(head.weight), head.weight, head.bias).float()
    finally:
        model.train(training)
    return bool(torch.allclose(expected, logits, rtol=rtol, atol=rtol * float(logits.abs().max())))


def _scatter(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # masked_scatter keeps the result attached to the graph even when no position is kept.
    return values.new_zeros(keep.shape).masked_scatter(keep, values)


def _fused_head_logprobs(model, hidden, targets, temperature, cast_lm_head_to_fp32) -> TokenLogprobs:
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # what nn.Linear would compute in under autocast
    else:
        dtype = weight.dtype
    keep = targets != IGNORE_INDEX
    hidden = hidden.to(weight.device, dtype)[keep]  # only completion tokens reach the head
    with torch.autocast(device_type, enabled=False):
        out = linear_token_logprobs(hidden, weight.to(dtype), targets[keep], None if bias is None else bias.to(dtype),
                                    temperature, return_entropy=True)
    return TokenLogprobs(_scatter(out.logps, keep), _scatter(out.entropy, keep), None)


def add_rlfuse_head(model, cast_lm_head_to_fp32: bool = False, fused: Optional[bool] = None) -> None:
    """Patch ``model.forward`` so that ``model(..., rlfuse_targets=targets)`` returns per-token log-probs.

    ``targets`` (B, T) int64 are the next tokens of the last T positions (-100 skips one). The patched
    forward runs the backbone and :func:`rlfuse.kernels.linear_token_logprobs` when ``fused`` (default:
    :func:`plain_lm_head` and :func:`head_reproduces_logits` at patch time) and, at each call,
    :func:`plain_lm_head` hold; else the model's own forward on the last T + 1 positions and
    :func:`rlfuse.kernels.token_logprobs`. Running inside ``forward`` keeps DDP and FSDP hooks armed. It returns a
    :class:`rlfuse.kernels.TokenLogprobs` with ``logps`` and ``entropy`` (B, T) float32 (0 where skipped),
    and ``vocab_mean=None``. Without ``rlfuse_targets`` the forward is the original one.
    """
    if fused is None:
        fused = plain_lm_head(model) and head_reproduces_logits(model)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, rlfuse_targets=None, rlfuse_temperature=1.0, labels=None, **kwargs):
        if rlfuse_targets is None:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        num = rlfuse_targets.size(1)
        if fused and plain_lm_head(self):
            hidden = self.base_model(*args, **kwargs).last_hidden_state[:, -num - 1 : -1]
            return _fused_head_logprobs(self, hidden, rlfuse_targets, rlfuse_temperature, cast_lm_head_to_fp32)
        logits = original_forward(*args, logits_to_keep=num + 1, **kwargs).logits[:, :-1]
        out = token_logprobs(logits, rlfuse_targets.to(logits.device), rlfuse_temperature, return_entropy=True)
        return TokenLogprobs(out.logps, out.entropy, None)

    model.forward = types.MethodType(forward, model)


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
    the reference by disabling the adapter); ``cast_lm_head_to_fp32``.

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
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            targets = ids[:, -logits_to_keep:].masked_fill(attn[:, -logits_to_keep:] == 0, IGNORE_INDEX)
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=attn, rlfuse_targets=targets,
                            rlfuse_temperature=self.temperature)
            logps.append(out.logps)
            entropies.append(out.entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _compute_loss(self, model, inputs):
        """TRL 1.16's GRPO loss on log-probs from :meth:`_get_per_token_logps_and_entropies`.

        ``inputs`` as TRL's ``_generate_and_score_completions`` makes them: ``prompt_ids``/``prompt_mask``
        (B, P) int64, ``completion_ids``/``completion_mask`` (B, T) int64, ``advantages`` (B,) or (B, T)
        float32, optional ``old_per_token_logps``, ``ref_per_token_logps``, ``sampling_per_token_logps``
        (B, T) float32, ``importance_sampling_ratio`` (B, T) or (B, 1) float32, ``tool_mask`` (B, T) int64,
        and ``num_items_in_batch`` (scalar, completion tokens in the generation batch).

        Token losses from :func:`grpo_token_loss`, times the off-policy mask, the high-entropy mask and the
        vLLM importance ratio when enabled, plus beta·k3 KL; then reduced as TRL's ``loss_type`` does
        (grpo: mean over sequences of token means; bnpo: token mean; dr_grpo: sum / (B·max_completion_length);
        dapo, cispo: sum / tokens of the accumulated batch), scaled for gradient accumulation.

        Returns:
            The scalar float32 loss. Logs TRL's metrics under TRL's keys: ``entropy``, ``kl``,
            ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` or ``cispo_clip_ratio``.
        """
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True)
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

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
        self._log_loss_metrics(mode, mask, ratio, advantages, entropies, per_token_kl)
        return loss

    def _aggregate(self, per_token_loss, mask, inputs, mode) -> torch.Tensor:
        if self.loss_type in ("dapo", "cispo"):
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

    def _log_loss_metrics(self, mode, mask, ratio, advantages, entropies, per_token_kl) -> None:
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
           "plain_lm_head"]

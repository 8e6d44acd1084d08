"""rlfuse's log-prob head for Hugging Face causal LMs, as rlfuse's TRL trainer patches it into a model.

:func:`add_rlfuse_head` makes ``model(..., rlfuse_targets=targets)`` return per-token log-probs, entropies and,
on request, vocabulary means from the last hidden states and the LM head (:func:`rlfuse.kernels.linear_token_logprobs`),
or from the model's own logits where those are more than ``hidden @ W.T + bias``.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Optional, Tuple, Union

import torch

from rlfuse.kernels import IGNORE_INDEX, TokenLogprobs, linear_token_logprobs, token_logprobs

# Text-config fields that change the logits beyond hidden @ W.T (the same ones TRL's fused head reads).
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


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


def _fused_head_logprobs(model, hidden, targets, temperature, cast_lm_head_to_fp32, vocab_mean) -> TokenLogprobs:
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
                                    temperature, return_entropy=True, return_vocab_mean=vocab_mean)
    return TokenLogprobs(_scatter(out.logps, keep), _scatter(out.entropy, keep),
                         _scatter(out.vocab_mean, keep) if vocab_mean else None)


def router_aux_loss_func(model):
    """``f(router_logits, attention_mask)``: a Mixture-of-Experts model's load-balancing loss of its backbone's
    router logits (one per layer), by the model's own ``load_balancing_loss_func`` with its ``num_experts`` and
    ``num_experts_per_tok``, as its ``forward`` computes ``aux_loss`` ("Switch Transformers", eqs. 4-6). None when
    the model's module has no such function: the caller then runs the model's own forward."""
    loss_func = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None)
    if loss_func is None or experts is None or top_k is None:
        return None
    return lambda router_logits, attention_mask: loss_func(router_logits, experts, top_k, attention_mask)


def add_rlfuse_head(model, cast_lm_head_to_fp32: bool = False, fused: Optional[bool] = None) -> None:
    """Patch ``model.forward`` so that ``model(..., rlfuse_targets=targets)`` returns per-token log-probs.

    ``targets`` (B, T) int64 are the next tokens of the last T positions (-100 skips one). The patched
    forward runs the backbone and :func:`rlfuse.kernels.linear_token_logprobs` when ``fused`` (default:
    :func:`plain_lm_head` and :func:`head_reproduces_logits` at patch time) and, at each call,
    :func:`plain_lm_head` hold; else the model's own forward on the last T + 1 positions and
    :func:`rlfuse.kernels.token_logprobs`. Running inside ``forward`` keeps DDP and FSDP hooks armed. It returns a
    :class:`rlfuse.kernels.TokenLogprobs` with ``logps`` and ``entropy`` (B, T) float32 (0 where skipped),
    and ``vocab_mean``, mean_v log_softmax(logits / T)_v (B, T) float32, when called with
    ``rlfuse_vocab_mean=True`` (else None). With ``rlfuse_router_aux=True`` (a Mixture-of-Experts model) it
    returns ``(token_logprobs, aux_loss)``, the router's load-balancing loss (scalar) of the same forward:
    :func:`router_aux_loss_func` of the backbone's router logits, or the model's own ``aux_loss`` on the unfused path.
    Without ``rlfuse_targets`` the forward is the original one.
    """
    if fused is None:
        fused = plain_lm_head(model) and head_reproduces_logits(model)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, rlfuse_targets=None, rlfuse_temperature=1.0, rlfuse_vocab_mean=False,
                rlfuse_router_aux=False, labels=None,
                **kwargs) -> Union[TokenLogprobs, Tuple[TokenLogprobs, torch.Tensor]]:
        if rlfuse_targets is None:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if rlfuse_router_aux:
            kwargs["output_router_logits"] = True
        num = rlfuse_targets.size(1)
        aux_func = router_aux_loss_func(self) if rlfuse_router_aux else None
        if fused and plain_lm_head(self) and (aux_func is not None or not rlfuse_router_aux):
            outputs = self.base_model(*args, **kwargs)
            out = _fused_head_logprobs(self, outputs.last_hidden_state[:, -num - 1 : -1], rlfuse_targets,
                                       rlfuse_temperature, cast_lm_head_to_fp32, rlfuse_vocab_mean)
            if not rlfuse_router_aux:
                return out
            return out, aux_func(outputs.router_logits, kwargs.get("attention_mask"))
        outputs = original_forward(*args, logits_to_keep=num + 1, **kwargs)
        out = token_logprobs(outputs.logits[:, :-1], rlfuse_targets.to(outputs.logits.device), rlfuse_temperature,
                             return_entropy=True, return_vocab_mean=rlfuse_vocab_mean)
        return (out, outputs.aux_loss) if rlfuse_router_aux else out

    model.forward = types.MethodType(forward, model)

"""The training forward: log-probs of sampled completions under a model, through the engine's shared-prefix
decoder or transformers' padded forward, from logits or from hidden states and the LM head (fused linear)."""

from __future__ import annotations

from typing import Optional

import torch

from rlfuse.algos.fused_linear import masked_targets
from rlfuse.engine.decoder import DecoderLM
from rlfuse.engine.packing import shared_prefix_completion_hidden_states
from rlfuse.engine.rollout import RolloutBatch
from rlfuse.kernels import TokenLogprobs, linear_token_logprobs, token_logprobs


def _forward_inputs(batch: RolloutBatch):
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def completion_hidden_states(model, batch: RolloutBatch, decoder: Optional[DecoderLM] = None,
                             num_generations: int = 1, checkpoint: bool = False):
    """(hidden (B, T, H), lm_head weight (V, H), bias or None): the last hidden states that predict the T
    completion tokens, and the LM head, for the fused-linear loss.

    With ``decoder`` (a :class:`DecoderLM` over ``model``) they come from the shared-prefix packed forward
    (:mod:`rlfuse.engine.packing`; rows in groups of ``num_generations`` sharing a prompt, ``checkpoint``
    recomputes layers in the backward); without it, from transformers' padded forward of every row (a
    strided view, never copied).

    Raises:
        ValueError: a model whose logits are not a plain linear map of the hidden states (logit soft-capping
            or scaling); use ``--loss-impl logits`` for it. Rows of a group with different prompts.
    """
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the model applies {name} to its logits, which the fused-linear loss does not; "
                             "pass --loss-impl logits")
    head = model.get_output_embeddings()
    if decoder is not None:
        hidden = shared_prefix_completion_hidden_states(decoder, batch, num_generations, checkpoint)
    else:
        num_completion = batch.completion_ids.shape[1]
        hidden = model.get_decoder()(**_forward_inputs(batch)).last_hidden_state[:, -num_completion - 1:-1]
    return hidden, head.weight, head.bias


def completion_logprobs(model, batch: RolloutBatch, temperature: float, return_entropy: bool = False,
                        return_vocab_mean: bool = False, loss_impl: str = "logits",
                        decoder: Optional[DecoderLM] = None, num_generations: int = 1,
                        checkpoint: bool = False) -> TokenLogprobs:
    """:class:`TokenLogprobs` (B, T) float32 of ``batch.completion_ids`` under ``model`` at ``temperature``.

    ``loss_impl="logits"`` forms the logits of the T positions that predict completion tokens and runs
    :func:`rlfuse.kernels.token_logprobs`; ``"fused_linear"`` stops at the hidden states and uses
    :func:`rlfuse.kernels.linear_token_logprobs`, never materializing the logits. ``decoder``,
    ``num_generations`` and ``checkpoint`` choose the forward, as in :func:`completion_hidden_states`.
    """
    if loss_impl == "fused_linear":
        hidden, weight, bias = completion_hidden_states(model, batch, decoder, num_generations, checkpoint)
        out = linear_token_logprobs(hidden, weight, masked_targets(batch.completion_ids, batch.completion_mask),
                                    bias, temperature, return_entropy, return_vocab_mean)
    else:
        if decoder is not None:
            hidden = shared_prefix_completion_hidden_states(decoder, batch, num_generations, checkpoint)
            logits = decoder.logits(hidden)
        else:
            num_completion = batch.completion_ids.shape[1]
            logits = model(**_forward_inputs(batch), logits_to_keep=num_completion + 1).logits[:, :-1]
        out = token_logprobs(logits, batch.completion_ids, temperature, return_entropy, return_vocab_mean)
    return out if isinstance(out, TokenLogprobs) else TokenLogprobs(out, None, None)

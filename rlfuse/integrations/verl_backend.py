"""An ``rlfuse`` fused-kernel backend for verl's actor: log-probs, entropy and vocabulary means from rlfuse's kernel.

verl (0.9) replaces a causal LM's ``forward`` when ``actor_rollout_ref.model.use_fused_kernels=True``
(``verl.models.transformers.monkey_patch.patch_forward_with_backends``); the replacement returns
``CausalLMOutputForPPO(log_probs, entropy)`` computed from the last hidden states and ``lm_head.weight`` at
the actor's temperature, never returning the logits. With::

    actor_rollout_ref.model.external_lib=rlfuse.integrations.verl
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=rlfuse

:func:`install_backend` (run when the module is imported after verl) wraps verl's
``patch_forward_with_backends`` so that the backend name ``rlfuse`` is accepted and installs
:func:`forward_with_rlfuse_backend`, which calls :func:`rlfuse.kernels.linear_token_logprobs`. verl's files
are not edited; every other backend name goes to verl's own function unchanged.

Supported: the dense causal LMs verl patches through ``verl.models.transformers.dense_common``, named in
:data:`SUPPORTED_MODEL_TYPES` (SmolLM2 is ``llama``). The vision-language models verl patches through
their own modules (:data:`VLM_MODEL_TYPES`) raise ``ValueError``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

from rlfuse.kernels import linear_token_logprobs

BACKEND = "rlfuse"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe", "kimi_vl")


@dataclass
class CausalLMOutputForRLFuse(CausalLMOutputForPPO):
    """verl's ``CausalLMOutputForPPO`` plus ``vocab_mean``: mean_v log_softmax(logits / T)_v, shaped like
    ``log_probs`` (float32, nats), the V̄ of ROVER ("Random Policy Valuation is Enough for LLM Reasoning with
    Verifiable Rewards")."""

    vocab_mean: Optional[torch.FloatTensor] = None


def rolled_labels(input_ids=None, labels=None, shift_labels=None) -> torch.Tensor:
    """The next-token targets verl's fused forwards use: ``shift_labels`` as given, else ``labels`` or
    ``input_ids`` rolled left by one along the last dim (the wrapped-around last column is a target no loss
    reads). (B, T) or (1, total_nnz) int64.

    Raises:
        ValueError: none of the three given.
    """
    if shift_labels is not None:
        return shift_labels
    if labels is not None:
        return torch.roll(labels, shifts=-1, dims=-1)
    if input_ids is not None:
        return torch.roll(input_ids, shifts=-1, dims=-1)
    raise ValueError("the rlfuse backend needs shift_labels, labels or input_ids to know the next tokens")


def head_logprobs(hidden_states: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, temperature: float):
    """:func:`rlfuse.kernels.linear_token_logprobs` of ``hidden_states`` through ``lm_head`` at ``temperature``.

    Under autocast the head computes in the autocast dtype, as ``nn.Linear`` would; otherwise in the
    weight's dtype. Gradients reach ``hidden_states`` and ``lm_head.weight`` (the input embedding when tied).

    Args:
        hidden_states: (B, T, H) float, the last hidden states.
        lm_head: the output ``nn.Linear`` (V, H), bias optional.
        targets: (B, T) int64 next tokens.
        temperature: > 0, divides the logits.

    Returns:
        :class:`rlfuse.kernels.TokenLogprobs` with ``logps``, ``entropy`` and ``vocab_mean``, each (B, T) float32.
    """
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden_states.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return linear_token_logprobs(
            hidden_states.to(dtype), weight.to(dtype), targets.to(torch.int64),
            None if bias is None else bias.to(dtype), float(temperature),
            return_entropy=True, return_vocab_mean=True,
        )


def forward_with_rlfuse_backend(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
    logits_to_keep=0,
    temperature: float = 1.0,
    shift_labels=None,
    **loss_kwargs,
) -> CausalLMOutputForRLFuse:
    """verl's fused forward (the signature of ``dense_common.forward_with_torch_backend``) on rlfuse's kernel.

    Runs the decoder (verl's ``forward_base_model``), then :func:`head_logprobs` on every position against
    :func:`rolled_labels`. Returns :class:`CausalLMOutputForRLFuse` with ``log_probs``, ``entropy`` and
    ``vocab_mean`` shaped like the labels, float32; no logits.

    Raises:
        NotImplementedError: ``return_dict=False`` (verl always asks for a dict).
        ValueError: no labels can be derived (see :func:`rolled_labels`).
    """
    if not return_dict:
        raise NotImplementedError("the rlfuse backend returns a CausalLMOutputForRLFuse; call it with return_dict=True")
    outputs = forward_base_model(
        self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, cache_position=cache_position,
    )
    targets = rolled_labels(input_ids, labels, shift_labels)
    out = head_logprobs(outputs[0], self.lm_head, targets, temperature)
    return CausalLMOutputForRLFuse(
        log_probs=out.logps, entropy=out.entropy, vocab_mean=out.vocab_mean, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
    )


def patch_model_forward(model) -> None:
    """Install :func:`forward_with_rlfuse_backend` as ``type(model).forward``, as verl installs its backends.

    Raises:
        ValueError: ``model.config.model_type`` is a vision-language model verl patches through its own
            modules, or any other type not in :data:`SUPPORTED_MODEL_TYPES`.
    """
    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        kind = "vision-language model " if model_type in VLM_MODEL_TYPES else ""
        raise ValueError(
            f"fused_kernel_options.impl_backend=rlfuse does not support the {kind}model_type {model_type!r}; it "
            f"supports the dense causal LMs {', '.join(SUPPORTED_MODEL_TYPES)}. Use impl_backend=torch or triton "
            f"for this model."
        )
    model._verl_fused_kernels_backend = BACKEND
    type(model).forward = forward_with_rlfuse_backend
    print(f"Using rlfuse backend for fused kernels in {type(model).__name__}")


def install_backend() -> None:
    """Make verl's ``patch_forward_with_backends`` accept ``fused_kernels_backend="rlfuse"``.

    Wraps the function in ``verl.models.transformers.monkey_patch`` (where ``apply_monkey_patch`` looks it
    up); other backend names reach verl's own function with the same arguments. Idempotent.
    """
    from verl.models.transformers import monkey_patch

    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "rlfuse_original", None) is not None:
        return

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            return patch_model_forward(model)
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends.rlfuse_original = original
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends

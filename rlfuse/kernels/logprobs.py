"""Per-token log-probabilities, entropy and vocabulary mean from logits: the plain-PyTorch reference.

This is the CPU path and the oracle that every fused kernel of the same op is tested against.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from rlfuse.kernels.dispatch import use_triton

IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    """The outputs of :func:`token_logprobs` when any optional output is requested.

    Fields are float32 tensors shaped like the targets; a field not requested is ``None``.
    """

    logps: torch.Tensor
    entropy: Optional[torch.Tensor]
    vocab_mean: Optional[torch.Tensor]


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Validate the inputs of a log-prob op; raise ``TypeError``/``ValueError`` naming the argument.

    Checks that the logits are floating point, then :func:`check_targets` against the logits' leading
    shape, vocabulary size and device.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (..., V), got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension (..., V)")
    check_targets(targets, tuple(logits.shape[:-1]), logits.shape[-1], logits.device, temperature,
                  "slice logits as logits[:, :-1] to align them with the next tokens")


def check_targets(targets, leading_shape, vocab_size: int, device, temperature: float, hint: str = "") -> None:
    """Check targets' dtype (integer), shape (``leading_shape``), device, the temperature (finite, > 0) and
    that ids lie in ``[0, vocab_size)`` or equal ``ignore_index`` (-100). Raises ``TypeError``/``ValueError``.

    On a GPU the id check is one reduction over the ids and one host sync (tens of microseconds, against
    milliseconds for the op at training sizes): an id out of range would otherwise make the PyTorch paths
    fail a device-side assert, which leaves the process's CUDA context unusable. While a CUDA graph is being
    captured a sync is not allowed, so the check is skipped there and the Triton kernels return NaN
    log-probs for such ids (never reading out of bounds).
    """
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} must be {tuple(leading_shape)}; {hint}".rstrip("; "))
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but the inputs on {device}; move them to one device")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if targets.numel() and not (targets.is_cuda and torch.cuda.is_current_stream_capturing()):
        valid = targets != IGNORE_INDEX
        outside = ((targets < 0) | (targets >= vocab_size)) & valid
        if bool(outside.any()):
            raise ValueError(
                f"targets hold token id {targets[outside][0].item()}, outside the vocabulary [0, {vocab_size}); "
                f"use {IGNORE_INDEX} for positions to skip"
            )


def token_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_vocab_mean: bool = False,
):
    """log_softmax(logits / temperature) at the targets, in float32, with optional entropy and vocab mean.

    Args:
        logits: (..., V) float32, bf16 or fp16; non-contiguous views such as ``logits[:, :-1]`` are fine.
        targets: (...) int64 token ids in ``[0, V)``, or -100 (``ignore_index``) for positions to skip.
        temperature: divides the logits before the softmax (sampling temperature), > 0.
        return_entropy: also return H = -sum_v p_v log p_v, in nats.
        return_vocab_mean: also return mean_v log_softmax(logits / temperature)_v, the value estimate
            that ROVER (Random Policy Valuation) uses.

    Returns:
        ``logps`` (...) float32 when no optional output is requested; otherwise a :class:`TokenLogprobs`
        whose unrequested fields are ``None``. Ignored positions give 0 in every output and no gradient.

    Raises:
        TypeError: logits not floating point, or targets not integer.
        ValueError: shapes or devices that do not match, temperature <= 0, token ids out of range (on every
            device; inside CUDA-graph capture, where no host sync is allowed, the Triton path gives NaN).
    """
    check_logits_targets(logits, targets, temperature)
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    logps = log_probs.gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    logps = torch.where(keep, logps, 0.0)
    if not (return_entropy or return_vocab_mean):
        return logps
    entropy = vocab_mean = None
    if return_entropy:
        probs = log_probs.exp()
        # p·log p is 0 where p is 0 (logits of -inf); zeroing log p first keeps the gradient finite too.
        plogp = probs * torch.where(probs > 0, log_probs, 0.0)
        entropy = torch.where(keep, -plogp.sum(-1), 0.0)
    if return_vocab_mean:
        vocab_mean = torch.where(keep, log_probs.mean(-1), 0.0)
    return TokenLogprobs(logps, entropy, vocab_mean)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_vocab_mean: bool = False,
    inplace_backward: bool = False,
):
    """Per-token log-probs of the targets under softmax(logits / temperature), fused.

    Same contract as :func:`token_logprobs_reference`: logits (..., V) float32/bf16/fp16, also strided
    views such as ``logits[:, :-1]``; targets (...) int64 (-100 skipped); outputs (...) float32. On CUDA
    tensors (or with ``RLFUSE_BACKEND=triton``) one Triton pass over the logits computes all three outputs
    with an online softmax, and the backward writes d(logits) in one more pass for any mix of their
    gradients. ``inplace_backward=True`` writes d(logits) into the logits' own storage (the logits must not
    be needed afterwards); the torch path ignores it. Under ``torch.no_grad()``, or for logits that need no
    gradient, only the outputs asked for are computed and nothing is kept for a backward.

    Raises:
        TypeError, ValueError: as :func:`token_logprobs_reference`, and for a bad ``RLFUSE_BACKEND``.
    """
    if not use_triton(logits):
        return token_logprobs_reference(logits, targets, temperature, return_entropy, return_vocab_mean)
    check_logits_targets(logits, targets, temperature)
    from rlfuse.kernels.logprobs_triton import token_logprobs_triton

    logps, entropy, vocab_mean = token_logprobs_triton(logits, targets, float(temperature), return_entropy,
                                                       return_vocab_mean, inplace_backward)
    if not (return_entropy or return_vocab_mean):
        return logps
    return TokenLogprobs(logps, entropy if return_entropy else None, vocab_mean if return_vocab_mean else None)

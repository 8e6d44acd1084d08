"""Per-token log-probs, entropy and vocabulary mean straight from hidden states and the LM head.

logits = hidden_states @ lm_head_weight.T (+ bias) is never materialized as a whole (N, V) tensor:
- on CUDA (or ``RLFUSE_BACKEND=triton``), as ``launch.linear_implementation`` picks: per vocabulary chunk a
  cuBLAS GEMM forms fp32 logits that Triton row kernels reduce (``linear_hybrid``, the default), or Triton
  kernels tile tokens x vocabulary and keep each tile's logits on chip (``linear_logprobs_triton``);
- otherwise a chunked PyTorch path walks ``chunk_size`` tokens at a time (memory O(chunk_size x V)).
All store only O(N) statistics and recompute the logits in the backward, which forms d(hidden),
d(weight) and d(bias) for any mix of the three outputs' gradients. Under ``torch.no_grad()`` the GPU paths
save nothing for a backward.

The materialized reference :func:`linear_token_logprobs_reference` is the tests' first oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlfuse.kernels.dispatch import use_triton
from rlfuse.kernels.logprobs import IGNORE_INDEX, TokenLogprobs, check_targets, token_logprobs_reference

CHUNK_ELEMENTS = 1 << 23  # logits per chunk on the PyTorch path: 32 MiB of fp32 per temporary


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk's fp32 logits hold at most :data:`CHUNK_ELEMENTS` values."""
    return max(1, min(4096, CHUNK_ELEMENTS // max(vocab_size, 1)))


def check_linear_inputs(hidden_states, weight, targets, bias, temperature) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for inputs that do not fit together."""
    for name, tensor in (("hidden_states", hidden_states), ("lm_head_weight", weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    if weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden_states.dim() not in (2, 3) or hidden_states.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden_states must be (N, H) or (B, T, H) with H = lm_head_weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden_states.shape)}"
        )
    if hidden_states.dtype != weight.dtype:
        raise TypeError(f"hidden_states ({hidden_states.dtype}) and lm_head_weight ({weight.dtype}) must share a dtype")
    if weight.device != hidden_states.device:
        raise ValueError(f"lm_head_weight is on {weight.device} but hidden_states on {hidden_states.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != weight.device):
        raise ValueError(f"bias must be ({weight.shape[0]},) on {weight.device}, got {tuple(bias.shape)} on {bias.device}")
    check_targets(targets, tuple(hidden_states.shape[:-1]), weight.shape[0], hidden_states.device, temperature)


def linear_token_logprobs_reference(hidden_states, lm_head_weight, targets, bias=None, temperature=1.0,
                                    return_entropy=False, return_vocab_mean=False):
    """The materialized reference: :func:`token_logprobs_reference` of ``hidden_states @ W.T + bias``."""
    logits = torch.nn.functional.linear(hidden_states, lm_head_weight, bias)
    return token_logprobs_reference(logits, targets, temperature, return_entropy, return_vocab_mean)


def _chunk_logits(h, weight32, bias32, temperature):
    # fp32 logits, as the Triton kernels accumulate them: bf16 logits would lose about 3 significant digits.
    return torch.nn.functional.linear(h.float(), weight32, bias32) / temperature


def _fp32(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.float()


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    """PyTorch path: ``apply(hidden (N, H), weight, bias, targets (N,), temperature, chunk_size)``.

    Returns (logps, entropy, vocab_mean), each (N,) float32. Saves the inputs and the kept rows; the backward recomputes
    each chunk's logits. Only the rows whose target is not ``IGNORE_INDEX`` are computed (the others are 0
    and get no gradient), so padding costs no matmul. Autocast is off inside: the logits are fp32 whatever
    the caller's autocast state, as the Triton kernels accumulate them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        with torch.autocast(hidden.device.type, enabled=False):
            return ChunkedLinearLogprobsFunction._forward(ctx, hidden, weight, bias, targets, temperature, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, temperature, chunk_size):
        outs = [torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32) for _ in range(3)]
        weight32, bias32 = _fp32(weight), _fp32(bias)
        kept = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # padding forms no logits
        for rows in kept.split(chunk_size):
            logits = _chunk_logits(hidden.index_select(0, rows), weight32, bias32, temperature)
            chunk = token_logprobs_reference(logits, targets.index_select(0, rows), 1.0, True, True)
            for out, value in zip(outs, chunk):
                out[rows] = value
        ctx.save_for_backward(hidden, weight, bias, targets, kept)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_vmean):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return ChunkedLinearLogprobsFunction._backward(ctx, g_logp, g_entropy, g_vmean)

    @staticmethod
    def _backward(ctx, g_logp, g_entropy, g_vmean):
        hidden, weight, bias, targets, kept = ctx.saved_tensors
        vocab = weight.shape[0]
        d_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        d_weight = torch.zeros_like(weight, dtype=torch.float32)
        d_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if bias is not None else None
        weight32, bias32 = _fp32(weight), _fp32(bias)
        for rows in kept.split(ctx.chunk_size):
            h = hidden.index_select(0, rows).float()
            log_probs = torch.log_softmax(_chunk_logits(h, weight32, bias32, ctx.temperature), dim=-1)
            probs = log_probs.exp()
            dz = torch.zeros_like(log_probs)
            if g_logp is not None:
                g = g_logp.index_select(0, rows).unsqueeze(-1)
                dz -= g * probs
                dz.scatter_add_(-1, targets.index_select(0, rows).unsqueeze(-1), g)
            if g_entropy is not None:
                g = g_entropy.index_select(0, rows).unsqueeze(-1)
                plogp = probs * torch.where(probs > 0, log_probs, 0.0)
                entropy = -plogp.sum(-1, keepdim=True)
                dz -= g * (plogp + probs * entropy)
            if g_vmean is not None:
                g = g_vmean.index_select(0, rows).unsqueeze(-1)
                dz += g * (1.0 / vocab - probs)
            dz /= ctx.temperature
            d_hidden[rows] = dz @ weight32
            d_weight += dz.T @ h
            if d_bias is not None:
                d_bias += dz.sum(0)
        return (d_hidden.to(hidden.dtype), d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None)


def _triton_path(hidden_states, weight, bias, targets, temperature):
    """The GPU path the launch table picks (``launch.linear_implementation``): ``hybrid`` (cuBLAS GEMMs per
    vocabulary chunk with Triton row kernels) or ``fused`` (Triton kernels that multiply on chip)."""
    from rlfuse.kernels import launch

    if launch.linear_implementation(launch.target_of(hidden_states.device)) == "fused":
        from rlfuse.kernels.linear_logprobs_triton import linear_logprobs_fused

        return linear_logprobs_fused(hidden_states, weight, bias, targets, temperature)
    from rlfuse.kernels.linear_hybrid import linear_logprobs_hybrid

    return linear_logprobs_hybrid(hidden_states, weight, bias, targets, temperature)


def linear_token_logprobs(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_vocab_mean: bool = False,
    chunk_size: Optional[int] = None,
):
    """log_softmax((hidden_states @ lm_head_weight.T + bias) / temperature) at the targets, never materialized.

    Args:
        hidden_states: (N, H) or (B, T, H) bf16/fp16/fp32, strided slices allowed (e.g. ``h[:, P-1:-1]``).
        lm_head_weight: (V, H), the same dtype; may be the tied input embedding (both uses get gradients).
        targets: (N,) or (B, T) int64 token ids; -100 skips a position (outputs 0, no gradient).
        bias: optional (V,).
        temperature: divides the logits, > 0.
        return_entropy, return_vocab_mean: also return the entropy (nats) and mean_v log p_v.
        chunk_size: tokens per chunk on the PyTorch path (its extra memory is O(chunk_size x V) floats);
            default :func:`default_chunk_size`.

    Returns:
        ``logps`` shaped like ``targets``, float32, when no optional output is requested; otherwise a
        :class:`TokenLogprobs` with ``None`` for unrequested fields. Gradients reach hidden states, weight
        and bias (accumulated in fp32).

    Raises:
        TypeError: non-float hidden states or weight, or differing dtypes.
        ValueError: shapes or devices that do not fit, temperature <= 0, token ids out of range (on every
            device; inside CUDA-graph capture, where no host sync is allowed, such ids give NaN instead).
    """
    check_linear_inputs(hidden_states, lm_head_weight, targets, bias, temperature)
    hidden_2d = hidden_states.reshape(-1, hidden_states.shape[-1]) if hidden_states.dim() == 3 else hidden_states
    flat_targets = targets.reshape(-1)
    if use_triton(hidden_states):
        outs = _triton_path(hidden_states, lm_head_weight, bias, flat_targets, float(temperature))
    else:
        outs = ChunkedLinearLogprobsFunction.apply(hidden_2d, lm_head_weight, bias, flat_targets,
                                                   float(temperature),
                                                   int(chunk_size or default_chunk_size(lm_head_weight.shape[0])))
    logps, entropy, vocab_mean = (out.view(targets.shape) for out in outs)
    if not (return_entropy or return_vocab_mean):
        return logps
    return TokenLogprobs(logps, entropy if return_entropy else None, vocab_mean if return_vocab_mean else None)

"""A loss of per-token log-probs computed straight from logits, with d(logits) formed in the forward.

The path for losses that couple tokens (sequence ratios, ROVER's next-state values); token-local losses
take the single kernel of ``token_loss_triton`` instead. Two kernels, three passes over the (N, V) data:
1. the Triton stats kernel: log-prob, entropy, vocabulary mean and log-sum-exp per token (O(N) outputs);
2. the caller's ``loss_fn`` on those (B, T) tensors, differentiated by autograd (cheap: no V dimension);
   this is where sequence-level pieces (a sequence ratio, a next-state value, seq-mean aggregation) live;
3. the Triton backward kernel: reads the logits again and writes d(loss)/d(logits) from the per-token
   gradients, once (into the logits themselves with ``inplace_backward``).
The autograd backward only scales that stored gradient by the incoming gradient.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from rlfuse.kernels.logprobs_triton import logprobs_backward, logprobs_forward

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


class LogprobLossFunction(torch.autograd.Function):
    """``apply(logits, targets, temperature, inplace_backward, loss_fn, aux) -> loss``; metrics land in ``aux``.
    Used only when the logits need a gradient."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, inplace_backward, loss_fn, aux):
        logps, entropy, vmean, stats, view = logprobs_forward(logits, targets, temperature)
        shape = targets.shape
        with torch.enable_grad():
            logps_leaf = logps.view(shape).detach().requires_grad_(True)
            vmean_leaf = vmean.view(shape).detach().requires_grad_(True)
            loss, metrics = loss_fn(logps_leaf, vmean_leaf, entropy.view(shape))
            g_logp, g_vmean = torch.autograd.grad(loss, (logps_leaf, vmean_leaf), allow_unused=True)
        aux.update({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()})
        dlogits = view if inplace_backward else torch.empty_like(view)
        logprobs_backward(view, targets, stats, entropy, g_logp, None, g_vmean, temperature, dlogits)
        ctx.save_for_backward(dlogits)
        ctx.shape = logits.shape
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogits,) = ctx.saved_tensors
        # The usual upstream gradient is exactly 1 (loss.backward()): skip the extra pass over (N, V) then.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dlogits.mul_(grad_loss.to(dlogits.dtype))
        return dlogits.reshape(ctx.shape), None, None, None, None, None


def fused_logprob_loss(
    logits: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, temperature: float = 1.0,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``loss_fn(logps, vocab_mean, entropy)`` of the targets' log-probs under softmax(logits / temperature).

    Args:
        logits: (..., V) float32/bf16/fp16, strided views allowed; the Triton kernels read it.
        targets: (...) int64 token ids, -100 to skip.
        loss_fn: maps three (...) float32 tensors (log-probs and vocabulary means carry gradient; entropy
            does not) to ``(scalar loss, metrics dict)``.
        temperature: divides the logits before the softmax.
        inplace_backward: write d(logits) into the logits' storage (they must not be needed afterwards).

    Returns:
        ``(loss, metrics)``: the scalar float32 loss, differentiable w.r.t. ``logits``, and ``loss_fn``'s
        metrics, detached. Under ``torch.no_grad()``, or for logits that need no gradient, only the
        statistics kernel runs (one pass) and nothing is saved.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):  # one pass, no d(logits), nothing saved
        logps, entropy, vmean, _, _ = logprobs_forward(logits, targets, float(temperature))
        shape = targets.shape
        loss, metrics = loss_fn(logps.view(shape), vmean.view(shape), entropy.view(shape))
        return loss.detach(), {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    aux: Dict[str, torch.Tensor] = {}
    loss = LogprobLossFunction.apply(logits, targets, float(temperature), inplace_backward, loss_fn, aux)
    return loss, aux

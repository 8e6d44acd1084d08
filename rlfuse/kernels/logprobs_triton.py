"""Triton kernels for per-token log-probs, entropy and vocabulary mean from logits, forward and backward.

Forward: one program per row reads the row's logits once, with an online softmax over vocabulary
blocks (running max m, sum of exponentials s, and the exponential-weighted sum of logits for the
entropy), then writes five floats: log-prob, entropy, vocab mean, and m and log s for the backward.
Backward: one more read of the row, one write of d(logits), for any mix of the three outputs' gradients.

Math, with z = logits / T, lse = logsumexp(z), p = softmax(z), H the entropy, V the vocabulary size:
    logp = z_y - lse,  H = lse - sum_v p_v z_v,  vmean = mean_v z_v - lse
    dlogp/dz_v = [v = y] - p_v,  dH/dz_v = -p_v (log p_v + H),  dvmean/dz_v = 1/V - p_v
The entropy is computed relative to the running max m, as H = log s - sum_v e_v (z_v - m) / s with
e_v = exp(z_v - m) and s = sum_v e_v: both terms are >= 0, so nothing cancels. Written as lse - sum_v p_v z_v
it would lose about ulp(max |z|) (1e-3 at logits near 1e4) to the subtraction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch

IGNORE_INDEX = -100


@triton.jit
def _row_stats(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    """Online softmax over one row: returns (m, log s, entropy, sum_v x_v) in float32, with m the max of the raw
    logits x (0 when all are -inf) and s = sum_v exp((x_v - m) / T), so lse = m / T + log s.

    The running max m is taken over the raw logits x, and every exponent is formed as (x - m) / T: the
    subtraction of nearby float32 values is exact, so the temperature scales a small number, where
    x / T - m / T would round each term at the logits' magnitude (ulp(1e3) ~ 1e-4). t accumulates
    sum_v e_v (z_v - z_max); when m grows, the terms already summed shift by d = (m_old - m_new) / T:
    t <- alpha (t + d s), as s <- alpha s.
    """
    m = float("-inf")
    s = 0.0
    t = 0.0
    xsum = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit seen is -inf, shift by 0 instead of -inf so that no -inf - -inf = NaN appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(m == float("-inf"), 0.0, (m - m_safe) * inv_temp)  # 0 while s = 0
        alpha = tl.exp((m - m_safe) * inv_temp)
        d = (x - m_safe) * inv_temp
        e = tl.exp(d)
        t = (t + shift * s) * alpha + tl.sum(e * tl.where(e > 0, d, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        xsum += tl.sum(tl.where(valid, x, 0.0), 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    return m_safe, log_s, log_s - t / s, xsum


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, targets_ptr,
    logps_ptr, entropy_ptr, vmean_ptr, max_ptr, logs_ptr,
    V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    target = tl.load(targets_ptr + row)
    m, log_s, entropy, xsum = _row_stats(row_ptr, V, inv_temp, BLOCK_V)
    keep = target != ignore_index
    # Ids outside [0, V) were rejected on the host, except during CUDA-graph capture: there they give NaN.
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(row_ptr + tl.where(keep & in_range, target, 0)).to(tl.float32)
    # log p = (x - m) / T - log s: no term of the logits' magnitude is rounded (unlike x / T - lse).
    logp = tl.where(in_range, (x_target - m) * inv_temp - log_s, float("nan"))
    tl.store(logps_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(keep, entropy, 0.0))
    tl.store(vmean_ptr + row, tl.where(keep, (xsum / V - m) * inv_temp - log_s, 0.0))
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_b, stride_t, T, dlogits_ptr, dstride_b, dstride_t, targets_ptr,
    max_ptr, logs_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, g_vmean_ptr,
    V, inv_temp, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    drow_ptr = dlogits_ptr + (row // T) * dstride_b + (row % T) * dstride_t
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    m = tl.load(max_ptr + row)
    log_s = tl.load(logs_ptr + row)
    g_logp = 0.0
    g_entropy = 0.0
    g_vmean = 0.0
    if HAS_G_LOGP:
        g_logp = tl.where(keep, tl.load(g_logp_ptr + row), 0.0)
    if HAS_G_ENTROPY:
        g_entropy = tl.where(keep, tl.load(g_entropy_ptr + row), 0.0)
        entropy = tl.load(entropy_ptr + row)
    if HAS_G_VMEAN:
        g_vmean = tl.where(keep, tl.load(g_vmean_ptr + row), 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        logp = (x - m) * inv_temp - log_s
        p = tl.exp(logp)
        d = tl.where(offs == target, g_logp, 0.0) - (g_logp + g_vmean) * p + g_vmean / V
        if HAS_G_ENTROPY:
            d -= g_entropy * p * (tl.where(p > 0, logp, 0.0) + entropy)
        tl.store(drow_ptr + offs, (d * inv_temp).to(dlogits_ptr.dtype.element_ty), mask=valid)


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """A (B, T, V) view of (..., V) logits with unit stride over V (copying only when no view exists)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        return logits.view(1, 1, -1)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Launch the forward kernel. Returns (logps, entropy, vmean) float32 (N,), the row statistics the backward
    needs (a (2, N) float32 tensor: each row's max logit and log s, with lse = max / T + log s) and the
    (B, T, V) view used."""
    view = _as_3d(logits)
    batch, seq, vocab = view.shape
    n_rows = batch * seq
    flat_targets = targets.reshape(-1).contiguous()
    outs = [torch.empty(n_rows, device=logits.device, dtype=torch.float32) for _ in range(3)]
    stats = torch.empty(2, n_rows, device=logits.device, dtype=torch.float32)
    cfg = launch.row_config(launch.capability_of(logits.device), vocab)
    _logprobs_fwd_kernel[(n_rows,)](
        view, view.stride(0), view.stride(1), seq, flat_targets, *outs, stats[0], stats[1],
        vocab, 1.0 / temperature, IGNORE_INDEX, **cfg.launch_kwargs(),
    )
    return (*outs, stats, view)


def logprobs_backward(view, targets, stats, entropy, g_logp, g_entropy, g_vmean, temperature, dlogits):
    """Launch the backward kernel: write d(logits) for the given per-row output gradients into ``dlogits``.

    ``view`` is the (B, T, V) logits view from :func:`logprobs_forward`; ``dlogits`` (B, T, V) may be ``view``
    itself (in-place backward); ``stats`` the (2, N) row statistics from there. Gradients are (N,) float32
    tensors or None.
    """
    batch, seq, vocab = view.shape
    dummy = entropy
    _logprobs_bwd_kernel[(batch * seq,)](
        view, view.stride(0), view.stride(1), seq, dlogits, dlogits.stride(0), dlogits.stride(1),
        targets.reshape(-1).contiguous(), stats[0], stats[1], entropy,
        dummy if g_logp is None else g_logp.reshape(-1).float().contiguous(),
        dummy if g_entropy is None else g_entropy.reshape(-1).float().contiguous(),
        dummy if g_vmean is None else g_vmean.reshape(-1).float().contiguous(),
        vocab, 1.0 / temperature, IGNORE_INDEX,
        HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None, HAS_G_VMEAN=g_vmean is not None,
        **launch.row_config(launch.capability_of(view.device), vocab).launch_kwargs(),
    )
    return dlogits


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(logits, targets, temperature, inplace_backward) -> (logps, entropy, vmean)``."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, inplace_backward):
        logps, entropy, vmean, stats, view = logprobs_forward(logits, targets, temperature)
        ctx.save_for_backward(view, targets, stats, entropy)
        ctx.temperature, ctx.inplace_backward, ctx.shape = temperature, inplace_backward, logits.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its kernel branch is skipped
        shape = targets.shape
        return logps.view(shape), entropy.view(shape), vmean.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_vmean):
        view, targets, stats, entropy = ctx.saved_tensors
        dlogits = view if ctx.inplace_backward else torch.empty_like(view)
        logprobs_backward(view, targets, stats, entropy, g_logp, g_entropy, g_vmean, ctx.temperature, dlogits)
        return dlogits.reshape(ctx.shape), None, None, None


def compile_specs(capability: int, dtype: torch.dtype, n_rows: int, hidden: int, vocab: int):
    """The launches the wrappers make for (N, V) logits of ``dtype``, for ``bench.compiled`` (the backward
    with every gradient flag on)."""
    ptr, f32, i32 = launch.pointer(dtype), "*fp32", "i32"
    cfg = launch.row_config(capability, vocab)
    fwd = {"logits_ptr": ptr, "stride_b": i32, "stride_t": i32, "T": i32, "targets_ptr": "*i64", "logps_ptr": f32,
           "entropy_ptr": f32, "vmean_ptr": f32, "max_ptr": f32, "logs_ptr": f32, "V": i32, "inv_temp": "fp32",
           "ignore_index": i32}
    bwd = {"logits_ptr": ptr, "stride_b": i32, "stride_t": i32, "T": i32, "dlogits_ptr": ptr, "dstride_b": i32,
           "dstride_t": i32, "targets_ptr": "*i64", "max_ptr": f32, "logs_ptr": f32, "entropy_ptr": f32,
           "g_logp_ptr": f32,
           "g_entropy_ptr": f32, "g_vmean_ptr": f32, "V": i32, "inv_temp": "fp32", "ignore_index": i32}
    flags = {"HAS_G_LOGP": True, "HAS_G_ENTROPY": True, "HAS_G_VMEAN": True}
    return [
        launch.KernelSpec(_logprobs_fwd_kernel, launch.signature_of(_logprobs_fwd_kernel, fwd), dict(cfg.constexprs), cfg),
        launch.KernelSpec(_logprobs_bwd_kernel, launch.signature_of(_logprobs_bwd_kernel, bwd),
                          {**flags, **cfg.constexprs}, cfg),
    ]

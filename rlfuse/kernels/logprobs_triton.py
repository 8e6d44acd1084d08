"""Triton kernels for per-token log-probs, entropy and vocabulary mean from logits, forward and backward.

Forward: each program takes ROWS rows and reads their logits once, with an online softmax over
vocabulary tiles, then writes three floats per row (log-prob, entropy, vocab mean) and two statistics for
the backward (the max logit m and log s). Backward: one more read of the rows, one write of d(logits), for
any mix of the three outputs' gradients. Under ``torch.no_grad()`` (or for logits that need no gradient)
only the forward runs and nothing is kept for a backward.

Streaming at the memory roofline: within a tile only the running maximum is reduced across the program's
threads. The other sums of the online softmax (sum of exponentials, the entropy's sum, the sum of logits)
stay per lane, rescaled by the row's alpha, and are reduced once per row. The next tile's load is issued
before the current tile is used, so two tiles per program are in flight. Exponents are in base 2
(``ex2`` is the hardware instruction; the temperature and log2(e) fold into one scale).

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
def _softmax_tile(m, s, t, x, scale, WANT_ENTROPY: tl.constexpr):
    """Merge a (ROWS, BLOCK_V) tile of logits x (-inf where masked) into the running max m (ROWS,) of x and
    the per-lane sums s = sum 2^d and t = sum 2^d d, d = (x - m)·scale; returns the new (m, s, t).

    When the max grows by (m_old - m_new)·scale = shift, every lane's terms shift alike:
    t <- 2^shift (t + shift s), s <- 2^shift s. While every logit seen is -inf, the max is taken as 0, so
    that no -inf - -inf = NaN appears (s is 0 then, and stays 0 whatever the shift).
    """
    m_new = tl.maximum(m, tl.max(x, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m == float("-inf"), 0.0, (m - m_safe) * scale)
    alpha = tl.exp2(shift)[:, None]
    d = (x - m_safe[:, None]) * scale
    e = tl.exp2(d)
    if WANT_ENTROPY:
        t = (t + shift[:, None] * s) * alpha + e * tl.where(e > 0, d, 0.0)
    return m_new, s * alpha + e, t


@triton.jit
def _rows_sums(row_ptrs, row_valid, V, inv_temp, b_ptr, WANT_ENTROPY: tl.constexpr, WANT_SUM: tl.constexpr,
               HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online softmax over ROWS rows of V logits x each (plus ``b_ptr``'s V biases with HAS_BIAS): returns
    (m, s, t, sum_v x_v), each (ROWS,) float32, with m the max of x (-inf when all are -inf),
    s = sum_v exp((x_v - m) / T) and t = sum_v exp((x_v - m) / T) (x_v - m) / T. Without WANT_ENTROPY t is 0;
    without WANT_SUM the sum is 0.

    The running max is taken over x, and every exponent is formed as (x - m)·c with c = log2(e) / T: the
    subtraction of nearby float32 values is exact, so the temperature scales a small number. s and t stay
    per lane (``_softmax_tile``) and are reduced once per row; the next tile's load goes out before this one
    is used.
    """
    scale = inv_temp * 1.4426950408889634
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    s = tl.zeros((ROWS, BLOCK_V), tl.float32)
    t = tl.zeros((ROWS, BLOCK_V), tl.float32)
    xsum = tl.zeros((ROWS, BLOCK_V), tl.float32)
    x_next = tl.load(row_ptrs[:, None] + offs[None, :], mask=row_valid[:, None] & (offs < V)[None, :],
                     other=float("-inf"))
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = x_next.to(tl.float32)
        ahead = cols + BLOCK_V
        x_next = tl.load(row_ptrs[:, None] + ahead[None, :], mask=row_valid[:, None] & (ahead < V)[None, :],
                         other=float("-inf"))
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
        m, s, t = _softmax_tile(m, s, t, x, scale, WANT_ENTROPY)
        if WANT_SUM:
            xsum += tl.where((cols < V)[None, :], x, 0.0)
    return m, tl.sum(s, 1), tl.sum(t, 1) * 0.6931471805599453, tl.sum(xsum, 1)


@triton.jit
def _rows_stats(row_ptrs, row_valid, V, inv_temp, WANT_ENTROPY: tl.constexpr, WANT_SUM: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """:func:`_rows_sums` of raw logits, finished: (m, log s, entropy, sum_v x_v), each (ROWS,) float32, with
    m the max of x (0 when all are -inf), so lse = m / T + log s. The entropy is log s - t / s: both terms
    are >= 0, so nothing cancels (module docstring). Without WANT_ENTROPY it is 0."""
    m, s, t, xsum = _rows_sums(row_ptrs, row_valid, V, inv_temp, row_ptrs, WANT_ENTROPY, WANT_SUM, False, ROWS,
                               BLOCK_V)
    s = tl.where(row_valid, s, 1.0)  # rows past N: no log(0)
    log_s = tl.log(s)
    entropy = tl.zeros((ROWS,), tl.float32)
    if WANT_ENTROPY:
        entropy = log_s - t / s
    return tl.where(m == float("-inf"), 0.0, m), log_s, entropy, xsum


@triton.jit
def _target_logps(row_ptrs, row_valid, targets, m, log_s, inv_temp, V, ignore_index):
    """Each row's log-prob of its target, (x_y - m) / T - log s (no term of the logits' magnitude is rounded,
    unlike x / T - lse), 0 where the target is ``ignore_index``; returns (keep, logp), each (ROWS,). Ids
    outside [0, V) are rejected on the host, except during CUDA-graph capture: there they give NaN."""
    keep = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    x_target = tl.load(row_ptrs + tl.where(keep & in_range, targets, 0), mask=row_valid & keep & in_range,
                       other=0.0).to(tl.float32)
    logp = tl.where(in_range, (x_target - m) * inv_temp - log_s, float("nan"))
    return keep, tl.where(keep, logp, 0.0)


@triton.jit
def _rows_dlogits(row_ptrs, drow_ptrs, row_valid, targets, m, log_s, entropy, g_logp, g_entropy, g_vmean, V,
                  inv_temp, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """Sweep ROWS rows once more and write d(logits) for per-row gradients of the log-prob, entropy and vocab
    mean (each (ROWS,); see the module docstring's math). A row with no gradient writes exact zeros, even
    when all its logits are -inf."""
    active = g_logp != 0.0
    if HAS_G_ENTROPY:
        active = active | (g_entropy != 0.0)
    if HAS_G_VMEAN:
        active = active | (g_vmean != 0.0)
    m = m[:, None]
    log_s = log_s[:, None]
    offs = tl.arange(0, BLOCK_V)
    x_next = tl.load(row_ptrs[:, None] + offs[None, :], mask=row_valid[:, None] & (offs < V)[None, :],
                     other=float("-inf"))
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = x_next.to(tl.float32)
        ahead = cols + BLOCK_V
        x_next = tl.load(row_ptrs[:, None] + ahead[None, :], mask=row_valid[:, None] & (ahead < V)[None, :],
                         other=float("-inf"))
        logp = (x - m) * inv_temp - log_s
        p = tl.exp(logp)
        d = tl.where(cols[None, :] == targets[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
        if HAS_G_VMEAN:
            d += g_vmean[:, None] * (1.0 / V - p)
        if HAS_G_ENTROPY:
            d -= g_entropy[:, None] * p * (tl.where(p > 0, logp, 0.0) + entropy[:, None])
        d = tl.where(active[:, None], d * inv_temp, 0.0)
        tl.store(drow_ptrs[:, None] + cols[None, :], d.to(drow_ptrs.dtype.element_ty),
                 mask=row_valid[:, None] & (cols < V)[None, :])


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, targets_ptr,
    logps_ptr, entropy_ptr, vmean_ptr, stats_ptr,
    N, V, inv_temp, ignore_index,
    WANT_ENTROPY: tl.constexpr, WANT_VMEAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < N
    row_ptrs = logits_ptr + (rows // T) * stride_b + (rows % T) * stride_t
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    m, log_s, entropy, xsum = _rows_stats(row_ptrs, row_valid, V, inv_temp, WANT_ENTROPY, WANT_VMEAN, ROWS, BLOCK_V)
    keep, logp = _target_logps(row_ptrs, row_valid, targets, m, log_s, inv_temp, V, ignore_index)
    tl.store(logps_ptr + rows, logp, mask=row_valid)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(keep, entropy, 0.0), mask=row_valid)
    if WANT_VMEAN:
        tl.store(vmean_ptr + rows, tl.where(keep, (xsum / V - m) * inv_temp - log_s, 0.0), mask=row_valid)
    tl.store(stats_ptr + rows, m, mask=row_valid)
    tl.store(stats_ptr + N + rows, log_s, mask=row_valid)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_b, stride_t, T, dlogits_ptr, dstride_b, dstride_t, targets_ptr,
    stats_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, g_vmean_ptr,
    N, V, inv_temp, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < N
    row_ptrs = logits_ptr + (rows // T) * stride_b + (rows % T) * stride_t
    drow_ptrs = dlogits_ptr + (rows // T) * dstride_b + (rows % T) * dstride_t
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    keep = row_valid & (targets != ignore_index)
    m = tl.load(stats_ptr + rows, mask=row_valid, other=0.0)
    log_s = tl.load(stats_ptr + N + rows, mask=row_valid, other=0.0)
    g_logp = tl.zeros((ROWS,), tl.float32)
    g_entropy = tl.zeros((ROWS,), tl.float32)
    g_vmean = tl.zeros((ROWS,), tl.float32)
    entropy = tl.zeros((ROWS,), tl.float32)
    if HAS_G_LOGP:
        g_logp = tl.where(keep, tl.load(g_logp_ptr + rows, mask=row_valid, other=0.0), 0.0)
    if HAS_G_ENTROPY:
        g_entropy = tl.where(keep, tl.load(g_entropy_ptr + rows, mask=row_valid, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_valid, other=0.0)
    if HAS_G_VMEAN:
        g_vmean = tl.where(keep, tl.load(g_vmean_ptr + rows, mask=row_valid, other=0.0), 0.0)
    _rows_dlogits(row_ptrs, drow_ptrs, row_valid, targets, m, log_s, entropy, g_logp, g_entropy, g_vmean, V,
                  inv_temp, HAS_G_ENTROPY, HAS_G_VMEAN, ROWS, BLOCK_V)


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


def logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool = True,
                     want_vmean: bool = True):
    """Launch the forward kernel. Returns (logps, entropy, vmean) float32 (N,) (an output not wanted is left
    unwritten), the row statistics the backward needs (a (2, N) float32 tensor: each row's max logit and
    log s, with lse = max / T + log s) and the (B, T, V) view used."""
    view = _as_3d(logits)
    batch, seq, vocab = view.shape
    n_rows = batch * seq
    flat_targets = targets.reshape(-1).contiguous()
    outs = [torch.empty(n_rows, device=logits.device, dtype=torch.float32) for _ in range(3)]
    stats = torch.empty(2, n_rows, device=logits.device, dtype=torch.float32)
    cfg = launch.row_config(launch.target_of(logits.device), vocab)
    if n_rows:
        _logprobs_fwd_kernel[(cfg.programs(triton.cdiv(n_rows, cfg.constexprs["ROWS"])),)](
            view, view.stride(0), view.stride(1), seq, flat_targets, *outs, stats,
            n_rows, vocab, 1.0 / temperature, IGNORE_INDEX, WANT_ENTROPY=want_entropy, WANT_VMEAN=want_vmean,
            **cfg.launch_kwargs(),
        )
    return (*outs, stats, view)


def logprobs_backward(view, targets, stats, entropy, g_logp, g_entropy, g_vmean, temperature, dlogits):
    """Launch the backward kernel: write d(logits) for the given per-row output gradients into ``dlogits``.

    ``view`` is the (B, T, V) logits view from :func:`logprobs_forward`; ``dlogits`` (B, T, V) may be ``view``
    itself (in-place backward); ``stats`` the (2, N) row statistics from there. Gradients are (N,) float32
    tensors or None.
    """
    batch, seq, vocab = view.shape
    n_rows = batch * seq
    dummy = entropy
    cfg = launch.row_config(launch.target_of(view.device), vocab)
    if not n_rows:
        return dlogits
    _logprobs_bwd_kernel[(cfg.programs(triton.cdiv(n_rows, cfg.constexprs["ROWS"])),)](
        view, view.stride(0), view.stride(1), seq, dlogits, dlogits.stride(0), dlogits.stride(1),
        targets.reshape(-1).contiguous(), stats, entropy,
        dummy if g_logp is None else g_logp.reshape(-1).float().contiguous(),
        dummy if g_entropy is None else g_entropy.reshape(-1).float().contiguous(),
        dummy if g_vmean is None else g_vmean.reshape(-1).float().contiguous(),
        n_rows, vocab, 1.0 / temperature, IGNORE_INDEX,
        HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None, HAS_G_VMEAN=g_vmean is not None,
        **cfg.launch_kwargs(),
    )
    return dlogits


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(logits, targets, temperature, inplace_backward) -> (logps, entropy, vmean)``.

    Used only when the logits need a gradient; :func:`token_logprobs_triton` calls the forward alone otherwise.
    """

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


def token_logprobs_triton(logits, targets, temperature: float, want_entropy: bool, want_vmean: bool,
                          inplace_backward: bool):
    """(logps, entropy, vmean) of the Triton path: through autograd when the logits need a gradient, else the
    forward kernel alone (no statistics kept, nothing saved). Unwanted outputs are None on the no-grad path."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return TokenLogprobsFunction.apply(logits, targets, float(temperature), inplace_backward)
    logps, entropy, vmean, _, _ = logprobs_forward(logits, targets, temperature, want_entropy, want_vmean)
    shape = targets.shape
    return (logps.view(shape), entropy.view(shape) if want_entropy else None,
            vmean.view(shape) if want_vmean else None)


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    """Run the wrappers' launches on meta tensors (``bench.compiled`` captures them): the forward on
    contiguous (N, V) logits and on a ``logits[:, :-1]`` view, with and without the optional outputs, and the
    backward with every output's gradient."""
    seq = min(n_rows, 1024)
    batch = max(1, n_rows // seq)
    targets = torch.empty(batch * seq, dtype=torch.int64, device="meta")
    flat = torch.empty(batch * seq, vocab, dtype=dtype, device="meta")
    sliced = torch.empty(batch, seq + 1, vocab, dtype=dtype, device="meta")[:, :-1]
    for logits in (flat, sliced):
        for wanted in ((True, True), (False, False)):
            logps, entropy, vmean, stats, view = logprobs_forward(logits, targets.view(logits.shape[:-1]), 0.7,
                                                                  *wanted)
        grads = [torch.empty_like(logps) for _ in range(3)]
        logprobs_backward(view, targets, stats, entropy, *grads, 0.7, torch.empty_like(view))

"""Log-probs from hidden states and the LM head, per vocabulary chunk: a GEMM forms the chunk's fp32 logits,
Triton row kernels reduce them. The whole (N, V) logits never exist.

The tokens go in row blocks of R and the vocabulary in chunks of C columns, both sized from a memory
budget (``launch.linear_hybrid_blocks``; one row block at usual shapes). Forward, per block and chunk:
1. z = hidden @ W[chunk].T, an (R, C) fp32 GEMM output (cuBLAS on a GPU: bf16/fp16 operands, fp32
   accumulation and output, as the fused kernels keep their tiles);
2. ``_chunk_stats_kernel`` streams z once (adding the bias, dividing by T) and merges the chunk's online
   softmax statistics (max m, sum of exponentials s, the entropy's sum t, sum of logits, target logit) into
   running (5, N) float32 statistics.
``linear_logprobs_triton._linear_combine_kernel`` then turns them into log-prob, entropy and vocab mean.

Backward, per block and chunk: the same GEMM recomputes z; ``_chunk_dlogits_kernel`` writes
dz = d(loss)/d(z) in the input dtype for any mix of the three outputs' gradients; d(W)[chunk] = dz.T @ hidden
(written by the first row block, accumulated by the others); d(hidden)[block] += dz @ W[chunk] into an fp32
(R, H) accumulator (the output itself for fp32).
FLOPs: 2·N·H·V forward, 6·N·H·V backward. Extra memory: :func:`extra_bytes`. Under ``torch.no_grad()`` only
the forward runs and nothing is saved.

The GEMMs are torch's (cuBLAS), so their speed needs no tuning here; the row kernels are bandwidth-bound
like the logits kernels of ``logprobs_triton``, on chunks small enough to stay in L2 between the GEMM that
writes them and the kernel that reads them.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch
from rlfuse.kernels.linear_logprobs_triton import _linear_combine_kernel
from rlfuse.kernels.logprobs_triton import _rows_sums

IGNORE_INDEX = -100


@triton.jit
def _chunk_stats_kernel(
    z_ptr, stride_z, C, v0, b_ptr, targets_ptr, stats_ptr, stride_stats, N, inv_temp, ignore_index,
    FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Merge the online-softmax statistics of columns [v0, v0 + C) of N rows (z in logit units divided by T)
    into stats (5 rows of ``stride_stats``): max m, s = sum e^(z - m), t = sum e^(z - m) (z - m), sum of z,
    and the target's z."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < N
    row_ptrs = z_ptr + rows * stride_z
    m, s1, t1, xsum = _rows_sums(row_ptrs, row_valid, C, inv_temp, b_ptr + v0, True, True, HAS_BIAS, ROWS, BLOCK_V)
    m = m * inv_temp  # the max of the chunk's logits plus bias, divided by T (-inf stays -inf)
    zsum1 = xsum * inv_temp
    local = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index) - v0
    here = row_valid & (local >= 0) & (local < C)
    zt1 = tl.load(row_ptrs + tl.where(here, local, 0), mask=here, other=0.0)
    if HAS_BIAS:
        zt1 += tl.load(b_ptr + v0 + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
    zt1 = tl.where(here, zt1 * inv_temp, 0.0)
    if FIRST:
        big_m, s_all, t_all, zsum_all, zt_all = m, s1, t1, zsum1, zt1
    else:
        m0 = tl.load(stats_ptr + rows, mask=row_valid, other=float("-inf"))
        s0 = tl.load(stats_ptr + stride_stats + rows, mask=row_valid, other=0.0)
        t0 = tl.load(stats_ptr + 2 * stride_stats + rows, mask=row_valid, other=0.0)
        big_m = tl.maximum(m0, m)
        big_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
        a0 = tl.exp(m0 - big_safe)
        a1 = tl.exp(m - big_safe)
        shift0 = tl.where(m0 == float("-inf"), 0.0, m0 - big_safe)
        shift1 = tl.where(m == float("-inf"), 0.0, m - big_safe)
        s_all = a0 * s0 + a1 * s1
        t_all = a0 * (t0 + shift0 * s0) + a1 * (t1 + shift1 * s1)
        zsum_all = tl.load(stats_ptr + 3 * stride_stats + rows, mask=row_valid, other=0.0) + zsum1
        zt_all = tl.load(stats_ptr + 4 * stride_stats + rows, mask=row_valid, other=0.0) + zt1
    tl.store(stats_ptr + rows, big_m, mask=row_valid)
    tl.store(stats_ptr + stride_stats + rows, s_all, mask=row_valid)
    tl.store(stats_ptr + 2 * stride_stats + rows, t_all, mask=row_valid)
    tl.store(stats_ptr + 3 * stride_stats + rows, zsum_all, mask=row_valid)
    tl.store(stats_ptr + 4 * stride_stats + rows, zt_all, mask=row_valid)


@triton.jit
def _chunk_dlogits_kernel(
    z_ptr, stride_z, C, v0, b_ptr, targets_ptr, stats_ptr, stride_stats, entropy_ptr, g_logp_ptr, g_entropy_ptr,
    g_vmean_ptr, dz_ptr, stride_dz, N, V, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz[:, :C] = d(loss)/d(z) for columns [v0, v0 + C), from the forward's statistics (m, s), in dz's dtype.

    With log p = (z - m) - log s (nothing of the logits' magnitude rounded), p = e^(log p):
    dz = g_logp ([v = y] - p) - g_H p (log p + H) + g_vmean (1/V - p), divided by T; rows to skip give 0.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_valid = rows < N
    row_ptrs = z_ptr + rows * stride_z
    drow_ptrs = dz_ptr + rows * stride_dz
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    keep = row_valid & (targets != ignore_index)
    m = tl.load(stats_ptr + rows, mask=row_valid, other=0.0)
    m = tl.where(m == float("-inf"), 0.0, m)[:, None]
    log_s = tl.log(tl.load(stats_ptr + stride_stats + rows, mask=row_valid, other=1.0))[:, None]
    local = targets - v0
    zeros = tl.zeros((ROWS,), tl.float32)
    g_logp = zeros
    g_entropy = zeros
    g_vmean = zeros
    entropy = zeros
    if HAS_G_LOGP:
        g_logp = tl.where(keep, tl.load(g_logp_ptr + rows, mask=row_valid, other=0.0), 0.0)
    if HAS_G_ENTROPY:
        g_entropy = tl.where(keep, tl.load(g_entropy_ptr + rows, mask=row_valid, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_valid, other=0.0)
    if HAS_G_VMEAN:
        g_vmean = tl.where(keep, tl.load(g_vmean_ptr + rows, mask=row_valid, other=0.0), 0.0)
    offs = tl.arange(0, BLOCK_V)
    z_next = tl.load(row_ptrs[:, None] + offs[None, :], mask=row_valid[:, None] & (offs < C)[None, :], other=0.0)
    for c0 in range(0, C, BLOCK_V):
        cols = c0 + offs
        z = z_next
        ahead = cols + BLOCK_V
        z_next = tl.load(row_ptrs[:, None] + ahead[None, :], mask=row_valid[:, None] & (ahead < C)[None, :],
                         other=0.0)
        if HAS_BIAS:
            z += tl.load(b_ptr + v0 + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        logp = (z * inv_temp - m) - log_s
        p = tl.exp(logp)
        dz = tl.where(cols[None, :] == local[:, None], g_logp[:, None], 0.0) - (g_logp + g_vmean)[:, None] * p \
            + (g_vmean / V)[:, None]
        if HAS_G_ENTROPY:
            dz -= g_entropy[:, None] * p * (tl.where(p > 0, logp, 0.0) + entropy[:, None])
        dz = tl.where(keep[:, None], dz * inv_temp, 0.0)
        tl.store(drow_ptrs[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & (cols < C)[None, :])


def fp32_gemm_supported(device: torch.device) -> bool:
    """Whether torch multiplies bf16/fp16 matrices straight into an fp32 output on ``device`` (``out_dtype``,
    cuBLAS): CUDA, and meta tensors (ahead-of-time compilation, memory accounting)."""
    return device.type in ("cuda", "meta")


def _logits_chunk(hidden: torch.Tensor, weight_chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, C) float32 = hidden (N, H) @ weight_chunk (C, H).T, accumulated and stored in fp32."""
    if hidden.dtype == torch.float32:
        return torch.mm(hidden, weight_chunk.t(), out=out)
    if fp32_gemm_supported(hidden.device):
        return torch.mm(hidden, weight_chunk.t(), out_dtype=torch.float32, out=out)
    return torch.mm(hidden.float(), weight_chunk.t().float(), out=out)  # CPU (interpreter): no such GEMM


def _accumulate_dhidden(d_hidden32: torch.Tensor, dz: torch.Tensor, weight_chunk: torch.Tensor, first: bool) -> None:
    """d_hidden32 (N, H) float32 (+)= dz (N, C) @ weight_chunk (C, H), accumulated in fp32."""
    if dz.dtype == torch.float32:
        torch.addmm(d_hidden32, dz, weight_chunk, beta=0.0 if first else 1.0, out=d_hidden32)
    elif fp32_gemm_supported(dz.device):
        torch.addmm(d_hidden32, dz, weight_chunk, out_dtype=torch.float32, beta=0.0 if first else 1.0, out=d_hidden32)
    else:
        torch.addmm(d_hidden32, dz.float(), weight_chunk.float(), beta=0.0 if first else 1.0, out=d_hidden32)


def _blocks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(size, total - start)


def hybrid_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   temperature: float):
    """Forward on (N, H) ``hidden`` (unit stride over H), (V, H) ``weight``, (N,) int64 ``targets``.

    Returns (logps, entropy, vmean, lse), each (N,) float32, and the running statistics, a (5, N) float32
    tensor (max, sum of exponentials, entropy sum, sum of logits, target logit; logits divided by T).
    """
    n_rows, size_h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    target = launch.target_of(device)
    blocks = launch.linear_hybrid_blocks(target, hidden.dtype, n_rows, size_h, vocab, backward=False)
    cfg = launch.chunk_row_config(target, blocks.columns)
    stats = torch.empty(5, n_rows, device=device, dtype=torch.float32)
    outs = [torch.empty(n_rows, device=device, dtype=torch.float32) for _ in range(4)]
    if not n_rows:
        return (*outs, stats)
    buffer = torch.empty(blocks.rows * min(blocks.columns, vocab), device=device, dtype=torch.float32)
    for r0, rows in _blocks(n_rows, blocks.rows):
        grid = (cfg.programs(triton.cdiv(rows, cfg.constexprs["ROWS"])),)
        for v0, width in _blocks(vocab, blocks.columns):
            z = _logits_chunk(hidden[r0:r0 + rows], weight[v0:v0 + width], buffer[:rows * width].view(rows, width))
            _chunk_stats_kernel[grid](
                z, width, width, v0, weight if bias is None else bias, targets[r0:], stats[:, r0:], n_rows, rows,
                1.0 / temperature, IGNORE_INDEX, FIRST=v0 == 0, HAS_BIAS=bias is not None, **cfg.launch_kwargs(),
            )
    merge = launch.linear_combine_config(target)
    _linear_combine_kernel[(triton.cdiv(n_rows, merge.constexprs["BLOCK"]),)](
        stats, n_rows, targets, *outs, n_rows, vocab, 1, IGNORE_INDEX, **merge.launch_kwargs(),
    )
    return (*outs, stats)


def hybrid_backward(hidden, weight, bias, targets, stats, entropy, grads, temperature):
    """d(hidden) (N, H), d(weight) (V, H) in the inputs' dtype and d(bias) (V,) for per-token output gradients
    ``grads`` = (g_logp, g_entropy, g_vmean), each (N,) float32 or None; ``stats`` from :func:`hybrid_forward`."""
    n_rows, size_h = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    target = launch.target_of(device)
    blocks = launch.linear_hybrid_blocks(target, dtype, n_rows, size_h, vocab)
    cfg = launch.chunk_row_config(target, blocks.columns)
    d_weight = torch.empty_like(weight)
    d_bias = None if bias is None else torch.zeros(vocab, device=device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if not n_rows:
        d_weight.zero_()
        return d_hidden, d_weight, None if bias is None else d_bias.to(bias.dtype)
    accumulator = d_hidden if dtype == torch.float32 else \
        torch.empty(min(blocks.rows, n_rows), size_h, device=device, dtype=torch.float32)
    logits_buffer = torch.empty(blocks.rows * min(blocks.columns, vocab), device=device, dtype=torch.float32)
    dz_buffer = torch.empty(blocks.rows * min(blocks.columns, vocab), device=device, dtype=dtype)
    flags = {"HAS_BIAS": bias is not None, "HAS_G_LOGP": grads[0] is not None,
             "HAS_G_ENTROPY": grads[1] is not None, "HAS_G_VMEAN": grads[2] is not None}
    for r0, rows in _blocks(n_rows, blocks.rows):
        h_block = hidden[r0:r0 + rows]
        d_block = accumulator[r0:r0 + rows] if dtype == torch.float32 else accumulator[:rows]
        grid = (cfg.programs(triton.cdiv(rows, cfg.constexprs["ROWS"])),)
        for v0, width in _blocks(vocab, blocks.columns):
            w_chunk = weight[v0:v0 + width]
            z = _logits_chunk(h_block, w_chunk, logits_buffer[:rows * width].view(rows, width))
            dz = dz_buffer[:rows * width].view(rows, width)
            _chunk_dlogits_kernel[grid](
                z, width, width, v0, weight if bias is None else bias, targets[r0:], stats[:, r0:], n_rows,
                entropy[r0:], *(entropy if g is None else g[r0:] for g in grads), dz, width, rows, vocab,
                1.0 / temperature, IGNORE_INDEX, **flags, **cfg.launch_kwargs(),
            )
            # d(W)[chunk] = dz.T @ hidden: written by the first row block, accumulated by the others.
            torch.addmm(d_weight[v0:v0 + width], dz.t(), h_block, beta=0.0 if r0 == 0 else 1.0,
                        out=d_weight[v0:v0 + width])
            if d_bias is not None:
                d_bias[v0:v0 + width] += dz.sum(0, dtype=torch.float32)
            _accumulate_dhidden(d_block, dz, w_chunk, first=v0 == 0)
        if dtype != torch.float32:
            d_hidden[r0:r0 + rows] = d_block
    return d_hidden, d_weight, None if bias is None else d_bias.to(bias.dtype)


def extra_bytes(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype, target: Optional[launch.Target],
                backward: bool = True, hidden_is_matrix: bool = True) -> int:
    """Bytes this path allocates at its peak beyond its inputs, its (N,) float32 outputs and the gradients it
    returns.

    Kept from the forward for the backward: the (5, N) float32 statistics, and a copy of the hidden states
    when they have no (N, H) view. Forward: the (R, C) fp32 logits chunk. Backward: the logits chunk, the
    (R, C) d(logits) chunk in ``dtype`` and, below fp32, the fp32 (R, H) d(hidden) accumulator, with the
    backward's own R and C (``launch.linear_hybrid_blocks``). The forward's chunk is freed before the
    backward starts, so the peak is the larger of the two. A bias adds its float32 (V,) gradient and a (C,)
    column sum, not counted here.
    """
    element = launch.element_size(dtype)
    kept = 5 * n_rows * 4 + (0 if hidden_is_matrix else n_rows * hidden * element)
    fwd = launch.linear_hybrid_blocks(target, dtype, n_rows, hidden, vocab, backward=False)
    forward = min(fwd.rows, n_rows) * min(fwd.columns, vocab) * 4
    if not backward:
        return kept + forward
    bwd = launch.linear_hybrid_blocks(target, dtype, n_rows, hidden, vocab, backward=True)
    rows, columns = min(bwd.rows, n_rows), min(bwd.columns, vocab)
    accumulator = rows * hidden * 4 if dtype != torch.float32 else 0
    return kept + max(forward, rows * columns * (4 + element) + accumulator)


def traffic_bytes(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype, target: Optional[launch.Target],
                  backward: bool = True) -> int:
    """Memory traffic of the forward (and backward) in bytes, with every buffer read from and written to
    memory (no L2 reuse): an upper bound whose terms are the design's costs.

    Forward, per row block of R tokens and chunk of C columns: the GEMM reads the block's hidden states and
    the weight chunk and writes R x C fp32 logits; the statistics kernel reads them. Backward: the same
    GEMM; the gradient kernel reads the logits and writes d(logits); d(W) reads d(logits) and the hidden
    block and writes its rows (later row blocks read and write them); d(hidden) reads d(logits) and the
    weight chunk and reads and writes the fp32 accumulator: 8·N·H·V / C bytes over the pass, the cost of
    never holding d(logits) for a whole row.
    """
    element = launch.element_size(dtype)
    weight = vocab * hidden * element
    per_token = n_rows * (8 + 5 * 4 + 4 * 4)

    def steps(backward_pass):
        blocks = launch.linear_hybrid_blocks(target, dtype, n_rows, hidden, vocab, backward=backward_pass)
        return -(-n_rows // max(1, blocks.rows)), -(-vocab // max(1, blocks.columns))

    n_blocks, n_chunks = steps(False)
    forward = n_chunks * n_rows * hidden * element + n_blocks * weight + 2 * n_rows * vocab * 4 + per_token
    if not backward:
        return forward
    n_blocks, n_chunks = steps(True)
    hidden_reads = n_chunks * n_rows * hidden * element
    logits, grad = n_rows * vocab * 4, n_rows * vocab * element
    backward_bytes = (hidden_reads + n_blocks * weight + logits            # recompute the logits
                      + logits + grad                                      # d(logits)
                      + grad + hidden_reads + weight + 2 * (n_blocks - 1) * weight  # d(W)
                      + grad + n_blocks * weight + 2 * n_chunks * n_rows * hidden * 4  # d(hidden) accumulation
                      + n_rows * (8 + 5 * 4 + 3 * 4)
                      + (n_rows * hidden * (4 + element) if element < 4 else 0))    # the final cast
    return forward + backward_bytes


class HybridLinearLogprobsFunction(torch.autograd.Function):
    """``apply(hidden (N, H) or (B, T, H), weight (V, H), bias or None, targets (N,), temperature)``.

    Returns (logps, entropy, vocab_mean), each (N,) float32; saves the inputs, the (5, N) statistics and the
    entropy. Used only when a gradient is needed; :func:`linear_logprobs_hybrid` runs the forward alone else.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # a view when one exists, else one copy
        with _no_autocast(hidden.device):
            logps, entropy, vmean, _, stats = hybrid_forward(hidden_2d, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden_2d, weight, bias, targets, stats, entropy)
        ctx.temperature, ctx.shape = temperature, hidden.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its kernel branch is skipped
        return logps, entropy, vmean

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_vmean):
        hidden_2d, weight, bias, targets, stats, entropy = ctx.saved_tensors
        grads = tuple(None if g is None else g.float().contiguous() for g in (g_logp, g_entropy, g_vmean))
        with _no_autocast(hidden_2d.device):
            d_hidden, d_weight, d_bias = hybrid_backward(hidden_2d, weight, bias, targets, stats, entropy, grads,
                                                         ctx.temperature)
        return d_hidden.view(ctx.shape), d_weight, d_bias, None, None


def linear_logprobs_hybrid(hidden, weight, bias, targets, temperature: float):
    """(logps, entropy, vocab_mean), each (N,) float32: through autograd when any input needs a gradient,
    else the forward alone (nothing saved)."""
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    targets = targets.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return HybridLinearLogprobsFunction.apply(hidden, weight, bias, targets, float(temperature))
    with _no_autocast(hidden.device):
        logps, entropy, vmean, _, _ = hybrid_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets,
                                                     float(temperature))
    return logps, entropy, vmean


def _no_autocast(device: torch.device):
    """Autocast off inside: the GEMMs run in the inputs' dtype into fp32 logits, whatever the caller's state
    (under bf16 autocast an fp32 GEMM would otherwise round the logits)."""
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    """Run the forward and backward on meta tensors (``bench.compiled`` captures the launches): with a bias and
    every gradient, and without either."""
    h = torch.empty(n_rows, hidden, dtype=dtype, device="meta")
    w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
    targets = torch.empty(n_rows, dtype=torch.int64, device="meta")
    for bias in (torch.empty(vocab, dtype=dtype, device="meta"), None):
        logps, entropy, _, _, stats = hybrid_forward(h, w, bias, targets, 0.7)
        grads = (logps, entropy, logps) if bias is not None else (logps, None, None)
        hybrid_backward(h, w, bias, targets, stats, entropy, grads, 0.7)

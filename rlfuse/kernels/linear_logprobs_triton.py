"""Triton kernels for log-probs from hidden states and the LM head, without materializing the logits.

Forward: one program per tile of BLOCK_M tokens walks the vocabulary in BLOCK_N tiles; each logits tile
(hidden tile @ weight tile.T, accumulated in fp32 over BLOCK_K slices of H) stays on chip and is merged
by an online log-sum-exp, together with the entropy and vocabulary-mean sums and the target logit.
Only log-prob, entropy, vocab mean and log-sum-exp (4 floats per token) are written.

Backward: one program per (token tile, vocabulary tile) recomputes that tile's logits, forms
dz = d(loss)/d(logits / T) for any mix of the three outputs' gradients (see ``logprobs_triton``), and
adds dz @ W into d(hidden), dz.T @ h into d(weight) and sum(dz) into d(bias) with fp32 atomics.
FLOPs: 2·N·H·V forward, 6·N·H·V backward (recompute, d(hidden), d(weight)).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
# Triton's CPU interpreter computes tl.dot on bf16 operands from their raw bits; upcast there (only).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr, H,
                 inv_temp, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of (h @ W.T + b) / T; invalid columns are -inf."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h_rows = h_ptr + (rows // T) * stride_hb + (rows % T) * stride_ht
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < H
        h = tl.load(h_rows[:, None] + ks[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None], mask=col_valid[None, :] & k_valid[:, None],
                    other=0.0)
        if DOT_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_valid[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _linear_fwd_kernel(
    h_ptr, stride_hb, stride_ht, T, w_ptr, stride_wv, b_ptr, targets_ptr,
    logps_ptr, entropy_ptr, vmean_ptr, lse_ptr,
    N, H, V, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    z_target = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, V, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < V
        z = _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr,
                         H, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s = s * alpha + tl.sum(e, 1)
        t = t * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), 1)
        zsum += tl.sum(tl.where(col_valid[None, :], z, 0.0), 1)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
        m = m_new
    lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)
    keep = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)  # out-of-range ids give NaN (no host sync on a GPU)
    tl.store(logps_ptr + rows, tl.where(keep, tl.where(in_range, z_target - lse, float("nan")), 0.0), mask=row_valid)
    tl.store(entropy_ptr + rows, tl.where(keep, lse - t / s, 0.0), mask=row_valid)
    tl.store(vmean_ptr + rows, tl.where(keep, zsum / V - lse, 0.0), mask=row_valid)
    tl.store(lse_ptr + rows, lse, mask=row_valid)


@triton.jit
def _linear_bwd_kernel(
    h_ptr, stride_hb, stride_ht, T, w_ptr, stride_wv, b_ptr, targets_ptr, lse_ptr, entropy_ptr,
    g_logp_ptr, g_entropy_ptr, g_vmean_ptr, dh_ptr, dw_ptr, db_ptr,
    N, H, V, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < N
    col_valid = cols < V
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    keep = row_valid & (targets != ignore_index)
    z = _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr,
                     H, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)
    logp = z - tl.load(lse_ptr + rows, mask=row_valid, other=0.0)[:, None]
    p = tl.exp(logp)
    dz = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_G_LOGP:
        g = tl.where(keep, tl.load(g_logp_ptr + rows, mask=row_valid, other=0.0), 0.0)[:, None]
        dz += tl.where(cols[None, :] == targets[:, None], g, 0.0) - g * p
    if HAS_G_ENTROPY:
        g = tl.where(keep, tl.load(g_entropy_ptr + rows, mask=row_valid, other=0.0), 0.0)[:, None]
        entropy = tl.load(entropy_ptr + rows, mask=row_valid, other=0.0)[:, None]
        dz -= g * p * (tl.where(p > 0, logp, 0.0) + entropy)
    if HAS_G_VMEAN:
        g = tl.where(keep, tl.load(g_vmean_ptr + rows, mask=row_valid, other=0.0), 0.0)[:, None]
        dz += g * (1.0 / V - p)
    dz = tl.where(row_valid[:, None] & col_valid[None, :], dz * inv_temp, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_valid)
    dz_in = dz.to(w_ptr.dtype.element_ty)  # matmul operands in the input dtype, fp32 accumulation
    if DOT_FP32:
        dz_in = dz_in.to(tl.float32)
    h_rows = h_ptr + (rows // T) * stride_hb + (rows % T) * stride_ht
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < H
        h = tl.load(h_rows[:, None] + ks[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_valid[:, None] & k_valid[None, :],
                    other=0.0)
        if DOT_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], tl.dot(dz_in, w),
                      mask=row_valid[:, None] & k_valid[None, :])
        tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], tl.dot(tl.trans(dz_in), h),
                      mask=col_valid[:, None] & k_valid[None, :])


def _blocks(device: torch.device):
    # Tile sizes: large on a GPU; small under the CPU interpreter, whose cost grows with the tile.
    return (64, 128, 64) if device.type == "cuda" else (16, 32, 16)


def _as_rows(hidden: torch.Tensor):
    """(view, stride_b, stride_t, T) addressing row r = b·T + t of (N, H) or (B, T, H) hidden states."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if hidden.dim() == 2:
        return hidden, 0, hidden.stride(0), hidden.shape[0]
    return hidden, hidden.stride(0), hidden.stride(1), hidden.shape[1]


class LinearLogprobsFunction(torch.autograd.Function):
    """``apply(hidden (N, H) or (B, T, H), weight (V, H), bias or None, targets (N,), temperature)``.

    Returns (logps, entropy, vocab_mean), each (N,) float32; saves the inputs and the (N,) log-sum-exp
    and entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        view, stride_b, stride_t, seq = _as_rows(hidden)
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        n_rows, size_h, vocab = targets.numel(), weight.shape[1], weight.shape[0]
        targets = targets.contiguous()
        outs = [torch.empty(n_rows, device=hidden.device, dtype=torch.float32) for _ in range(4)]
        block_m, block_n, block_k = _blocks(hidden.device)
        _linear_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            view, stride_b, stride_t, seq, weight, weight.stride(0), weight if bias is None else bias, targets,
            *outs, n_rows, size_h, vocab, 1.0 / temperature, IGNORE_INDEX,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=INTERPRETED,
        )
        logps, entropy, vmean, lse = outs
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        return logps, entropy, vmean

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_vmean):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        view, stride_b, stride_t, seq = _as_rows(hidden)
        n_rows, size_h, vocab = targets.numel(), weight.shape[1], weight.shape[0]
        d_hidden = torch.zeros(n_rows, size_h, device=hidden.device, dtype=torch.float32)
        d_weight = torch.zeros(vocab, size_h, device=weight.device, dtype=torch.float32)
        d_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if bias is not None else d_weight
        block_m, block_n, block_k = _blocks(hidden.device)
        grads = [None if g is None else g.float().contiguous() for g in (g_logp, g_entropy, g_vmean)]
        _linear_bwd_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(vocab, block_n))](
            view, stride_b, stride_t, seq, weight, weight.stride(0), weight if bias is None else bias, targets, lse,
            entropy, *(lse if g is None else g for g in grads), d_hidden, d_weight, d_bias,
            n_rows, size_h, vocab, 1.0 / ctx.temperature, IGNORE_INDEX,
            HAS_BIAS=bias is not None, HAS_G_LOGP=grads[0] is not None, HAS_G_ENTROPY=grads[1] is not None,
            HAS_G_VMEAN=grads[2] is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_FP32=INTERPRETED,
        )
        return (d_hidden.view(hidden.shape).to(hidden.dtype), d_weight.to(weight.dtype),
                None if bias is None else d_bias.to(bias.dtype), None, None)

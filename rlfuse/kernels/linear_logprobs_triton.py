"""Triton kernels for log-probs from hidden states and the LM head, without materializing the logits.

Forward: one program per (tile of BLOCK_M tokens, slice of the vocabulary) walks its slice in BLOCK_N
tiles; each logits tile (hidden tile @ weight tile.T, accumulated in fp32 over BLOCK_K slices of H) stays
on chip and is merged by an online log-sum-exp, together with the entropy and vocabulary-mean sums and
the target logit. The slices (``launch.linear_forward_splits``: enough programs to fill the GPU when N is
small) write 5 floats per token each; a merge kernel turns them into log-prob, entropy, vocab mean and
log-sum-exp (4 floats per token).

Backward: the vocabulary is walked in chunks of C columns (``launch.linear_vocab_chunk``). Per chunk:
1. ``_linear_dlogits_kernel``: one program per (token tile, vocabulary tile) recomputes that tile's logits
   and writes dz = d(loss)/d(logits / T) for any mix of the three outputs' gradients into an (N, C)
   buffer in the input dtype (see ``logprobs_triton`` for the math);
2. d(weight)[chunk] = dz.T @ hidden, one matmul that owns its rows of d(weight) (written once, no
   accumulation across chunks, no fp32 (V, H) scratch);
3. ``_linear_dhidden_kernel``: d(hidden) += dz @ weight[chunk], each program owning one (BLOCK_M, BLOCK_K)
   tile of an fp32 (N, H) accumulator (the output itself for fp32 inputs).
No atomics. Extra memory: the (N, C) chunk plus, below fp32, the (N, H) fp32 accumulator
(:func:`backward_extra_bytes`). FLOPs: 2·N·H·V forward, 6·N·H·V backward (recompute, d(hidden), d(weight)).

Numerics: fp32 operands multiply in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set,
like torch's own matmuls.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch

IGNORE_INDEX = -100
#: The kernels that multiply matrices (``bench.compiled`` requires tensor-core instructions in them).
DOT_KERNELS = ("_linear_fwd_kernel", "_linear_dlogits_kernel", "_linear_dhidden_kernel")
# Triton's CPU interpreter computes tl.dot on bf16 operands from their raw bits; upcast there (only).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls run as TF32: ``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
    or the older ``torch.backends.cuda.matmul.allow_tf32 = True``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the old flag once the new one was set
        return False


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision for ``dtype`` operands: TF32 for fp32 only where torch allows it, else IEEE."""
    return "tf32" if dtype == torch.float32 and tf32_allowed() else "ieee"


@triton.jit
def _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr, H,
                 inv_temp, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
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
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_valid[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _linear_fwd_kernel(
    h_ptr, stride_hb, stride_ht, T, w_ptr, stride_wv, b_ptr, targets_ptr, part_ptr,
    N, H, V, span, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, j): tokens i·BLOCK_M.. over vocabulary columns [j·span, (j + 1)·span). Writes the slice's
    running max m, sum of exponentials s, sum_v e_v (z_v - m), sum_v z_v and target logit (0 when the target
    lies outside the slice) to part[:, j, rows], the (5, splits, N) float32 partials."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_valid = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    t = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    z_target = tl.zeros((BLOCK_M,), tl.float32)
    v_lo = split * span
    v_hi = tl.minimum(v_lo + span, V)
    for n0 in range(v_lo, v_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < v_hi
        z = _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr,
                         H, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # t is relative to the running max, as s
        e = tl.exp(z - m_safe[:, None])
        t = (t + shift * s) * alpha + tl.sum(e * tl.where(e > 0, z - m_safe[:, None], 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        zsum += tl.sum(tl.where(col_valid[None, :], z, 0.0), 1)
        z_target += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), 1)
        m = m_new
    stride_part = tl.num_programs(1).to(tl.int64) * N
    out = part_ptr + split.to(tl.int64) * N + rows
    tl.store(out, m, mask=row_valid)
    tl.store(out + stride_part, s, mask=row_valid)
    tl.store(out + 2 * stride_part, t, mask=row_valid)
    tl.store(out + 3 * stride_part, zsum, mask=row_valid)
    tl.store(out + 4 * stride_part, z_target, mask=row_valid)


@triton.jit
def _linear_combine_kernel(
    part_ptr, stride_part, targets_ptr, logps_ptr, entropy_ptr, vmean_ptr, lse_ptr, N, V, SPLITS, ignore_index,
    BLOCK: tl.constexpr,
):
    """Merge the vocabulary slices' partials of BLOCK tokens into log-prob, entropy, vocab mean and lse.

    With M = max_j m_j and a_j = exp(m_j - M): s = sum_j a_j s_j, t = sum_j a_j (t_j + (m_j - M) s_j), so
    lse = M + log s and H = log s - t / s (two terms >= 0: nothing cancels). ``stride_part`` = splits·N, the
    distance between two kinds of partial, comes from the host: Triton turns an integer argument equal to 1
    (here SPLITS or N) into a constant, on which no ``.to`` can be called.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N
    big_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for j in range(0, SPLITS):
        big_m = tl.maximum(big_m, tl.load(part_ptr + j * N + rows, mask=valid, other=float("-inf")))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    zsum = tl.zeros((BLOCK,), tl.float32)
    z_target = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, SPLITS):
        at = part_ptr + j * N + rows
        m_j = tl.load(at, mask=valid, other=float("-inf"))
        s_j = tl.load(at + stride_part, mask=valid, other=0.0)
        a_j = tl.exp(m_j - m_safe)
        shift = tl.where(m_j == float("-inf"), 0.0, m_j - m_safe)
        s += a_j * s_j
        t += a_j * (tl.load(at + 2 * stride_part, mask=valid, other=0.0) + shift * s_j)
        zsum += tl.load(at + 3 * stride_part, mask=valid, other=0.0)
        z_target += tl.load(at + 4 * stride_part, mask=valid, other=0.0)
    s = tl.where(valid, s, 1.0)  # rows past N: no log(0), no 0 / 0
    log_s = tl.log(s)
    lse = m_safe + log_s
    targets = tl.load(targets_ptr + rows, mask=valid, other=ignore_index)
    keep = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)  # ids outside [0, V) give NaN (the host checks, except in capture)
    tl.store(logps_ptr + rows, tl.where(keep, tl.where(in_range, z_target - lse, float("nan")), 0.0), mask=valid)
    tl.store(entropy_ptr + rows, tl.where(keep, log_s - t / s, 0.0), mask=valid)
    tl.store(vmean_ptr + rows, tl.where(keep, zsum / V - lse, 0.0), mask=valid)
    tl.store(lse_ptr + rows, lse, mask=valid)


@triton.jit
def _linear_dlogits_kernel(
    h_ptr, stride_hb, stride_ht, T, w_ptr, stride_wv, b_ptr, targets_ptr, lse_ptr, entropy_ptr,
    g_logp_ptr, g_entropy_ptr, g_vmean_ptr, dz_ptr, stride_dz,
    N, H, V, v0, C, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_VMEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dz[:, c] for vocabulary columns v0 + c, c < C: this program's (BLOCK_M, BLOCK_N) tile, written once."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + local
    row_valid = rows < N
    col_valid = (local < C) & (cols < V)
    targets = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
    keep = row_valid & (targets != ignore_index)
    z = _logits_tile(h_ptr, stride_hb, stride_ht, T, rows, row_valid, w_ptr, stride_wv, cols, col_valid, b_ptr,
                     H, inv_temp, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
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
    dz = tl.where(keep[:, None] & col_valid[None, :], dz * inv_temp, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (local < C)[None, :])


@triton.jit
def _linear_dhidden_kernel(
    dz_ptr, stride_dz, w_ptr, stride_wv, dh_ptr, N, H, v0, C,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """d(hidden)[rows, ks] (+)= dz[rows, :C] @ W[v0:v0 + C, ks], this program's tile of the fp32 output."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_valid = rows < N
    k_valid = ks < H
    out = dh_ptr + rows[:, None] * H + ks[None, :]
    out_mask = row_valid[:, None] & k_valid[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    if ACCUMULATE:
        acc = tl.load(out, mask=out_mask, other=0.0)
    for n0 in range(0, C, BLOCK_N):
        local = n0 + tl.arange(0, BLOCK_N)
        n_valid = local < C
        dz = tl.load(dz_ptr + rows[:, None] * stride_dz + local[None, :], mask=row_valid[:, None] & n_valid[None, :],
                     other=0.0)
        w = tl.load(w_ptr + (v0 + local)[:, None] * stride_wv + ks[None, :], mask=n_valid[:, None] & k_valid[None, :],
                    other=0.0)
        if DOT_FP32:
            dz, w = dz.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dz, w, acc, input_precision=PRECISION)
    tl.store(out, acc, mask=out_mask)


def _as_rows(hidden: torch.Tensor):
    """(view, stride_b, stride_t, T) addressing row r = b·T + t of (N, H) or (B, T, H) hidden states."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if hidden.dim() == 2:
        return hidden, 0, hidden.stride(0), hidden.shape[0]
    return hidden, hidden.stride(0), hidden.stride(1), hidden.shape[1]


def _compile_flags(dtype: torch.dtype):
    return {"DOT_FP32": INTERPRETED, "PRECISION": input_precision(dtype)}


def linear_forward(hidden, weight, bias, targets, temperature):
    """Launch the forward: the vocabulary-slice programs, then the merge. Returns (logps, entropy, vmean, lse),
    each (N,) float32. Extra memory: the (5, splits, N) float32 partials."""
    view, stride_b, stride_t, seq = _as_rows(hidden)
    n_rows, size_h, vocab = targets.numel(), weight.shape[1], weight.shape[0]
    device = hidden.device
    target = launch.target_of(device)
    cfg, splits, span = forward_grid(n_rows, size_h, vocab, hidden.dtype, target)
    partials = torch.empty(5, splits, n_rows, device=device, dtype=torch.float32)
    _linear_fwd_kernel[(triton.cdiv(n_rows, cfg.constexprs["BLOCK_M"]), splits)](
        view, stride_b, stride_t, seq, weight, weight.stride(0), weight if bias is None else bias, targets,
        partials, n_rows, size_h, vocab, span, 1.0 / temperature, IGNORE_INDEX,
        HAS_BIAS=bias is not None, **_compile_flags(hidden.dtype), **cfg.launch_kwargs(),
    )
    outs = [torch.empty(n_rows, device=device, dtype=torch.float32) for _ in range(4)]
    merge = launch.linear_combine_config(target)
    _linear_combine_kernel[(triton.cdiv(n_rows, merge.constexprs["BLOCK"]),)](
        partials, partials.stride(0), targets, *outs, n_rows, vocab, splits, IGNORE_INDEX, **merge.launch_kwargs(),
    )
    return outs


def linear_backward(hidden, weight, bias, targets, lse, entropy, grads, temperature):
    """d(hidden), d(weight), d(bias) (in the inputs' dtypes) for per-token output gradients ``grads``.

    ``grads`` is (g_logp, g_entropy, g_vmean), each (N,) float32 or None. See the module docstring.
    """
    view, stride_b, stride_t, seq = _as_rows(hidden)
    n_rows, size_h, vocab = targets.numel(), weight.shape[1], weight.shape[0]
    target, dtype = launch.target_of(hidden.device), hidden.dtype
    chunk = launch.linear_vocab_chunk(target, dtype, n_rows, vocab)
    cfg_dz = launch.linear_dlogits_config(target, dtype, n_rows, size_h, vocab)
    cfg_dh = launch.linear_dhidden_config(target, dtype, n_rows, size_h, vocab)
    flags = _compile_flags(dtype)
    # hidden as an (N, H) matrix for d(weight) = dz.T @ hidden: a view when one exists, else one copy.
    hidden_2d = hidden.reshape(n_rows, size_h)
    d_weight = torch.empty_like(weight)
    d_bias = None if bias is None else torch.empty(vocab, device=weight.device, dtype=torch.float32)
    d_hidden32 = torch.empty(n_rows, size_h, device=hidden.device, dtype=torch.float32)
    dz = torch.empty(n_rows, min(chunk, vocab), device=hidden.device, dtype=dtype)
    g_logp, g_entropy, g_vmean = grads
    block_m, block_n = cfg_dz.constexprs["BLOCK_M"], cfg_dz.constexprs["BLOCK_N"]
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        _linear_dlogits_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(width, block_n))](
            view, stride_b, stride_t, seq, weight, weight.stride(0), weight if bias is None else bias, targets, lse,
            entropy, *(lse if g is None else g for g in grads), dz, dz.stride(0),
            n_rows, size_h, vocab, v0, width, 1.0 / temperature, IGNORE_INDEX,
            HAS_BIAS=bias is not None, HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None,
            HAS_G_VMEAN=g_vmean is not None, **flags, **cfg_dz.launch_kwargs(),
        )
        dz_chunk = dz[:, :width]
        torch.mm(dz_chunk.t(), hidden_2d, out=d_weight[v0:v0 + width])
        if d_bias is not None:
            d_bias[v0:v0 + width] = dz_chunk.sum(0, dtype=torch.float32)
        _linear_dhidden_kernel[(triton.cdiv(n_rows, cfg_dh.constexprs["BLOCK_M"]),
                                triton.cdiv(size_h, cfg_dh.constexprs["BLOCK_K"]))](
            dz_chunk, dz.stride(0), weight, weight.stride(0), d_hidden32, n_rows, size_h, v0, width,
            ACCUMULATE=v0 > 0, **flags, **cfg_dh.launch_kwargs(),
        )
    d_hidden = d_hidden32 if dtype == torch.float32 else d_hidden32.to(dtype)
    return d_hidden.view(hidden.shape), d_weight, None if bias is None else d_bias.to(bias.dtype)


def forward_grid(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype,
                 target: Optional[launch.Target] = launch.TARGETS[90]):
    """What :func:`linear_forward` launches at this shape: ``(config, splits, span)``, the tiles, the number of
    vocabulary slices and the columns per slice (a multiple of BLOCK_N; no slice is empty)."""
    cfg = launch.linear_forward_config(target, dtype, n_rows, hidden, vocab)
    block_n = cfg.constexprs["BLOCK_N"]
    splits = launch.linear_forward_splits(target, n_rows, vocab, cfg.constexprs["BLOCK_M"], block_n)
    span = triton.cdiv(triton.cdiv(vocab, splits), block_n) * block_n
    return cfg, triton.cdiv(vocab, span), span


def forward_extra_bytes(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype,
                        target: Optional[launch.Target] = launch.TARGETS[90]) -> int:
    """Bytes the forward allocates beyond its four (N,) float32 outputs: the (5, splits, N) float32 partials."""
    return 5 * forward_grid(n_rows, hidden, vocab, dtype, target)[1] * n_rows * 4


def backward_extra_bytes(n_rows: int, hidden: int, vocab: int, dtype: torch.dtype,
                         target: Optional[launch.Target] = launch.TARGETS[90], hidden_is_matrix: bool = True) -> int:
    """Bytes the backward allocates beyond its inputs and the gradients it returns (the formula the tests
    check against the allocations measured under the interpreter).

    The (N, C) chunk of d(logits) in ``dtype``; the fp32 (N, H) d(hidden) accumulator unless ``dtype`` is
    fp32 (then it is the output); a copy of the hidden states when they have no (N, H) view.
    """
    element = torch.finfo(dtype).bits // 8
    chunk = min(launch.linear_vocab_chunk(target, dtype, n_rows, vocab), vocab)
    extra = n_rows * chunk * element
    if dtype != torch.float32:
        extra += n_rows * hidden * 4
    if not hidden_is_matrix:
        extra += n_rows * hidden * element
    return extra


class LinearLogprobsFunction(torch.autograd.Function):
    """``apply(hidden (N, H) or (B, T, H), weight (V, H), bias or None, targets (N,), temperature)``.

    Returns (logps, entropy, vocab_mean), each (N,) float32; saves the inputs and the (N,) log-sum-exp
    and entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        targets = targets.contiguous()
        logps, entropy, vmean, lse = linear_forward(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its kernel branch is skipped
        return logps, entropy, vmean

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_vmean):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        grads = tuple(None if g is None else g.float().contiguous() for g in (g_logp, g_entropy, g_vmean))
        d_hidden, d_weight, d_bias = linear_backward(hidden, weight, bias, targets, lse, entropy, grads,
                                                     ctx.temperature)
        return d_hidden, d_weight, d_bias, None, None


def linear_logprobs_fused(hidden, weight, bias, targets, temperature: float):
    """(logps, entropy, vocab_mean), each (N,) float32: through autograd when any input needs a gradient,
    else the forward alone (nothing saved)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return LinearLogprobsFunction.apply(hidden, weight, bias, targets, float(temperature))
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    logps, entropy, vmean, _ = linear_forward(hidden, weight, bias, targets.contiguous(), float(temperature))
    return logps, entropy, vmean


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    """Run the forward and backward on meta tensors (``bench.compiled`` captures the launches): a
    ``hidden[:, :-1]`` view with a bias and every output's gradient, and contiguous (N, H) hidden states with
    the log-prob's gradient alone; fp32 both in IEEE precision and as TF32."""
    seq = min(n_rows, 1024)
    batch = max(1, n_rows // seq)
    w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
    targets = torch.empty(batch * seq, dtype=torch.int64, device="meta")
    cases = ((torch.empty(batch, seq + 1, hidden, dtype=dtype, device="meta")[:, :-1],
              torch.empty(vocab, dtype=dtype, device="meta"), True),
             (torch.empty(batch * seq, hidden, dtype=dtype, device="meta"), None, False))
    tf32_settings = (False, True) if dtype == torch.float32 else (False,)  # fp32: IEEE and, where allowed, TF32
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in tf32_settings:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for h, bias, every in cases:
                logps, entropy, vmean, lse = linear_forward(h, w, bias, targets, 0.7)
                grads = (logps, entropy, vmean) if every else (logps, None, None)
                linear_backward(h, w, bias, targets, lse, entropy, grads, 0.7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before

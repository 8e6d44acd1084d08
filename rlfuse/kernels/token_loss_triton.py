"""One Triton kernel for a token-local policy loss from logits: two passes over the (N, V) logits.

A loss is token-local when its gradient at token t needs only that token's log-prob plus values known
before launch: the old and reference log-probs, the advantage and the aggregation weight w_t (which
folds ``loss_agg_mode`` and the sequence lengths, e.g. m_t / (|o_i|·B') for seq-mean-token-mean). That
covers the token-level PPO clip (GRPO, Dr. GRPO, DAPO; dual clip optional), TOPR at token level, the REC
family at token level (REINFORCE, REC, OPMD, AsymRE, RED), CISPO at token level, and every KL estimator.

A persistent grid of programs, each looping over groups of ROWS rows; per group:
1. sweep the rows once with an online softmax: lse, entropy and the target's log-prob;
2. the token loss l_t and its derivative g_t = dl_t/dlogp_t (below), in registers;
3. sweep the rows again, while they are still in L2, writing d(logits)_v = w_t·g_t·([v = y] - p_v) / T.
The grid is capped so that the rows in flight fit in the L2 cache (``launch.token_loss_config``), so the
second sweep reads from L2: the logits cross HBM once and d(logits) once, the two-pass floor for a loss
that needs the softmax's normalizer before any gradient. The loss is sum_t w_t·l_t. Without a gradient
(``torch.no_grad()``, or logits that need none) the second sweep is compiled out and nothing is saved.

Token losses, r = exp(logp - old_logp), A the advantage:
- PPO clip ("Proximal Policy Optimization Algorithms", eq. 7): l = max(-A·r, -A·clip(r, 1-eps_low,
  1+eps_high)), g = -A·r where the unclipped term is the max, else 0; dual clip ("Mastering Complex
  Control in MOBA Games with Deep Reinforcement Learning"): where A < 0 and l > -A·c, l = -A·c, g = 0.
- TOPR ("Tapered Off-Policy REINFORCE", eq. 7): l = -sg(a)·A·logp, a = clamp(r, 0, 1) if A < 0 else 1,
  g = -a·A.
- REC ("Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm"): l = -w·A·logp·1[keep] + reg,
  w = 1, sg(r), sg(clip(r, 1 - eps_low', 1 + eps_high')) or exp(A / tau); keep by the clip mode (none,
  one-side, two-side, ring); reg = c·(logp - old_logp)² (g += 2c·(logp - old_logp)) or -c·logp (g -= c).
- CISPO ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"):
  l = -sg(min(r, 1 + eps_high))·A·logp, g = -min(r, 1 + eps_high)·A.
- plus beta times a KL estimator to the reference ("Approximating KL Divergence"), d = logp - ref:
  k1 = d (dk = 1), k2 = d²/2 (dk = d), k3 = exp(-d) + d - 1 (dk = 1 - exp(-d)).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch
from rlfuse.kernels.logprobs_triton import _as_3d, _rows_dlogits, _rows_stats, _target_logps

IGNORE_INDEX = -100
TOKEN_LOSSES = {"ppo_clip": 0, "topr": 1, "rec": 2, "cispo": 3}
CLIP_MODES = {"none": 0, "one-side": 1, "two-side": 2, "ring": 3}
WEIGHTS = {"none": 0, "importance_sampling": 1, "truncated_importance_sampling": 2, "advantage": 3}
REGULARIZERS = {"none": 0, "k2": 1, "forward-kl": 2}
KL_ESTIMATORS = {None: 0, "k1": 1, "k2": 2, "k3": 3}


class TokenLossParams(NamedTuple):
    """The scalars of a token-local loss.

    Attributes:
        loss_type: ``ppo_clip``, ``topr``, ``rec`` or ``cispo``.
        epsilon_low, epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high] (CISPO: the cap).
        clip_ratio_c: the dual-clip constant (> 1), or None.
        beta: weight of the KL penalty (needs reference log-probs when > 0).
        kl_estimator: ``k1``, ``k2`` or ``k3``; used when reference log-probs are given.
        clip_mode, weight, regularizer: REC's dials (keys of :data:`CLIP_MODES`, :data:`WEIGHTS`,
            :data:`REGULARIZERS`).
        epsilon_low_prime, epsilon_high_prime: REC's outer ring and truncated-weight bounds.
        weight_temperature: tau of REC's ``advantage`` weight exp(A / tau).
        regularizer_coef: REC's regularizer weight c.
    """

    loss_type: str
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    clip_mode: str = "none"
    weight: str = "none"
    regularizer: str = "none"
    epsilon_low_prime: float = 0.6
    epsilon_high_prime: float = 2.0
    weight_temperature: float = 1.0
    regularizer_coef: float = 0.0


@triton.jit
def _token_loss_kernel(
    logits_ptr, stride_b, stride_t, T, dlogits_ptr, dstride_b, dstride_t, targets_ptr,
    old_logps_ptr, adv_ptr, ref_logps_ptr, weights_ptr,
    loss_ptr, logps_ptr, entropy_ptr, ratio_ptr, clipped_ptr, kl_ptr,
    N, V, inv_temp, epsilon_low, epsilon_high, clip_ratio_c, beta, ignore_index,
    epsilon_low_prime, epsilon_high_prime, weight_temperature, regularizer_coef,
    LOSS: tl.constexpr, DUAL_CLIP: tl.constexpr, KL: tl.constexpr, WRITE_GRAD: tl.constexpr,
    CLIP_MODE: tl.constexpr, WEIGHT: tl.constexpr, REGULARIZER: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    groups = tl.cdiv(N, ROWS)
    for group in range(tl.program_id(0), groups, tl.num_programs(0)):  # persistent: a row group at a time
        rows = (group * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # group * ROWS <= N < 2**31
        row_valid = rows < N
        row_ptrs = logits_ptr + (rows // T) * stride_b + (rows % T) * stride_t
        target = tl.load(targets_ptr + rows, mask=row_valid, other=ignore_index)
        # Pass 1 over the rows.
        m, log_s, row_entropy, _ = _rows_stats(row_ptrs, row_valid, V, inv_temp, True, False, ROWS, BLOCK_V)
        keep, logp = _target_logps(row_ptrs, row_valid, target, m, log_s, inv_temp, V, ignore_index)
        entropy = tl.where(keep, row_entropy, 0.0)
        # The token loss and its derivative; masked tokens (weight 0) are zeroed first, as in policy_loss.
        weight = tl.load(weights_ptr + rows, mask=row_valid, other=0.0)
        active = weight != 0.0
        lp = tl.where(active, logp, 0.0)
        old = tl.where(active, tl.load(old_logps_ptr + rows, mask=row_valid, other=0.0), 0.0)
        adv = tl.where(active, tl.load(adv_ptr + rows, mask=row_valid, other=0.0), 0.0)
        ratio = tl.exp(lp - old)
        if LOSS == 0:
            unclipped = -adv * ratio
            clipped_loss = -adv * tl.minimum(tl.maximum(ratio, 1.0 - epsilon_low), 1.0 + epsilon_high)
            loss = tl.maximum(unclipped, clipped_loss)
            clipped = clipped_loss > unclipped
            grad = tl.where(clipped, 0.0, -adv * ratio)
            if DUAL_CLIP:
                cap = -adv * clip_ratio_c
                dual = (adv < 0) & (loss > cap)
                loss = tl.where(dual, cap, loss)
                grad = tl.where(dual, 0.0, grad)
                clipped = clipped | dual
        elif LOSS == 1:
            negative = adv < 0
            alpha = tl.where(negative, tl.minimum(tl.maximum(ratio, 0.0), 1.0), 1.0)
            loss = -alpha * adv * lp
            grad = -alpha * adv
            clipped = negative & (ratio < 1.0)
        elif LOSS == 2:
            low = 1.0 - epsilon_low
            high = 1.0 + epsilon_high
            if CLIP_MODE == 1:
                keep_token = ((adv >= 0) & (ratio <= high)) | ((adv <= 0) & (ratio >= low))
            elif CLIP_MODE == 2:
                keep_token = (ratio >= low) & (ratio <= high)
            elif CLIP_MODE == 3:
                band = (ratio >= low) & (ratio <= high)
                keep_token = band | ((adv >= 0) & (ratio <= 1.0 - epsilon_low_prime)) | \
                    ((adv <= 0) & (ratio >= 1.0 + epsilon_high_prime))
            else:
                keep_token = (ratio == ratio) | (ratio != ratio)  # every token, a NaN ratio too
            weighted = adv
            if WEIGHT == 1:
                weighted = adv * ratio
            elif WEIGHT == 2:
                weighted = adv * tl.minimum(tl.maximum(ratio, 1.0 - epsilon_low_prime), 1.0 + epsilon_high_prime)
            elif WEIGHT == 3:
                weighted = adv * tl.exp(adv / weight_temperature)
            loss = tl.where(keep_token, -weighted * lp, 0.0)
            grad = tl.where(keep_token, -weighted, 0.0)
            if REGULARIZER == 1:
                loss = loss + regularizer_coef * (lp - old) * (lp - old)
                grad = grad + 2.0 * regularizer_coef * (lp - old)
            elif REGULARIZER == 2:
                loss = loss - regularizer_coef * lp
                grad = grad - regularizer_coef
            clipped = ~keep_token
        else:
            cap = 1.0 + epsilon_high
            capped = tl.minimum(ratio, cap)
            loss = -capped * adv * lp
            grad = -capped * adv
            clipped = ratio > cap
        kl = tl.zeros((ROWS,), tl.float32)
        if KL != 0:
            diff = lp - tl.where(active, tl.load(ref_logps_ptr + rows, mask=row_valid, other=0.0), 0.0)
            if KL == 1:
                kl = diff
                dkl = tl.full((ROWS,), 1.0, tl.float32)
            elif KL == 2:
                kl = 0.5 * diff * diff
                dkl = diff
            else:
                kl = tl.exp(-diff) + diff - 1.0
                dkl = 1.0 - tl.exp(-diff)
            loss = loss + beta * kl
            grad = grad + beta * dkl
        tl.store(loss_ptr + rows, tl.where(active, loss, 0.0), mask=row_valid)
        tl.store(logps_ptr + rows, logp, mask=row_valid)
        tl.store(entropy_ptr + rows, entropy, mask=row_valid)
        tl.store(ratio_ptr + rows, ratio, mask=row_valid)
        tl.store(clipped_ptr + rows, tl.where(active & clipped, 1.0, 0.0), mask=row_valid)
        tl.store(kl_ptr + rows, tl.where(active, kl, 0.0), mask=row_valid)
        if WRITE_GRAD:
            # Pass 2 over the same rows (still in L2): d(loss)/d(logits) = w·g·([v = y] - p_v) / T, the
            # log-prob's gradient with upstream w·g; a masked row (even all -inf) writes exact zeros.
            drow_ptrs = dlogits_ptr + (rows // T) * dstride_b + (rows % T) * dstride_t
            zeros = tl.zeros((ROWS,), tl.float32)
            _rows_dlogits(row_ptrs, drow_ptrs, row_valid, target, m, log_s, zeros,
                          tl.where(active, weight * grad, 0.0), zeros, zeros, V, inv_temp, False, False, ROWS,
                          BLOCK_V)


def token_loss_forward(logits, targets, old_logps, advantages, ref_logps, weights, params: TokenLossParams,
                       temperature: float, dlogits: Optional[torch.Tensor]):
    """Launch the kernel once. Returns a dict of (N,) float32 per-token tensors (``loss``, ``logps``,
    ``entropy``, ``ratio``, ``clipped``, ``kl``) and the (B, T, V) logits view; d(logits) goes into
    ``dlogits`` (shaped like the view) unless it is None, in which case the second sweep is compiled out."""
    view = _as_3d(logits)
    batch, seq, vocab = view.shape
    n_rows = batch * seq
    names = ("loss", "logps", "entropy", "ratio", "clipped", "kl")
    outs = {name: torch.empty(n_rows, device=logits.device, dtype=torch.float32) for name in names}
    rows = [t.reshape(-1).float().contiguous() for t in (old_logps, advantages, weights)]
    ref = rows[0] if ref_logps is None else ref_logps.reshape(-1).float().contiguous()
    kl = KL_ESTIMATORS[params.kl_estimator] if ref_logps is not None else 0
    target = dlogits if dlogits is not None else view
    cfg = launch.token_loss_config(launch.target_of(logits.device), logits.dtype, vocab)
    if not n_rows:
        return outs, view
    _token_loss_kernel[(cfg.programs(triton.cdiv(n_rows, cfg.constexprs["ROWS"])),)](
        view, view.stride(0), view.stride(1), seq, target, target.stride(0), target.stride(1),
        targets.reshape(-1).contiguous(), rows[0], rows[1], ref, rows[2], *outs.values(),
        n_rows, vocab, 1.0 / temperature, float(params.epsilon_low), float(params.epsilon_high),
        float(params.clip_ratio_c or 0.0), float(params.beta), IGNORE_INDEX,
        float(params.epsilon_low_prime), float(params.epsilon_high_prime), float(params.weight_temperature),
        float(params.regularizer_coef),
        LOSS=TOKEN_LOSSES[params.loss_type], DUAL_CLIP=params.clip_ratio_c is not None, KL=kl,
        WRITE_GRAD=dlogits is not None, CLIP_MODE=CLIP_MODES[params.clip_mode], WEIGHT=WEIGHTS[params.weight],
        REGULARIZER=REGULARIZERS[params.regularizer], **cfg.launch_kwargs(),
    )
    return outs, view


class TokenLossFunction(torch.autograd.Function):
    """``apply(logits, targets, old_logps, advantages, ref_logps, weights, params, temperature,
    inplace_backward, aux) -> loss``; the per-token tensors land in ``aux``. Used only when the logits need
    a gradient.

    d(logits) is written during the forward (same kernel); the backward only scales it by the incoming
    gradient, and skips that pass when the gradient is exactly 1.
    """

    @staticmethod
    def forward(ctx, logits, targets, old_logps, advantages, ref_logps, weights, params, temperature,
                inplace_backward, aux):
        dlogits = _as_3d(logits) if inplace_backward else torch.empty_like(_as_3d(logits))
        outs, _ = token_loss_forward(logits, targets, old_logps, advantages, ref_logps, weights, params,
                                     temperature, dlogits)
        aux.update({name: t.view(targets.shape) for name, t in outs.items()})
        ctx.save_for_backward(dlogits)
        ctx.shape = logits.shape
        return (weights.reshape(-1).float() * outs["loss"]).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogits,) = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            dlogits.mul_(grad_loss.to(dlogits.dtype))
        return (dlogits.reshape(ctx.shape),) + (None,) * 9


def fused_token_loss(logits: torch.Tensor, targets: torch.Tensor, old_logps: torch.Tensor,
                     advantages: torch.Tensor, weights: torch.Tensor, params: TokenLossParams,
                     ref_logps: Optional[torch.Tensor] = None, temperature: float = 1.0,
                     inplace_backward: bool = False):
    """sum_t w_t·l_t for a token-local loss, in one kernel launch over the logits.

    Args:
        logits: (B, T, V) float32/bf16/fp16 on the GPU (or the CPU under ``TRITON_INTERPRET=1``); strided
            views such as ``logits[:, :-1]`` are read in place.
        targets: (B, T) int64 token ids (-100 skipped).
        old_logps, advantages, weights: (B, T) float; ``weights`` is 0 on masked tokens and holds the
            aggregation weight elsewhere (see ``rlfuse.algos.aggregation_weights``).
        params: the loss's scalars (:class:`TokenLossParams`).
        ref_logps: (B, T) float, or None (then no KL term and ``kl`` is 0).
        temperature: divides the logits.
        inplace_backward: write d(logits) into the logits' storage.

    Returns:
        ``(loss, per_token)``: the scalar float32 loss (differentiable w.r.t. ``logits`` only), and a dict
        of detached (B, T) float32 tensors ``loss``, ``logps``, ``entropy``, ``ratio``, ``clipped`` (0/1),
        ``kl``. Under ``torch.no_grad()``, or for logits that need no gradient, d(logits) is neither formed
        nor written and nothing is saved.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        outs, _ = token_loss_forward(logits, targets, old_logps, advantages, ref_logps, weights, params,
                                     float(temperature), None)
        per_token = {name: t.view(targets.shape) for name, t in outs.items()}
        return (weights.reshape(-1).float() * outs["loss"]).sum(), per_token
    aux: Dict[str, torch.Tensor] = {}
    loss = TokenLossFunction.apply(logits, targets, old_logps, advantages, ref_logps, weights, params,
                                   float(temperature), inplace_backward, aux)
    return loss, aux


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    """Run the wrapper's launches on meta tensors (``bench.compiled`` captures them): every loss with a k3 KL,
    and REC with its most involved dials (ring, truncated weight, k2), with and without d(logits), over a
    ``logits[:, :-1]`` view."""
    seq = min(n_rows, 1024)
    batch = max(1, n_rows // seq)
    logits = torch.empty(batch, seq + 1, vocab, dtype=dtype, device="meta")[:, :-1]
    targets = torch.empty(batch, seq, dtype=torch.int64, device="meta")
    per_token = [torch.empty(batch, seq, device="meta") for _ in range(4)]
    for loss_type in TOKEN_LOSSES:
        rec = loss_type == "rec"
        params = TokenLossParams(loss_type, clip_ratio_c=3.0 if loss_type == "ppo_clip" else None,
                                 clip_mode="ring" if rec else "none",
                                 weight="truncated_importance_sampling" if rec else "none",
                                 regularizer="k2" if rec else "none", regularizer_coef=0.1)
        for dlogits in (torch.empty_like(logits), None):
            token_loss_forward(logits, targets, *per_token[:2], per_token[2], per_token[3], params, 0.7, dlogits)

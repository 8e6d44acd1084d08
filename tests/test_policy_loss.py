"""rlfuse.algos.policy_loss against an independent float64 oracle.

The oracle walks every token with Python float64 scalars (``math``), computes the token loss, its
closed-form derivative d loss_t / d logp_t (all the algorithms' token losses depend on logp_t only
through that token, GSPO's stop-gradients included), the clip flags, ratio and KL, then aggregates with
explicit per-token weights w_bt so that loss = sum w·l and d loss / d logp_bt = w_bt · d l_bt / d logp_bt.
Masked tokens are never read, so NaN there is never seen by the oracle. Inputs are drawn on the CPU and
moved to the ``device`` fixture's device; the oracle's results stay on the CPU.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlfuse.algos import (
    ALGO_CONFIGS,
    DAPOConfig,
    DrGRPOConfig,
    GRPOConfig,
    GSPOConfig,
    ROVERConfig,
    TOPRConfig,
    policy_loss,
)

F64 = torch.float64
RTOL, ATOL = 1e-5, 1e-6
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
PPO_FAMILY = [GRPOConfig, DrGRPOConfig, DAPOConfig, GSPOConfig]
# The off-policy family (REC, CISPO, GMPO) has its own oracle in test_offpolicy_losses.py.
ALL_ALGOS = sorted(a for a in ALGO_CONFIGS if ALGO_CONFIGS[a]().loss_type in ("ppo_clip", "topr", "rover"))


# --------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------


def _rows(t):
    return None if t is None else t.detach().to(F64).tolist()


def oracle(logps, old_logps, advantages, mask, cfg, ref_logps=None, vocab_mean=None, old_vocab_mean=None):
    """Returns (loss, grad (B, T) float64, metrics dict of floats or None) per the SPEC."""
    lp, old, ref = _rows(logps), _rows(old_logps), _rows(ref_logps)
    vm, ovm = _rows(vocab_mean), _rows(old_vocab_mean)
    m = [[bool(x) for x in row] for row in mask.tolist()]
    adv = advantages.detach().to(F64).tolist()
    B, T = len(lp), len(lp[0])

    def A(b, t):
        return adv[b] if advantages.dim() == 1 else adv[b][t]

    loss_tok = [[0.0] * T for _ in range(B)]
    dl_tok = [[0.0] * T for _ in range(B)]
    clipped = [[False] * T for _ in range(B)]
    ratio = [[0.0] * T for _ in range(B)]
    kl = [[0.0] * T for _ in range(B)]

    for b in range(B):
        live = [t for t in range(T) if m[b][t]]
        # per-sequence quantities
        if cfg.loss_type == "ppo_clip" and cfg.importance_sampling_level == "sequence":
            mean_lr = math.fsum(lp[b][t] - old[b][t] for t in live) / len(live) if live else 0.0
            seq_ratio = math.exp(mean_lr)
        elif cfg.loss_type == "topr" and cfg.importance_sampling_level == "sequence":
            seq_ratio = math.exp(math.fsum(lp[b][t] - old[b][t] for t in live))
        else:
            seq_ratio = None
        for t in live:
            a = A(b, t)
            if cfg.loss_type == "ppo_clip":
                r = seq_ratio if seq_ratio is not None else math.exp(lp[b][t] - old[b][t])
                # d r / d logp_t = r in both cases (GSPO: exp(logp - sg(logp) + sg(log s)))
                unc = -a * r
                clp = -a * min(max(r, 1.0 - cfg.epsilon_low), 1.0 + cfg.epsilon_high)
                if clp > unc:
                    l, d, c = clp, 0.0, True
                else:
                    l, d, c = unc, -a * r, False
                if cfg.clip_ratio_c is not None and a < 0 and -a * cfg.clip_ratio_c < l:
                    l, d, c = -a * cfg.clip_ratio_c, 0.0, True
            elif cfg.loss_type == "topr":
                r = seq_ratio if seq_ratio is not None else math.exp(lp[b][t] - old[b][t])
                alpha = 1.0 if a >= 0 else min(max(r, 0.0), 1.0)
                l, d, c = -alpha * a * lp[b][t], -alpha * a, (a < 0 and r < 1.0)
            elif cfg.loss_type == "rover":
                r = math.exp(lp[b][t] - old[b][t])
                q = cfg.rho * (lp[b][t] - old[b][t])
                nxt = 0.0
                if t + 1 < T and m[b][t + 1]:
                    nxt = cfg.rho * (vm[b][t + 1] - ovm[b][t + 1])
                target = a + nxt
                l, d, c = (q - target) ** 2, 2.0 * (q - target) * cfg.rho, False
            else:
                raise AssertionError(cfg.loss_type)
            if ref is not None:
                x = lp[b][t] - ref[b][t]
                if cfg.kl_estimator == "k1":
                    k, dk = x, 1.0
                elif cfg.kl_estimator == "k2":
                    k, dk = 0.5 * x * x, x
                else:
                    k, dk = math.exp(-x) + x - 1.0, 1.0 - math.exp(-x)
                kl[b][t] = k
                if cfg.beta > 0:
                    l += cfg.beta * k
                    d += cfg.beta * dk
            loss_tok[b][t], dl_tok[b][t], clipped[b][t], ratio[b][t] = l, d, c, r

    # aggregation weights
    n_tok = [sum(row) for row in m]
    n_all = sum(n_tok)
    n_seq = sum(1 for n in n_tok if n > 0)
    w = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not m[b][t]:
                continue
            if cfg.loss_agg_mode == "token-mean":
                w[b][t] = 1.0 / n_all
            elif cfg.loss_agg_mode == "seq-mean-token-mean":
                w[b][t] = 1.0 / (n_tok[b] * n_seq)
            elif cfg.loss_agg_mode == "seq-mean-token-sum":
                w[b][t] = 1.0 / n_seq
            elif cfg.loss_agg_mode == "seq-mean-token-sum-norm":
                w[b][t] = 1.0 / (B * T)
            else:
                raise AssertionError(cfg.loss_agg_mode)
    cells = [(b, t) for b in range(B) for t in range(T) if m[b][t]]
    loss = math.fsum(w[b][t] * loss_tok[b][t] for b, t in cells)
    grad = torch.tensor([[w[b][t] * dl_tok[b][t] for t in range(T)] for b in range(B)], dtype=F64)

    def tok_mean(vals):
        return math.fsum(vals[b][t] for b, t in cells) / n_all if n_all else 0.0

    metrics = {
        "clip_frac": tok_mean([[float(c) for c in row] for row in clipped]),
        "kl": tok_mean(kl) if ref is not None else None,
        "ratio_mean": tok_mean(ratio),
    }
    # for tests that want to check coverage of branches
    info = {"clipped": sum(clipped[b][t] for b, t in cells), "tokens": n_all}
    return loss, grad, metrics, info


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def make_mask(B, T, kind, gen):
    if kind == "full":
        mask = torch.ones(B, T, dtype=torch.bool)
    elif kind == "all_masked":
        mask = torch.zeros(B, T, dtype=torch.bool)
    else:
        mask = torch.rand(B, T, generator=gen) < 0.7
        mask[:, 0] = True
        if kind == "row_masked" and B >= 2:
            mask[1] = False  # one sequence with no completion token
        elif kind == "padded":  # right padding: lengths 1..T
            lengths = torch.randint(1, T + 1, (B,), generator=gen)
            mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return mask


def make_inputs(B=4, T=5, adv_shape="B", mask_kind="row_masked", seed=0, spread=0.3, with_ref=True,
                with_vocab_mean=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logps = -(torch.rand(B, T, generator=gen) * 3 + 0.05)
    old = logps + torch.randn(B, T, generator=gen) * spread
    ref = logps + torch.randn(B, T, generator=gen) * spread if with_ref else None
    if adv_shape == "B":
        adv = torch.randn(B, generator=gen)
    else:
        adv = torch.randn(B, T, generator=gen)
    mask = make_mask(B, T, mask_kind, gen)
    vm = ovm = None
    if with_vocab_mean:
        vm = -(torch.rand(B, T, generator=gen) * 2 + 6)
        ovm = vm + torch.randn(B, T, generator=gen) * 0.2
    inputs = dict(logps=logps, old_logps=old, advantages=adv, completion_mask=mask, ref_logps=ref, vocab_mean=vm,
                  old_vocab_mean=ovm)
    inputs = {name: None if value is None else value.to(device) for name, value in inputs.items()}
    inputs["logps"].requires_grad_(True)
    return inputs


def run_both(inp, cfg, rtol=RTOL, atol=ATOL):
    """Run the package and the oracle; compare loss, d loss / d logps and the metrics. Returns oracle info."""
    kw = dict(inp)
    logps = kw.pop("logps")
    old, adv, mask = kw.pop("old_logps"), kw.pop("advantages"), kw.pop("completion_mask")
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg, **kw)
    want_loss, want_grad, want_metrics, info = oracle(logps, old, adv, mask, cfg, kw.get("ref_logps"),
                                                      kw.get("vocab_mean"), kw.get("old_vocab_mean"))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach().to("cpu", F64), torch.tensor(want_loss, dtype=F64), rtol=rtol, atol=atol)
    (grad,) = torch.autograd.grad(loss, logps, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(logps)
    torch.testing.assert_close(grad.to("cpu", F64), want_grad, rtol=rtol, atol=atol)
    assert set(metrics) >= {"clip_frac", "kl", "ratio_mean"}
    for name, want in want_metrics.items():
        got = metrics[name]
        if want is None:
            assert got is None, name
            continue
        assert isinstance(got, torch.Tensor) and got.dim() == 0, name
        assert not got.requires_grad, name
        torch.testing.assert_close(got.to("cpu", F64), torch.tensor(want, dtype=F64), rtol=rtol, atol=atol,
                                   msg=lambda s, n=name: f"metric {n}: {s}")
    return info, loss, grad


def cfg_of(algo, **changes):
    return ALGO_CONFIGS[algo]().replace(**changes)


# --------------------------------------------------------------------------------------------------
# The main matrix: every algorithm x every aggregation x both advantage shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_every_algo_every_aggregation(algo, agg, adv_shape, device):
    cfg = cfg_of(algo, loss_agg_mode=agg)
    seed = ALL_ALGOS.index(algo) * 10 + AGG_MODES.index(agg) + (100 if adv_shape == "BT" else 0)
    inp = make_inputs(device=device, B=4, T=6, adv_shape=adv_shape, mask_kind="row_masked", seed=seed)
    info, _, _ = run_both(inp, cfg)
    assert info["tokens"] > 0


@pytest.mark.parametrize("mask_kind", ["full", "random", "padded", "row_masked"])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 7), (3, 1), (8, 7)])
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_shapes_and_masks(algo, B, T, mask_kind, device):
    seed = 1000 + ALL_ALGOS.index(algo) * 100 + B * 10 + T
    inp = make_inputs(device=device, B=B, T=T, adv_shape="B", mask_kind=mask_kind, seed=seed)
    run_both(inp, cfg_of(algo))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8], ids=str)
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_mask_may_be_bool_or_0_1(algo, mask_dtype, device):
    inp = make_inputs(device=device, B=3, T=5, mask_kind="random", seed=77 + ALL_ALGOS.index(algo))
    inp["completion_mask"] = inp["completion_mask"].to(mask_dtype)
    run_both(inp, cfg_of(algo, loss_agg_mode="seq-mean-token-mean"))


# --------------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.04, 1.0])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_kl_estimators(algo, estimator, beta, device):
    cfg = cfg_of(algo, kl_estimator=estimator, beta=beta)
    inp = make_inputs(device=device, B=3, T=6, adv_shape="BT", mask_kind="random",
                      seed=300 + ALL_ALGOS.index(algo) * 10 + int(beta * 100), spread=0.6)
    run_both(inp, cfg)


@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_beta_changes_loss_only_through_kl(algo, device):
    """loss(beta) - loss(0) equals beta · aggregated KL (a cross-check that does not use the oracle's loss)."""
    inp = make_inputs(device=device, B=3, T=4, mask_kind="random", seed=5)
    base = cfg_of(algo, loss_agg_mode="token-mean", kl_estimator="k3")
    args = (inp["logps"], inp["old_logps"], inp["advantages"], inp["completion_mask"])
    extra = dict(ref_logps=inp["ref_logps"], vocab_mean=inp["vocab_mean"], old_vocab_mean=inp["old_vocab_mean"])
    l0, m0 = policy_loss(*args, config=base, **extra)
    l1, m1 = policy_loss(*args, config=base.replace(beta=0.3), **extra)
    torch.testing.assert_close(m0["kl"], m1["kl"])
    assert m1["kl"].item() > 0  # k3 is positive for any logp != ref
    torch.testing.assert_close((l1 - l0).detach(), 0.3 * m1["kl"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_beta_without_ref_raises(algo, device):
    inp = make_inputs(device=device, B=2, T=3, with_ref=False)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(inp["logps"], inp["old_logps"], inp["advantages"], inp["completion_mask"],
                    config=cfg_of(algo, beta=0.1), vocab_mean=inp["vocab_mean"], old_vocab_mean=inp["old_vocab_mean"])


# --------------------------------------------------------------------------------------------------
# PPO clip, dual clip, GSPO
# --------------------------------------------------------------------------------------------------


def wide_ratio_inputs(B, T, seed, adv_shape="B", device="cpu"):
    """Per-row log-ratio offsets spanning strongly-below to strongly-above 1, both advantage signs."""
    inp = make_inputs(device=device, B=B, T=T, adv_shape=adv_shape, mask_kind="random", seed=seed, spread=0.05)
    offsets = torch.tensor([-2.0, -0.6, -0.05, 0.05, 0.6, 2.0, 1.3, -1.3], device=device)[:B]
    with torch.no_grad():
        inp["old_logps"] = inp["logps"].detach() - offsets.unsqueeze(1) + inp["old_logps"] - inp["logps"].detach()
    adv = inp["advantages"]
    signs = torch.tensor([1.0, -1.0] * 4, device=device)[:B]
    inp["advantages"] = adv.abs() * (signs if adv.dim() == 1 else signs.unsqueeze(1))
    return inp


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("c", [None, 1.5, 3.0])
@pytest.mark.parametrize("cfg_cls", PPO_FAMILY, ids=lambda c: c.__name__)
def test_ppo_clip_and_dual_clip(cfg_cls, c, adv_shape, device):
    cfg = cfg_cls().replace(clip_ratio_c=c, epsilon_low=0.2, epsilon_high=0.28, loss_agg_mode="token-mean")
    inp = wide_ratio_inputs(8, 5, device=device, seed=PPO_FAMILY.index(cfg_cls) + int((c or 0) * 10),
                            adv_shape=adv_shape)
    info, loss, grad = run_both(inp, cfg)
    # the inputs really exercise the clip (and not everything is clipped)
    assert 0 < info["clipped"] < info["tokens"]


@pytest.mark.parametrize("cfg_cls", PPO_FAMILY, ids=lambda c: c.__name__)
def test_dual_clip_caps_negative_advantage_loss(cfg_cls, device):
    """With A < 0 and a huge ratio, the token loss is exactly -A·c and carries no gradient."""
    B, T, c = 2, 4, 3.0
    logps = torch.full((B, T), -1.0, device=device).requires_grad_(True)
    old = logps.detach() - torch.tensor([[2.0], [0.0]], device=device)  # ratio e^2 ≈ 7.39 > c in row 0, 1 in row 1
    gen = torch.Generator().manual_seed(3)
    adv = torch.tensor([-0.5 - torch.rand(1, generator=gen).item(), -0.7], device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    cfg = cfg_cls().replace(clip_ratio_c=c, loss_agg_mode="token-mean")
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg)
    a0, a1 = adv.tolist()
    want = (T * (-a0 * c) + T * (-a1 * 1.0)) / (B * T)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logps)
    assert torch.count_nonzero(grad[0]).item() == 0
    torch.testing.assert_close(grad[1], torch.full((T,), -a1 / (B * T), device=device))
    assert metrics["clip_frac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.5, 0.5)], ids=["gspo_default_eps", "wide_eps"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_gradient_uses_sequence_ratio(eps, agg, device):
    cfg = GSPOConfig().replace(epsilon_low=eps[0], epsilon_high=eps[1], loss_agg_mode=agg)
    inp = make_inputs(device=device, B=4, T=6, adv_shape="B", mask_kind="row_masked", seed=11 + AGG_MODES.index(agg),
                      spread=0.3)
    info, _, grad = run_both(inp, cfg)
    if eps[0] == 0.5:
        # nothing is clipped: in each row d loss/d logp_t / w_t = -A·s, the same s for every token
        # (whereas token-level PPO would give -A·r_t, different per token)
        assert info["clipped"] == 0
        lp, old, mask, adv = inp["logps"].detach(), inp["old_logps"], inp["completion_mask"], inp["advantages"]
        for b in range(lp.shape[0]):
            live = mask[b].nonzero().flatten().tolist()
            if not live:
                assert torch.count_nonzero(grad[b]).item() == 0
                continue
            s = math.exp(sum(float(lp[b, t] - old[b, t]) for t in live) / len(live))
            g = grad[b, live].to(F64)
            # every aggregation weighs the tokens of one row equally, so the row's gradient is constant
            assert torch.allclose(g, g[0].expand_as(g), rtol=1e-5, atol=1e-7)
            r_tok = torch.exp((lp[b, live] - old[b, live]).to(F64))
            assert not torch.allclose(r_tok, torch.full_like(r_tok, s), rtol=1e-3)  # token ratios do differ
            assert g.sign().eq(-math.copysign(1.0, float(adv[b]))).all()


@pytest.mark.parametrize("adv_seed", [0, 1, 2])
def test_gspo_equals_grpo_on_policy(adv_seed, device):
    # With one policy iteration per batch, old log-probs equal the current ones: every ratio is 1, nothing is
    # clipped, and GSPO's gradient A_i / |o_i| * sum_t grad log p_t is GRPO's under seq-mean-token-mean. (This is
    # why rlfuse compare's grpo and gspo runs coincide at --num-iterations 1.) Off-policy they differ.
    assert GRPOConfig().loss_agg_mode == GSPOConfig().loss_agg_mode == "seq-mean-token-mean"
    inp = make_inputs(device=device, B=5, T=7, adv_shape="B", mask_kind="row_masked", seed=40 + adv_seed)
    logps = inp["logps"].detach().to(F64)
    adv, mask = inp["advantages"].to(F64), inp["completion_mask"]

    def loss_and_grad(cfg, old):
        x = logps.clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, adv, mask, config=cfg)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    for old, same in ((logps.clone(), True), (inp["old_logps"].to(F64), False)):
        grpo, gspo = loss_and_grad(GRPOConfig(), old), loss_and_grad(GSPOConfig(), old)
        if same:
            torch.testing.assert_close(gspo[0], grpo[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gspo[1], grpo[1], rtol=1e-12, atol=1e-12)
        else:
            assert not torch.allclose(gspo[1], grpo[1], rtol=1e-3, atol=1e-6)


def test_gspo_fully_masked_row_is_harmless(device):
    inp = make_inputs(device=device, B=3, T=4, mask_kind="row_masked", seed=4)
    with torch.no_grad():
        inp["old_logps"][1] = inp["old_logps"][1] + 50  # would be a huge ratio if the masked row counted
    info, _, grad = run_both(inp, GSPOConfig().replace(epsilon_low=0.5, epsilon_high=0.5))
    assert torch.count_nonzero(grad[1]).item() == 0


# --------------------------------------------------------------------------------------------------
# TOPR
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_topr(level, agg, adv_shape, device):
    cfg = TOPRConfig().replace(importance_sampling_level=level, loss_agg_mode=agg)
    inp = wide_ratio_inputs(8, 4, device=device, seed=50 + AGG_MODES.index(agg), adv_shape=adv_shape)
    if adv_shape == "BT":
        inp["advantages"][0, 1] = 0.0  # A = 0 counts as non-negative
    info, _, _ = run_both(inp, cfg)
    assert 0 < info["clipped"] < info["tokens"]


def test_topr_sequence_ratio_is_a_sum_not_a_mean(device):
    """Log ratio -0.3 on each of 3 tokens: a mean would taper by e^-0.3, the trajectory ratio (sum) by e^-0.9."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]], device=device).requires_grad_(True)
    old = logps.detach() + 0.3  # log ratio -0.3 per token
    adv = torch.tensor([-1.0], device=device)
    mask = torch.ones(1, 3, dtype=torch.bool, device=device)
    cfg = TOPRConfig().replace(importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-sum")
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg)
    alpha = math.exp(-0.9)
    assert loss.item() == pytest.approx(alpha * (-1.0 - 2.0 - 0.5), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.full((1, 3), alpha, device=device))
    assert metrics["ratio_mean"].item() == pytest.approx(alpha, rel=1e-5)
    assert metrics["clip_frac"].item() == 1.0


# --------------------------------------------------------------------------------------------------
# ROVER
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["full", "random", "padded", "row_masked"])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0])
def test_rover(rho, adv_shape, mask_kind, device):
    cfg = ROVERConfig().replace(rho=rho)
    inp = make_inputs(device=device, B=4, T=6, adv_shape=adv_shape, mask_kind=mask_kind,
                      seed=int(rho * 10) + len(mask_kind))
    info, _, _ = run_both(inp, cfg)
    assert info["clipped"] == 0


def test_rover_gives_no_gradient_to_vocab_means(device):
    inp = make_inputs(device=device, B=3, T=5, seed=8)
    vm = inp["vocab_mean"].clone().requires_grad_(True)
    ovm = inp["old_vocab_mean"].clone().requires_grad_(True)
    loss, _ = policy_loss(inp["logps"], inp["old_logps"], inp["advantages"], inp["completion_mask"],
                          config=ROVERConfig().replace(rho=1.5), vocab_mean=vm, old_vocab_mean=ovm)
    grads = torch.autograd.grad(loss, [vm, ovm], allow_unused=True)
    for g in grads:
        assert g is None or torch.count_nonzero(g).item() == 0


@pytest.mark.parametrize("missing", ["vocab_mean", "old_vocab_mean", "both"])
def test_rover_without_vocab_mean_raises(missing, device):
    inp = make_inputs(device=device, B=2, T=3)
    kw = {"vocab_mean": inp["vocab_mean"], "old_vocab_mean": inp["old_vocab_mean"]}
    for k in (["vocab_mean", "old_vocab_mean"] if missing == "both" else [missing]):
        kw[k] = None
    with pytest.raises(ValueError, match="vocab_mean"):
        policy_loss(inp["logps"], inp["old_logps"], inp["advantages"], inp["completion_mask"],
                    config=ROVERConfig(), **kw)


# --------------------------------------------------------------------------------------------------
# Masked positions, empty batches, metrics
# --------------------------------------------------------------------------------------------------

NAN_FIELDS = ["logps", "old_logps", "ref_logps", "advantages", "vocab_mean", "old_vocab_mean"]


def put_nan_on_masked(inp, field):
    mask = inp["completion_mask"]
    with torch.no_grad():
        if field == "logps":
            inp["logps"] = torch.where(mask, inp["logps"].detach(), float("nan")).requires_grad_(True)
        else:
            inp[field] = torch.where(mask, inp[field], float("nan"))
    return inp


def _nan_value_params():
    out = []
    for algo in ALL_ALGOS:
        for field in NAN_FIELDS:
            if field in ("vocab_mean", "old_vocab_mean") and algo != "rover":
                continue
            out.append(pytest.param(algo, field, id=f"{algo}-{field}"))
    return out


@pytest.mark.parametrize("algo,field", _nan_value_params())
@pytest.mark.parametrize("agg", AGG_MODES)
def test_nan_on_masked_positions_does_not_touch_loss(algo, field, agg, device):
    cfg = cfg_of(algo, loss_agg_mode=agg, beta=0.1, kl_estimator="k3")
    inp = make_inputs(device=device, B=4, T=5, adv_shape="BT", mask_kind="padded", seed=21 + AGG_MODES.index(agg))
    inp["completion_mask"][0, -1] = False  # at least one padded position in a kept row
    inp = put_nan_on_masked(inp, field)
    kw = dict(inp)
    logps, old, adv, mask = (kw.pop(k) for k in ("logps", "old_logps", "advantages", "completion_mask"))
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg, **kw)
    want_loss, want_grad, want_metrics, _ = oracle(logps, old, adv, mask, cfg, kw["ref_logps"], kw["vocab_mean"],
                                                   kw["old_vocab_mean"])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().to("cpu", F64), torch.tensor(want_loss, dtype=F64), rtol=RTOL, atol=ATOL)
    for name, want in want_metrics.items():
        torch.testing.assert_close(metrics[name].to("cpu", F64), torch.tensor(want, dtype=F64), rtol=RTOL, atol=ATOL)
    (grad,) = torch.autograd.grad(loss, logps)
    # gradient on the kept tokens is untouched by the NaN next door
    torch.testing.assert_close(grad[mask].to("cpu", F64), want_grad[mask.cpu()], rtol=RTOL, atol=ATOL)


def _nan_grad_params():
    out = []
    for algo in ALL_ALGOS:
        for field in ("logps", "old_logps", "advantages"):
            out.append(pytest.param(algo, field, id=f"{algo}-{field}"))
    return out


@pytest.mark.parametrize("algo,field", _nan_grad_params())
def test_nan_on_masked_positions_gives_zero_grad_there(algo, field, device):
    inp = make_inputs(device=device, B=3, T=5, adv_shape="BT", mask_kind="padded", seed=33, with_ref=False)
    inp["completion_mask"][0, -1] = False
    inp = put_nan_on_masked(inp, field)
    kw = dict(inp)
    logps, old, adv, mask = (kw.pop(k) for k in ("logps", "old_logps", "advantages", "completion_mask"))
    loss, _ = policy_loss(logps, old, adv, mask, config=cfg_of(algo), **kw)
    (grad,) = torch.autograd.grad(loss, logps)
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[~mask]).item() == 0


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_all_masked_batch_gives_zero(algo, agg, device):
    inp = make_inputs(device=device, B=3, T=4, mask_kind="all_masked", seed=2)
    kw = dict(inp)
    logps, old, adv, mask = (kw.pop(k) for k in ("logps", "old_logps", "advantages", "completion_mask"))
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg_of(algo, loss_agg_mode=agg, beta=0.2), **kw)
    assert loss.item() == 0.0
    for name in ("clip_frac", "kl", "ratio_mean"):
        assert metrics[name].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logps)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad).item() == 0


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_metrics_are_detached_scalars(algo, with_ref, device):
    inp = make_inputs(device=device, B=3, T=4, mask_kind="random", seed=6, with_ref=with_ref)
    kw = dict(inp)
    logps, old, adv, mask = (kw.pop(k) for k in ("logps", "old_logps", "advantages", "completion_mask"))
    # advantages / old / ref requiring grad must not leak into the metrics either
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    if with_ref:
        kw["ref_logps"] = kw["ref_logps"].clone().requires_grad_(True)
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg_of(algo, beta=0.1 if with_ref else 0.0), **kw)
    assert loss.requires_grad
    assert set(metrics) == {"clip_frac", "kl", "ratio_mean", "ratio_max"}
    for name, value in metrics.items():
        if name == "kl" and not with_ref:
            assert value is None
            continue
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert not value.requires_grad and value.grad_fn is None, name


# --------------------------------------------------------------------------------------------------
# Errors and configs
# --------------------------------------------------------------------------------------------------


def _base_args(B=3, T=4, device="cpu"):
    inp = make_inputs(device=device, B=B, T=T, seed=1)
    return dict(logps=inp["logps"], old_logps=inp["old_logps"], advantages=inp["advantages"],
                completion_mask=inp["completion_mask"], ref_logps=inp["ref_logps"],
                vocab_mean=inp["vocab_mean"], old_vocab_mean=inp["old_vocab_mean"])


@pytest.mark.parametrize(
    "name,shape",
    [("old_logps", (3, 5)), ("old_logps", (4, 4)), ("old_logps", (3,)), ("ref_logps", (3, 3)),
     ("completion_mask", (3, 5)), ("completion_mask", (3,)), ("advantages", (4,)), ("advantages", (3, 5)),
     ("advantages", (3, 4, 1)), ("advantages", (1,)), ("vocab_mean", (3, 5)), ("old_vocab_mean", (2, 4))],
)
@pytest.mark.parametrize("algo", ["grpo", "rover"])
def test_shape_mismatch_raises_naming_the_argument(algo, name, shape, device):
    args = _base_args(device=device)
    dtype = torch.bool if name == "completion_mask" else torch.float32
    args[name] = torch.ones(shape, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=name):
        policy_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("completion_mask"),
                    config=cfg_of(algo), **args)


@pytest.mark.parametrize("shape", [(12,), (3, 4, 1), ()], ids=str)
def test_logps_not_2d_raises(shape, device):
    logps = torch.randn(shape, device=device)
    with pytest.raises(ValueError, match="logps"):
        policy_loss(logps, logps.clone(), torch.randn(3, device=device),
                    torch.ones(shape, dtype=torch.bool, device=device), config=GRPOConfig())


@pytest.mark.parametrize("name", ["old_logps", "ref_logps", "advantages"])
def test_integer_dtype_raises_naming_the_argument(name, device):
    args = _base_args(device=device)
    args[name] = args[name].round().long()
    with pytest.raises(TypeError, match=name):
        policy_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("completion_mask"),
                    config=GRPOConfig(), **args)


def test_config_must_be_a_policy_loss_config(device):
    args = _base_args(device=device)
    with pytest.raises(TypeError, match="config"):
        policy_loss(args["logps"], args["old_logps"], args["advantages"], args["completion_mask"],
                    config={"loss_type": "ppo_clip"})


def test_device_mismatch_raises(device):
    if device.type != "cuda":
        pytest.skip("needs pytest --device cuda to put tensors on two devices")
    args = _base_args(device=device)
    with pytest.raises(ValueError, match="old_logps"):
        policy_loss(args["logps"], args["old_logps"].cpu(), args["advantages"], args["completion_mask"],
                    config=GRPOConfig())


@pytest.mark.parametrize("algo", ALL_ALGOS)
def test_configs_are_frozen_and_replace_works(algo):
    cfg = ALGO_CONFIGS[algo]()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0
    new = cfg.replace(beta=0.5, epsilon_low=None)
    assert type(new) is type(cfg) and new.beta == 0.5 and new.epsilon_low == cfg.epsilon_low
    assert dataclasses.replace(cfg, rho=2.0).rho == 2.0 and cfg.rho == 1.0


@pytest.mark.parametrize(
    "field,value",
    [("clip_ratio_c", 1.0), ("clip_ratio_c", 0.5), ("beta", -0.1), ("epsilon_low", 1.0), ("epsilon_high", -0.1),
     ("kl_estimator", "k4"), ("loss_agg_mode", "sum"), ("loss_type", "dpo"), ("importance_sampling_level", "batch"),
     ("rho", float("nan"))],
)
def test_invalid_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig().replace(**{field: value})

"""The off-policy family (REC, OPMD, AsymRE, RED, CISPO, GMPO) against a float64 oracle written from the papers.

The oracle walks every token with Python float64 scalars (``math``) and follows the formulas of
"Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm" as Trinity-RFT's ``rec`` loss states them (the
clip is a mask on -A·logp; weights and ratios are stop-gradient), TRL 1.16's ``cispo`` and TRL's experimental
GMPO trainer. It returns the loss, d loss / d logp in closed form, and the metrics. Token ratios are drawn from
every region the clip modes distinguish (below 1 - eps_low', between 1 - eps_low' and 1 - eps_low, the band,
between 1 + eps_high and 1 + eps_high', above it, above CISPO's cap), with advantages of both signs and zero.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.algos import (
    ALGO_CONFIGS,
    FusedLinearPolicyLoss,
    RECConfig,
    REINFORCEConfig,
    balanced_drop_advantages,
    compute_advantages,
    get_config,
    policy_loss,
    policy_loss_from_logits,
)

F64 = torch.float64
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
NEW_ALGOS = ["reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_drop", "red_weight", "cispo", "gmpo"]
CLIP_MODES = ["none", "one-side", "two-side", "ring", "gspo-one-side"]
WEIGHTS = ["none", "importance_sampling", "truncated_importance_sampling", "gspo_importance_sampling", "advantage"]
# Ratio regions: (lo, hi) bounds of r, chosen around 1 ± 0.2 (the clip), 0.4 and 3.0 (the ring) and 5.0 (CISPO).
REGIONS = [(0.15, 0.35), (0.45, 0.75), (0.85, 1.15), (1.3, 2.7), (3.3, 4.7), (5.5, 8.0)]
SAMPLED = REGIONS + [(0.85, 1.15)] * 3  # the band drawn as often as the rest together


# --------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------


def _in_range(cfg, r, s, a):
    """Trinity-RFT's rec ``is_in_range`` for one token, written out case by case."""
    lo, hi = 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high
    if cfg.clip_mode == "none":
        return True
    if cfg.clip_mode == "two-side":
        return lo <= r <= hi
    if cfg.clip_mode == "one-side":
        return (a >= 0 and r <= hi) or (a <= 0 and r >= lo)
    if cfg.clip_mode == "gspo-one-side":
        return (a >= 0 and s <= hi) or (a <= 0 and s >= lo)
    assert cfg.clip_mode == "ring"
    return (lo <= r <= hi) or (a >= 0 and r <= 1.0 - cfg.epsilon_low_prime) or (
        a <= 0 and r >= 1.0 + cfg.epsilon_high_prime)


def _rec_token(cfg, lp, old, a, s):
    """(loss, d loss / d logp, clipped, ratio) of one REC token."""
    r = math.exp(lp - old)
    keep = _in_range(cfg, r, s, a)
    w = {"none": 1.0, "importance_sampling": r, "gspo_importance_sampling": s,
         "truncated_importance_sampling": min(max(r, 1.0 - cfg.epsilon_low_prime), 1.0 + cfg.epsilon_high_prime),
         "advantage": math.exp(a / cfg.weight_temperature)}[cfg.weight]
    loss, grad = (-w * a * lp, -w * a) if keep else (0.0, 0.0)
    if cfg.regularizer == "k2":
        loss, grad = loss + cfg.regularizer_coef * (lp - old) ** 2, grad + 2 * cfg.regularizer_coef * (lp - old)
    elif cfg.regularizer == "forward-kl":
        loss, grad = loss - cfg.regularizer_coef * lp, grad - cfg.regularizer_coef
    return loss, grad, not keep, r


def _weights(m, mode):
    """Aggregation weights w_bt: loss = sum w·l over unmasked tokens."""
    B, T = len(m), len(m[0])
    counts = [sum(row) for row in m]
    total, seqs = sum(counts), sum(1 for c in counts if c)
    if mode == "token-mean":
        return [[1.0 / max(total, 1)] * T for _ in range(B)]
    if mode == "seq-mean-token-sum-norm":
        return [[1.0 / (B * T)] * T for _ in range(B)]
    if mode == "seq-mean-token-mean":
        return [[1.0 / (max(c, 1) * max(seqs, 1))] * T for c in counts]
    return [[1.0 / max(seqs, 1)] * T for _ in range(B)]


def oracle(logps, old_logps, advantages, mask, cfg):
    """float64 (loss, grad (B, T), clip_frac, ratio_mean, ratio_max) of ``cfg``'s loss."""
    lp, old = logps.detach().to(F64).tolist(), old_logps.detach().to(F64).tolist()
    m = [[bool(x) for x in row] for row in mask.tolist()]
    adv = advantages.detach().to(F64).tolist()
    B, T = len(lp), len(lp[0])
    A = (lambda b, t: adv[b]) if advantages.dim() == 1 else (lambda b, t: adv[b][t])
    w = _weights(m, cfg.loss_agg_mode)
    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    clipped, ratios = [], []
    for b in range(B):
        live = [t for t in range(T) if m[b][t]]
        if not live:
            continue
        mean_lr = math.fsum(lp[b][t] - old[b][t] for t in live) / len(live)
        s = math.exp(mean_lr)
        if cfg.loss_type == "gmpo":
            c = [min(lr, cfg.epsilon_high) if A(b, t) > 0 else max(lr, -cfg.epsilon_low)
                 for t, lr in ((t, lp[b][t] - old[b][t]) for t in live)]
            geo = math.exp(math.fsum(c) / len(live))
            weighted_adv = math.fsum(w[b][t] * A(b, t) for t in live)
            for t in live:
                lr, a = lp[b][t] - old[b][t], A(b, t)
                loss += w[b][t] * -a * geo
                free = lr < cfg.epsilon_high if a > 0 else lr > -cfg.epsilon_low
                grad[b][t] = -weighted_adv * geo / len(live) if free else 0.0
                clipped.append((a > 0 and lr > cfg.epsilon_high) or (a < 0 and lr < -cfg.epsilon_low))
                ratios.append(math.exp(lr))
            continue
        for t in live:
            a = A(b, t)
            if cfg.loss_type == "rec":
                l, d, c, r = _rec_token(cfg, lp[b][t], old[b][t], a, s)
            else:  # cispo
                r = s if cfg.importance_sampling_level == "sequence" else math.exp(lp[b][t] - old[b][t])
                weight = min(r, 1.0 + cfg.epsilon_high)
                l, d, c = -weight * a * lp[b][t], -weight * a, r > 1.0 + cfg.epsilon_high
            loss += w[b][t] * l
            grad[b][t] = w[b][t] * d
            clipped.append(c)
            ratios.append(r)
    n = max(len(ratios), 1)
    return (loss, torch.tensor(grad, dtype=F64), sum(clipped) / n, math.fsum(ratios) / n,
            max(ratios, default=0.0))


# --------------------------------------------------------------------------------------------------
# Inputs and comparison
# --------------------------------------------------------------------------------------------------


def make_inputs(B=6, T=12, seed=0, adv_shape="B", mask_kind="random", regions=SAMPLED):
    """logps (leaf, float32) whose ratios to old_logps fall in every region, advantages of both signs and 0."""
    g = torch.Generator().manual_seed(seed)
    old = -0.05 - 3.0 * torch.rand(B, T, generator=g, dtype=F64)
    which = torch.randint(0, len(regions), (B, T), generator=g)
    bounds = torch.tensor(regions, dtype=F64)
    u = torch.rand(B, T, generator=g, dtype=F64)
    ratio = bounds[which, 0] + u * (bounds[which, 1] - bounds[which, 0])
    logps = old + torch.log(ratio)
    shape = (B,) if adv_shape == "B" else (B, T)
    advantages = torch.randn(shape, generator=g, dtype=F64)
    advantages[0] = advantages[0].abs() + 0.1
    if B > 1:
        advantages[1] = -advantages[1].abs() - 0.1
    if B > 3:
        advantages[3] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.25 if mask_kind == "random" else torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = True
    if B > 4 and mask_kind == "random":
        mask[4] = False  # a fully masked row
    return logps.float().requires_grad_(True), old.float(), advantages.float(), mask


def check(cfg, logps, old, adv, mask):
    loss, metrics = policy_loss(logps, old, adv, mask, config=cfg)
    (grad,) = torch.autograd.grad(loss, logps)
    want, want_grad, clip_frac, ratio_mean, ratio_max = oracle(logps, old, adv, mask, cfg)
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(clip_frac, abs=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio_mean, rel=1e-5)
    assert metrics["ratio_max"].item() == pytest.approx(ratio_max, rel=1e-5)
    assert not grad[~mask].any()
    return loss, grad


# --------------------------------------------------------------------------------------------------
# REC: every clip mode, weight and regularizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("regularizer", [("none", 0.0), ("k2", 0.1), ("forward-kl", 0.3)], ids=str)
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_rec_dials_match_the_oracle(clip_mode, weight, regularizer, adv_shape):
    agg = "seq-mean-token-mean" if clip_mode == "gspo-one-side" else "token-mean"
    cfg = RECConfig().replace(clip_mode=clip_mode, weight=weight, regularizer=regularizer[0],
                              regularizer_coef=regularizer[1], weight_temperature=0.7, loss_agg_mode=agg)
    seed = CLIP_MODES.index(clip_mode) * 100 + WEIGHTS.index(weight) * 10 + (5 if adv_shape == "BT" else 0)
    logps, old, adv, mask = make_inputs(seed=seed, adv_shape=adv_shape)
    check(cfg, logps, old, adv, mask)


@pytest.mark.parametrize("clip_mode", ["one-side", "two-side", "ring"])
def test_every_ratio_region_is_exercised(clip_mode):
    """The inputs put kept and masked tokens of both advantage signs in each clip mode (else nothing is tested)."""
    logps, old, adv, mask = make_inputs(seed=3)
    cfg = RECConfig().replace(clip_mode=clip_mode)
    ratio = torch.exp(logps.detach() - old)
    a = adv.unsqueeze(1).expand_as(ratio)
    keep = [[_in_range(cfg, ratio[b, t].item(), 1.0, a[b, t].item()) for t in range(ratio.shape[1])]
            for b in range(ratio.shape[0])]
    keep = torch.tensor(keep) & mask
    dropped = ~keep & mask
    for sign in (a > 0, a < 0):
        assert (keep & sign).any() and (dropped & sign).any()


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("algo", NEW_ALGOS)
def test_every_preset_every_aggregation(algo, agg):
    cfg = get_config(algo, loss_agg_mode=agg)
    logps, old, adv, mask = make_inputs(seed=NEW_ALGOS.index(algo) * 7 + AGG_MODES.index(agg))
    check(cfg, logps, old, adv, mask)


@pytest.mark.parametrize("algo", NEW_ALGOS)
@pytest.mark.parametrize("B, T", [(1, 1), (1, 7), (2, 3)])
def test_g_equals_one_and_tiny_shapes(algo, B, T):
    logps, old, adv, mask = make_inputs(B=B, T=T, seed=B * 10 + T, mask_kind="full")
    check(get_config(algo), logps, old, adv, mask)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [0.2, 4.0])
def test_cispo_levels_and_caps(level, cap):
    cfg = get_config("cispo", importance_sampling_level=level, epsilon_high=cap)
    logps, old, adv, mask = make_inputs(seed=int(cap * 10) + (1 if level == "sequence" else 0))
    check(cfg, logps, old, adv, mask)


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.2, 0.6)], ids=str)
def test_gmpo_geometric_mean_and_log_space_clip(eps, adv_shape):
    cfg = get_config("gmpo", epsilon_low=eps[0], epsilon_high=eps[1])
    logps, old, adv, mask = make_inputs(seed=int(eps[1] * 10), adv_shape=adv_shape)
    _, grad = check(cfg, logps, old, adv, mask)
    # Not token-local: a clipped token gets no gradient, every free one the sequence's shared value.
    assert (grad[0][mask[0]] != 0).any()


@pytest.mark.parametrize("algo", NEW_ALGOS)
def test_nan_on_masked_positions_changes_nothing(algo):
    logps, old, adv, mask = make_inputs(seed=11)
    cfg = get_config(algo)
    loss, _ = policy_loss(logps, old, adv, mask, config=cfg)
    poisoned = [torch.where(mask, t.detach(), float("nan")) for t in (logps, old)]
    leaf = poisoned[0].requires_grad_(True)
    loss_nan, _ = policy_loss(leaf, poisoned[1], adv, mask, config=cfg)
    (grad,) = torch.autograd.grad(loss_nan, leaf)
    torch.testing.assert_close(loss_nan, loss)
    assert torch.isfinite(grad).all() and not grad[~mask].any()


# --------------------------------------------------------------------------------------------------
# Identities the paper states
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_reinforce_is_minus_advantage_times_logp_token_mean(adv_shape):
    logps, old, adv, mask = make_inputs(seed=21, adv_shape=adv_shape)
    loss, _ = policy_loss(logps, old, adv, mask, config=REINFORCEConfig())
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv
    leaf = logps.detach().double().requires_grad_(True)
    want = -(a.double() * leaf * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss, logps)
    (want_grad,) = torch.autograd.grad(want, leaf)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("algo", ["rec", "rec_is", "rec_ring", "opmd", "red_drop"])
def test_at_ratio_one_the_rec_family_is_reinforce(algo):
    logps, _, adv, mask = make_inputs(seed=31)
    old = logps.detach().clone()
    loss, metrics = policy_loss(logps, old, adv, mask, config=get_config(algo))
    want, _ = policy_loss(logps, old, adv, mask, config=REINFORCEConfig())
    (grad,) = torch.autograd.grad(loss, logps)
    (want_grad,) = torch.autograd.grad(want, logps)
    assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    assert metrics["clip_frac"].item() == 0 and metrics["ratio_max"].item() == 1.0


def test_asymre_is_reinforce_with_a_lowered_baseline():
    logps, old, adv, mask = make_inputs(seed=41)
    loss, _ = policy_loss(logps, old, adv, mask, config=get_config("asymre", regularizer_coef=0.25))
    want, _ = policy_loss(logps, old, adv + 0.25, mask, config=REINFORCEConfig())
    torch.testing.assert_close(loss, want)


# --------------------------------------------------------------------------------------------------
# The same losses from logits and from hidden states
# --------------------------------------------------------------------------------------------------


def logprobs64(hidden, weight, targets, temperature=0.7):
    """float64 log-probs of ``targets`` under softmax(hidden @ weight.T / temperature)."""
    logits = (hidden @ weight.T / temperature).log_softmax(-1)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("RLFUSE_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("algo", NEW_ALGOS)
def test_logits_and_fused_linear_paths_match_policy_loss(algo, backend, device):
    """policy_loss_from_logits and FusedLinearPolicyLoss give policy_loss's value and gradient, far off-policy."""
    B, T, H, V = 4, 6, 16, 37
    g = torch.Generator().manual_seed(NEW_ALGOS.index(algo))
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) / 2
    targets = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logps64 = logprobs64(hidden, weight, targets)
    old = (logps64 + 0.8 * torch.randn(B, T, generator=g, dtype=F64)).float().to(device)
    adv = torch.randn(B, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    mask[2] = False
    cfg = get_config(algo)

    leaf64 = hidden.clone().to(device).requires_grad_(True)
    logps = logprobs64(leaf64, weight.to(device), targets.to(device))
    want, _ = policy_loss(logps, old.double(), adv.double(), mask, config=cfg)
    want.backward()

    logits_leaf = (hidden @ weight.T).float().to(device).requires_grad_(True)
    got, _ = policy_loss_from_logits(logits_leaf, targets.to(device), old, adv, mask, config=cfg, temperature=0.7)
    got.backward()
    d_logits = logits_leaf.grad.double()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_logits @ weight.to(device), leaf64.grad, rtol=1e-4, atol=1e-5)

    h_leaf = hidden.float().to(device).requires_grad_(True)
    fused, _ = FusedLinearPolicyLoss(cfg, temperature=0.7, chunk_size=5)(
        h_leaf, weight.float().to(device), targets.to(device), old, adv, mask)
    fused.backward()
    torch.testing.assert_close(fused.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Advantages: no std scaling, RED's balanced drop
# --------------------------------------------------------------------------------------------------


def drop_oracle(rewards, G, seed, scale="none", eps=1e-6):
    """Trinity-RFT's rec advantage with drop='balance', per group in order, one randperm per unbalanced group."""
    g = torch.Generator().manual_seed(seed)
    out = []
    values = rewards.double().tolist()
    for start in range(0, len(values), G):
        group = values[start:start + G]
        mean = math.fsum(group) / G
        negatives = [i for i, r in enumerate(group) if r < mean]
        surplus = len(negatives) - (G - len(negatives))
        dropped = set()
        if surplus > 0:
            dropped = {negatives[int(i)] for i in torch.randperm(len(negatives), generator=g)[:surplus]}
        kept = [r for i, r in enumerate(group) if i not in dropped]
        kept_mean = math.fsum(kept) / len(kept)
        std = math.sqrt(math.fsum((r - kept_mean) ** 2 for r in kept) / len(kept))
        for i, r in enumerate(group):
            a = 0.0 if i in dropped else r - kept_mean
            out.append(a / (std + eps) if scale == "group" else a)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("scale", ["none", "group"])
@pytest.mark.parametrize("G", [2, 4, 5, 8])
def test_balanced_drop_matches_trinity(G, scale):
    g = torch.Generator().manual_seed(G)
    rewards = (torch.rand(6 * G, generator=g) < 0.3).float() + 0.01 * torch.randn(6 * G, generator=g)
    rewards[:G] = 1.0  # a group of equal rewards: nothing dropped, all zero
    got = balanced_drop_advantages(rewards, G, scale, generator=torch.Generator().manual_seed(99))
    want = drop_oracle(rewards, G, 99, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not got[:G].any()
    grouped = got.view(-1, G)
    positives = (grouped > 0).sum(1)
    assert ((grouped < 0).sum(1) <= positives + (grouped == 0).sum(1)).all()
    assert (got == 0).any() and (got[G:] != 0).any()  # something was dropped, something kept


def test_red_drop_config_drops_and_the_others_do_not_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.5, 0.9, 0.1])
    adv = compute_advantages(rewards, 4, get_config("red_drop"), generator=torch.Generator().manual_seed(0))
    assert (adv[:4] == 0).sum() == 2 and adv[0] == 0.5  # two of three zeros dropped, 1 - mean(1, 0)
    for algo in ("reinforce", "rec", "opmd", "asymre", "red_weight"):
        want = rewards.view(2, 4) - rewards.view(2, 4).mean(1, keepdim=True)
        torch.testing.assert_close(compute_advantages(rewards, 4, get_config(algo)), want.reshape(-1))
    assert not compute_advantages(rewards[:3], 1, get_config("red_drop")).any()  # G = 1


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("clip_mode", "three-side"), ("weight", "uniform"), ("regularizer", "k3"), ("drop", "random"),
    ("regularizer_coef", -0.1), ("weight_temperature", 0.0), ("epsilon_low_prime", 1.5),
    ("epsilon_high_prime", 0.0), ("importance_sampling_level", "sequence"),
])
def test_invalid_rec_dials_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RECConfig().replace(**{field: value})


def test_rec_dials_on_another_loss_and_gspo_one_side_aggregation_raise():
    with pytest.raises(ValueError, match="clip_mode"):
        get_config("grpo", clip_mode="one-side")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        get_config("rec", clip_mode="gspo-one-side")
    with pytest.raises(ValueError, match="drop"):
        get_config("red_drop", advantage_estimator="rloo")


def test_presets_are_registered_with_their_defaults():
    assert set(NEW_ALGOS) <= set(ALGO_CONFIGS)
    assert (get_config("opmd").regularizer, get_config("opmd").regularizer_coef) == ("k2", 0.1)
    assert (get_config("asymre").regularizer, get_config("asymre").regularizer_coef) == ("forward-kl", 0.1)
    assert get_config("rec_ring").epsilon_low_prime == 0.6 and get_config("rec_ring").epsilon_high_prime == 2.0
    assert get_config("cispo").epsilon_high == 4.0 and get_config("gmpo").epsilon_low == 0.4
    for algo in NEW_ALGOS:
        assert get_config(algo).algo == algo and ALGO_CONFIGS[algo].__doc__

"""rlfuse.algos.group_advantages / compute_advantages against a float64 oracle built on `statistics`.

The oracle walks the groups in Python floats: statistics.fmean for the mean, statistics.stdev for the
unbiased std, and for RLOO the explicit leave-one-out form r_i - mean(r_j, j != i) (which equals
G/(G-1)·(r_i - mean) algebraically but is computed differently). Rewards are drawn on the CPU and moved to
the ``device`` fixture's device (the Triton kernel on a GPU); the oracle stays on the CPU.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from rlfuse.algos import ALGO_CONFIGS, TOPRConfig, compute_advantages, group_advantages

F64 = torch.float64
RTOL, ATOL = 1e-5, 1e-6


def oracle(rewards, G, scale="group", estimator="grpo", eps=1e-6):
    r = [float(x) for x in rewards.detach().to(F64).tolist()]
    if G == 1:
        return torch.zeros(len(r), dtype=F64)
    batch_sd = statistics.stdev(r)
    out = []
    for start in range(0, len(r), G):
        grp = r[start:start + G]
        mu = statistics.fmean(grp)
        sd = statistics.stdev(grp)
        for i, ri in enumerate(grp):
            if estimator == "rloo":
                others = grp[:i] + grp[i + 1:]
                a = ri - statistics.fmean(others)
            else:
                a = ri - mu
            if scale == "group":
                a = a / (sd + eps)
            elif scale == "batch":
                a = a / (batch_sd + eps)
            out.append(a)
    return torch.tensor(out, dtype=F64)


def check(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual.to("cpu", F64), expected.cpu(), rtol=rtol, atol=atol)


def make_rewards(B, G, kind, dtype, gen):
    if kind == "gaussian":
        r = torch.randn(B, generator=gen, dtype=F64) * 1.7 + 0.3
    elif kind == "binary":
        r = (torch.rand(B, generator=gen, dtype=F64) < 0.5).to(F64)
        if G > 1:  # make sure the first group is mixed so the std is not 0 everywhere
            r[0], r[1] = 1.0, 0.0
    elif kind == "with_equal_group":
        r = torch.randn(B, generator=gen, dtype=F64)
        r[:G] = 0.75  # first group: all equal rewards (dyadic value, exact in float32)
    else:
        raise AssertionError(kind)
    return r.to(dtype)


GROUPINGS = [(1, 1), (1, 5), (2, 1), (2, 4), (3, 2), (4, 2), (5, 1), (7, 1), (8, 1)]  # (G, number of groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "binary", "with_equal_group"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G,n_groups", GROUPINGS, ids=[f"G{g}x{n}" for g, n in GROUPINGS])
def test_group_advantages_match_oracle(G, n_groups, scale, estimator, kind, dtype, device):
    B = G * n_groups
    gen = torch.Generator().manual_seed(100 * G + n_groups)
    rewards = make_rewards(B, G, kind, dtype, gen).to(device)
    before = rewards.clone()
    adv = group_advantages(rewards, G, scale=scale, estimator=estimator)
    assert adv.dtype == dtype and tuple(adv.shape) == (B,)
    assert torch.equal(rewards, before), "rewards must not be modified in place"
    want = oracle(rewards, G, scale, estimator)
    check(adv, want)
    if G == 1:
        assert torch.count_nonzero(adv).item() == 0
    if kind == "with_equal_group" and G > 1:
        assert adv[:G].abs().max().item() <= ATOL
    if G > 1 and scale == "none":
        # group-relative: every group sums to zero
        check(adv.view(-1, G).sum(1), torch.zeros(n_groups, dtype=F64), atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_eps_is_added_to_the_std(eps, scale, estimator, device):
    gen = torch.Generator().manual_seed(9)
    rewards = (torch.randn(8, generator=gen) * 0.3).to(device)
    adv = group_advantages(rewards, 4, scale=scale, estimator=estimator, eps=eps)
    check(adv, oracle(rewards, 4, scale, estimator, eps))


def test_defaults_are_group_scale_grpo_eps_1e6(device):
    gen = torch.Generator().manual_seed(10)
    rewards = (torch.rand(6, generator=gen) * 1e-3).to(device)  # tiny spread so eps=1e-6 matters at 1e-5 relative
    check(group_advantages(rewards, 3), oracle(rewards, 3, "group", "grpo", 1e-6))


# -- equal rewards --------------------------------------------------------------------------------

# values exact in binary floating point: the group mean is exact, so the advantage is exactly 0
@pytest.mark.parametrize("value", [0.0, 1.0, -1.0, 0.5, 2.5])
@pytest.mark.parametrize("G", [2, 3, 6, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage(value, G, dtype, estimator, scale, device):
    rewards = torch.full((G,), value, dtype=dtype, device=device)
    adv = group_advantages(rewards, G, scale=scale, estimator=estimator)
    assert adv.abs().max().item() <= ATOL


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("G", [3, 8])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_equal_non_dyadic_rewards_float64(value, G, scale, device):
    rewards = torch.full((G,), value, dtype=F64, device=device)
    assert group_advantages(rewards, G, scale=scale).abs().max().item() <= ATOL


@pytest.mark.parametrize("value,G", [(0.1, 8), (0.3, 6), (0.7, 7)])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_equal_non_dyadic_rewards_float32(value, G, scale, device):
    rewards = torch.full((G,), value, dtype=torch.float32, device=device)
    assert group_advantages(rewards, G, scale=scale).abs().max().item() <= ATOL


# -- inputs that are not plain contiguous tensors -------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_non_contiguous_rewards(scale, device):
    gen = torch.Generator().manual_seed(13)
    big = torch.randn(16, generator=gen).to(device)
    rewards = big[::2]
    assert not rewards.is_contiguous()
    check(group_advantages(rewards, 4, scale=scale), oracle(rewards, 4, scale))


# -- compute_advantages -----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "rloo", None])
@pytest.mark.parametrize("scale", ["group", "batch", "none", None])
@pytest.mark.parametrize("algo", sorted(ALGO_CONFIGS))
def test_compute_advantages_dispatch(algo, scale, estimator, device):
    if ALGO_CONFIGS[algo]().drop != "none":
        pytest.skip("RED-Drop's advantages have their own oracle in test_offpolicy_losses.py")
    cfg = ALGO_CONFIGS[algo]().replace(advantage_scale=scale, advantage_estimator=estimator, baseline=None)
    gen = torch.Generator().manual_seed(sorted(ALGO_CONFIGS).index(algo))
    G = 4
    rewards = (torch.randn(8, generator=gen) + 0.2).to(device)
    adv = compute_advantages(rewards, G, cfg)
    assert adv.dtype == rewards.dtype and tuple(adv.shape) == (8,)
    if cfg.loss_type == "topr":
        check(adv, rewards.to(F64) - cfg.baseline)
    else:
        check(adv, oracle(rewards, G, cfg.advantage_scale, cfg.advantage_estimator))


@pytest.mark.parametrize("baseline", [0.0, 0.5, -1.0])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_compute_advantages_topr_is_reward_minus_baseline(baseline, G, device):
    gen = torch.Generator().manual_seed(17)
    rewards = torch.where(torch.rand(8, generator=gen) < 0.5, 1.0, -1.0) + 0.01 * torch.randn(8, generator=gen)
    rewards = rewards.to(device)
    adv = compute_advantages(rewards, G, TOPRConfig().replace(baseline=baseline))
    want = torch.tensor([float(r) - baseline for r in rewards.tolist()], dtype=F64)
    check(adv, want)


def test_drgrpo_default_does_not_scale(device):
    gen = torch.Generator().manual_seed(19)
    rewards = (torch.randn(6, generator=gen) * 5).to(device)
    adv = compute_advantages(rewards, 3, ALGO_CONFIGS["dr_grpo"]())
    check(adv, oracle(rewards, 3, "none", "grpo"))


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", ["group_advantages", "compute_topr", "compute_grpo"])
def test_non_finite_rewards_raise(fn, bad):
    # CPU rewards only, on every device: the check is a host sync that CUDA rewards skip by design.
    rewards = torch.tensor([1.0, 0.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"rewards contain NaN or infinite values \(rows \[2\]"):
        _call(fn, rewards, 2)


@pytest.mark.parametrize("fn", ["group_advantages", "compute_topr", "compute_grpo"])
@pytest.mark.parametrize("B,G", [(5, 2), (7, 4), (3, 8)])
def test_batch_not_multiple_of_group_raises(fn, B, G, device):
    with pytest.raises(ValueError, match="num_generations"):
        _call(fn, torch.randn(B, device=device), G)


@pytest.mark.parametrize("G", [0, -2, 2.0])
def test_bad_num_generations_raises(G, device):
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.randn(4, device=device), G)


@pytest.mark.parametrize("shape", [(2, 4), (8, 1), ()], ids=str)
def test_rewards_not_1d_raise(shape, device):
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.randn(shape, device=device), 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_non_float_rewards_raise(dtype, device):
    with pytest.raises(TypeError, match="rewards"):
        group_advantages(torch.ones(4, dtype=dtype, device=device), 2)


def test_unknown_scale_and_estimator_raise(device):
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(4, device=device), 2, scale="std")
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.randn(4, device=device), 2, estimator="ppo")


def _call(fn, rewards, G):
    if fn == "group_advantages":
        return group_advantages(rewards, G)
    if fn == "compute_topr":
        return compute_advantages(rewards, G, TOPRConfig())
    return compute_advantages(rewards, G, ALGO_CONFIGS["grpo"]())

"""rlfuse.integrations.verl: the rlfuse_* policy losses against rlfuse.algos.policy_loss, a float64 formula
and, when verl imports, verl's own registry and ``vanilla``/``gspo`` losses.

Inputs are fresh random tensors (seeded by the test's parameters so that a failure reproduces), with a fully
masked row and lengths that are not powers of two. The verl tests skip when ``verl.trainer.ppo.core_algos``
cannot be imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import zlib

import pytest
import torch

import rlfuse.integrations.verl as rv
from rlfuse.algos import ALGO_CONFIGS, get_config, policy_loss

SHAPES = [(1, 1), (4, 7), (6, 33), (3, 130)]
LOCAL_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
VERL_MODES = list(rv.VERL_LOSS_AGG_MODES)
VERL_DIALS = {"clip_ratio": 0.2, "clip_ratio_low": 0.15, "clip_ratio_high": 0.3, "clip_ratio_c": 1.5}
ALGO_OF = {name: name.removeprefix("rlfuse_") for name in rv.VERL_POLICY_LOSSES}


def make_inputs(shape, *key, spread=0.8, nan_padding=False):
    """(log_prob leaf with grad, old_log_prob, advantages (B, T), bool mask, vocab_mean, old_vocab_mean)."""
    B, T = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, key)).encode()))
    old = -4.0 * torch.rand(B, T, generator=g) - 0.05
    logps = old + spread * torch.randn(B, T, generator=g)
    advantages = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    if B > 2:
        mask[1] = False  # a fully masked row
    vocab_mean = -6.0 - torch.rand(B, T, generator=g)
    old_vocab_mean = vocab_mean + 0.1 * torch.randn(B, T, generator=g)
    if nan_padding:
        logps, old = (torch.where(mask, t, float("nan")) for t in (logps, old))
    return logps.requires_grad_(), old, advantages, mask, vocab_mean, old_vocab_mean


def call(name, logps, old, advantages, mask, mode, config, vocab_mean=None, old_vocab_mean=None, weights=None):
    fn = rv.VERL_POLICY_LOSSES[name]
    extra = {"vocab_mean": vocab_mean, "old_vocab_mean": old_vocab_mean} if name == "rlfuse_rover" else {}
    return fn(old_log_prob=old, log_prob=logps, advantages=advantages, response_mask=mask, loss_agg_mode=mode,
              config=config, rollout_is_weights=weights, **extra)


def expected_rlfuse_config(algo, mode):
    """The rlfuse config the verl dials in VERL_DIALS stand for, written out by hand."""
    rlfuse_mode = mode if mode in LOCAL_MODES else "token-mean"
    if algo in ("grpo", "dapo"):
        return get_config(algo, epsilon_low=0.15, epsilon_high=0.3, clip_ratio_c=1.5, loss_agg_mode=rlfuse_mode)
    if algo == "gspo":
        return get_config(algo, epsilon_low=0.15, epsilon_high=0.3, loss_agg_mode=rlfuse_mode)
    return get_config(algo, loss_agg_mode=rlfuse_mode)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("name", [n for n in rv.VERL_POLICY_LOSSES if n != "rlfuse_red_drop"])
def test_matches_rlfuse_policy_loss(name, mode, shape):
    spread = 0.002 if name == "rlfuse_gspo" else 0.8  # keep GSPO's sequence ratios near its 3e-4 clip range
    logps, old, adv, mask, vm, old_vm = make_inputs(shape, name, mode, spread=spread, nan_padding=True)
    loss, metrics = call(name, logps, old, adv, mask, mode, dict(VERL_DIALS), vm, old_vm)
    (grad,) = torch.autograd.grad(loss, logps)

    cfg = expected_rlfuse_config(ALGO_OF[name], mode)
    ref, ref_metrics = policy_loss(logps, old, adv, mask, config=cfg, vocab_mean=vm, old_vocab_mean=old_vm)
    # verl's sequence means count non-empty rows only, and token-sum is token-mean times the token count.
    scale = {"token-sum": mask.sum(), "seq-mean-token-sum-norm": mask.shape[0] / mask.any(-1).sum()}.get(mode, 1.0)
    ref = ref * scale
    (ref_grad,) = torch.autograd.grad(ref, logps)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[~mask].any()
    kl = ((old - logps.detach())[mask]).mean().item()
    assert metrics["actor/ppo_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    if name == "rlfuse_topr":  # the taper is TOPR's clip
        assert metrics["actor/pg_clipfrac"] == pytest.approx(ref_metrics["clip_frac"].item(), abs=1e-6)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}


def grpo_float64(logps, old, adv, mask, mode, weights, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
    """verl's vanilla PPO dual-clip loss in float64, from the formula: (loss, grad, clipfrac, kl, clipfrac_lower)."""
    lp = logps.detach().double().requires_grad_()
    A, w, m = adv.double(), weights.double(), mask.double()
    ratio = torch.exp(lp - old.double())
    lo, hi, c = 1 - VERL_DIALS["clip_ratio_low"], 1 + VERL_DIALS["clip_ratio_high"], VERL_DIALS["clip_ratio_c"]
    surrogate = torch.maximum(-A * ratio, -A * ratio.clamp(lo, hi))
    token = torch.where(A < 0, torch.minimum(surrogate, -A * c), surrogate) * w * m
    n_tok, per_seq = m.sum(), m.sum(-1)
    n_seq = (per_seq > 0).sum()
    if mode == "token-mean":
        loss = token.sum() / (n_tok if batch_num_tokens is None else batch_num_tokens)
    elif mode == "token-sum":
        loss = token.sum()
    else:
        seq = token.sum(-1) / per_seq.clamp(min=1) if mode == "seq-mean-token-mean" else token.sum(-1)
        loss = seq.sum() / (n_seq if global_batch_size is None else global_batch_size)
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    loss = loss * dp_size
    (grad,) = torch.autograd.grad(loss, lp)
    clipfrac = (((-A * ratio.clamp(lo, hi) > -A * ratio) & mask).sum() / n_tok).item()
    lower = (((A < 0) & (surrogate > -A * c) & mask).sum() / n_tok).item()
    kl = (((old.double() - lp.detach()) * m).sum() / n_tok).item()
    return loss.detach(), grad, clipfrac, kl, lower


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("global_batch", [False, True], ids=["local", "global"])
def test_grpo_matches_float64_formula(mode, shape, global_batch):
    logps, old, adv, mask, _, _ = make_inputs(shape, mode, global_batch, spread=1.0)
    g = torch.Generator().manual_seed(shape[1])
    weights = 0.5 + torch.rand(shape, generator=g)  # rollout importance weights
    info = {}
    if global_batch:
        info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()) + 5, "global_batch_size": int(mask.any(-1).sum()) + 1,
                "loss_scale_factor": 50}
    config = dict(VERL_DIALS, global_batch_info=info)
    loss, metrics = call("rlfuse_grpo", logps, old, adv, mask, mode, config, weights=weights)
    (grad,) = torch.autograd.grad(loss, logps)

    ref, ref_grad, clipfrac, kl, lower = grpo_float64(logps, old, adv, mask, mode, weights, **info)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac, abs=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(lower, abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(kl, rel=1e-5, abs=1e-6)


def test_dual_clip_and_clip_are_exercised():
    """The random inputs of the formula test reach both clips, so their metrics are tested with nonzero values."""
    logps, old, adv, mask, _, _ = make_inputs((6, 33), "token-mean", False, spread=1.0)
    _, metrics = call("rlfuse_grpo", logps, old, adv, mask, "token-mean", dict(VERL_DIALS))
    assert metrics["actor/pg_clipfrac"] > 0.05 and metrics["actor/pg_clipfrac_lower"] > 0.01


def test_rover_without_vocab_means_raises():
    logps, old, adv, mask, vm, _ = make_inputs((4, 7), "rover")
    with pytest.raises(ValueError, match="vocab_mean and old_vocab_mean"):
        rv.rlfuse_rover(old, logps, adv, mask, "token-mean", None, None)
    with pytest.raises(ValueError, match="vocab_mean and old_vocab_mean"):
        rv.rlfuse_rover(old, logps, adv, mask, "token-mean", None, None, vocab_mean=vm)


def test_bad_arguments_raise():
    logps, old, adv, mask, _, _ = make_inputs((4, 7), "bad")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        rv.rlfuse_grpo(old, logps, adv, mask, "seq-sum")
    with pytest.raises(ValueError, match="global batch_num_tokens"):
        rv.rlfuse_grpo(old, logps, adv, mask, "token-mean", {"global_batch_info": {"dp_size": 2}})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        rv.rlfuse_dapo(old, logps, adv, mask, "token-mean", {"clip_ratio_c": 0.5})
    with pytest.raises(ValueError, match="shape"):
        rv.rlfuse_dapo(old[:, :-1], logps, adv, mask)


def test_config_mapping_reads_verl_fallbacks():
    cfg = rv.rlfuse_config_from_verl("dapo", {"clip_ratio": 0.25, "clip_ratio_low": None, "clip_ratio_high": 0.28})
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.clip_ratio_c, cfg.beta) == (0.25, 0.28, 3.0, 0.0)
    assert rv.rlfuse_config_from_verl("gspo", {"clip_ratio_c": 2.0}).clip_ratio_c is None
    norm = "seq-mean-token-sum-norm"
    assert rv.rlfuse_config_from_verl("grpo", None, norm).loss_agg_mode == norm


def test_register_fills_the_registry_it_imports(monkeypatch):
    registry, estimators = {}, {}
    fake = types.ModuleType("verl.trainer.ppo.core_algos")
    fake.register_policy_loss = lambda name: lambda fn: registry.setdefault(name, fn)
    fake.register_adv_est = lambda name: lambda fn: estimators.setdefault(name, fn)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", fake)
    names = rv.register(install=False)
    assert names[:5] == ("rlfuse_grpo", "rlfuse_dapo", "rlfuse_gspo", "rlfuse_topr", "rlfuse_rover")
    assert set(names) == {f"rlfuse_{algo}" for algo in ALGO_CONFIGS if algo != "dr_grpo"}  # dr_grpo: vanilla
    assert registry == rv.VERL_POLICY_LOSSES
    assert estimators == {"rlfuse_topr": rv.rlfuse_topr_advantage}


def test_topr_advantage_is_the_correctness_reward():
    """verl puts each sequence's score on its last response token; TOPR's advantage is that ±1 score on every
    response token, as rlfuse's own compute_advantages gives it."""
    from rlfuse.algos import compute_advantages

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    scores = torch.tensor([1.0, -1.0, -1.0, 1.0])
    token_level_rewards = torch.zeros(4, 4)
    token_level_rewards[torch.arange(4), mask.sum(-1) - 1] = scores
    advantages, returns = rv.rlfuse_topr_advantage(token_level_rewards, mask, None, index=["a", "a", "b", "b"])
    expected = compute_advantages(scores, 2, get_config("topr"))[:, None] * mask
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected)


def test_import_rlfuse_never_imports_verl():
    code = "import sys, rlfuse, rlfuse.integrations.verl; assert 'verl' not in sys.modules, 'verl was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --------------------------------------------------------------------------------------------------
# With verl installed
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def actor_config(clip_ratio_low, clip_ratio_high, clip_ratio_c=3.0):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=clip_ratio_low,
                       clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c)


def test_verl_registry_returns_rlfuse_losses(core_algos):
    rv.register()
    rv.register()  # again: verl's registries accept the same function twice
    for name, fn in rv.VERL_POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
    assert core_algos.get_adv_estimator_fn("rlfuse_topr") is rv.rlfuse_topr_advantage


def assert_same_as_verl(verl_fn, ours, logps, old, adv, mask, mode, config, weights):
    kwargs = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=config,
                  rollout_is_weights=weights)
    expected, expected_metrics = verl_fn(log_prob=logps, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    loss, metrics = ours(log_prob=logps, **kwargs)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("global_batch", [False, True], ids=["local", "global"])
def test_rlfuse_grpo_equals_verl_vanilla(core_algos, mode, shape, global_batch):
    logps, old, adv, mask, _, _ = make_inputs(shape, "vanilla", mode, global_batch, spread=1.0)
    config = actor_config(0.2, 0.28, clip_ratio_c=1.5)
    weights = None
    if global_batch:
        config.global_batch_info.update(dp_size=4, batch_num_tokens=int(mask.sum()) * 3,
                                        global_batch_size=int(mask.any(-1).sum()) * 3, loss_scale_factor=64)
        weights = 0.5 + torch.rand(shape, generator=torch.Generator().manual_seed(7))
    assert_same_as_verl(core_algos.get_policy_loss_fn("vanilla"), rv.rlfuse_grpo, logps, old, adv, mask, mode, config,
                        weights)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", VERL_MODES)
def test_rlfuse_gspo_equals_verl_gspo(core_algos, mode, shape):
    logps, old, adv, mask, _, _ = make_inputs(shape, "gspo", mode, spread=0.002)
    config = actor_config(3e-4, 4e-4)
    assert_same_as_verl(core_algos.get_policy_loss_fn("gspo"), rv.rlfuse_gspo, logps, old, adv, mask, mode, config,
                        None)


INSTALLED = (
    "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
    "from verl.models.transformers import monkey_patch\n"
    "from verl.workers.utils import losses\n"
    "from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead as E\n"
    "import rlfuse.integrations.verl as rv\n"
    "assert all(get_policy_loss_fn(n) is f for n, f in rv.VERL_POLICY_LOSSES.items())\n"
    "assert monkey_patch.patch_forward_with_backends.rlfuse_original.__module__.startswith('verl.')\n"
    "assert losses.ppo_loss.rlfuse_original.__module__ == 'verl.workers.utils.losses'\n"
    "assert E.prepare_model_outputs.rlfuse_original.__qualname__.startswith('FSDPEngineWithLMHead.')\n"
)


def test_external_lib_import_registers(core_algos):
    """verl's ``model.external_lib`` imports the module after verl: that import alone registers the losses,
    the ``rlfuse`` fused-kernel backend and the actor wrappers of ROVER."""
    code = (
        "import verl\n"
        "from verl.utils.import_utils import import_external_libs\n"
        "import_external_libs('rlfuse.integrations.verl')\n"
    ) + INSTALLED
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_verl_use_external_modules_registers(core_algos):
    """``VERL_USE_EXTERNAL_MODULES`` imports the module while ``import verl`` runs (the trainer process's way)."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlfuse.integrations.verl")
    subprocess.run([sys.executable, "-c", "import verl\n" + INSTALLED], check=True, timeout=300, env=env)

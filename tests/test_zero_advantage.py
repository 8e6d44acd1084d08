"""Groups with all-zero advantages left out of the update: the predicate, the loss share, and the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlfuse.algos import compute_advantages, get_config, policy_loss
from rlfuse.algos.configs import ALGO_CONFIGS, LOSS_AGG_MODES
from rlfuse.engine import reward_funcs as reward_funcs_mod
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.rewards import RewardResult
from rlfuse.engine.rollout import RolloutBatch
from rlfuse.engine.trainer import Trainer
from rlfuse.engine.zero_advantage import (informative_rows, kept_share, select_rows,
                                          zero_advantage_has_zero_gradient)

DATA = Path(__file__).parent / "data"
G = 3


def loss_inputs(config, generator):
    """Two groups of G rows, T = 7: group 0 with equal rewards, group 1 with spread and one empty completion;
    log-probs off-policy (old != current), so the claim holds at any ratio, not only at 1."""
    B, T = 2 * G, 7
    wrong = config.incorrect_reward  # TOPR scores a wrong answer -1
    rewards = torch.tensor([wrong] * G + [1.0, wrong, 1.1], dtype=torch.float64)
    advantages = compute_advantages(rewards, G, config)
    logps = (-torch.rand(B, T, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = torch.rand(B, T, generator=generator) > 0.2
    mask[G + 1] = False  # an empty completion in the informative group
    extra = {}
    if config.beta > 0:
        extra["ref_logps"] = old - 0.1
    if config.loss_type == "rover":
        extra["vocab_mean"] = logps.detach() - 2.0
        extra["old_vocab_mean"] = old - 2.0
    return logps, old, advantages, mask, extra


@pytest.mark.parametrize("algo", sorted(ALGO_CONFIGS))
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_skipping_is_exact_exactly_where_the_predicate_says(algo, beta):
    generator = torch.Generator().manual_seed(hash((algo, beta)) % 2**31)
    config = get_config(algo, beta=beta)
    logps, old, advantages, mask, extra = loss_inputs(config, generator)
    loss, _ = policy_loss(logps, old, advantages, mask, config=config, **extra)
    (grad,) = torch.autograd.grad(loss, logps)
    zero_rows = advantages.view(-1, G).eq(0).all(1).repeat_interleave(G)
    if not zero_advantage_has_zero_gradient(config):
        # Excluded for a reason: the uninformative group still moves these losses (TOPR weights its
        # negatives by the reward, so its advantages are not 0 at all).
        assert (grad[zero_rows].abs().sum() > 0) or not zero_rows.any()
        return
    assert zero_rows[:G].all() and not zero_rows[G:].any()
    assert torch.equal(grad[zero_rows], torch.zeros_like(grad[zero_rows]))
    keep = informative_rows(advantages, G)
    assert torch.equal(keep, ~zero_rows)
    for mode in LOSS_AGG_MODES:
        if config.clip_mode == "gspo-one-side" and mode != "seq-mean-token-mean":
            continue
        moded = get_config(algo, beta=beta, loss_agg_mode=mode)
        full, _ = policy_loss(logps, old, advantages, mask, config=moded)
        (full_grad,) = torch.autograd.grad(full, logps)
        part, _ = policy_loss(logps[keep], old[keep], advantages[keep], mask[keep], config=moded)
        part = part * kept_share(mask, keep, mode)
        (part_grad,) = torch.autograd.grad(part, logps)
        torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(part_grad, full_grad, rtol=1e-12, atol=1e-14)


def test_predicate_excludes_kl_rover_topr_and_regularizers():
    assert zero_advantage_has_zero_gradient(get_config("grpo"))
    for algo, overrides in (("grpo", {"beta": 0.04}), ("rover", {}), ("topr", {}), ("opmd", {}), ("asymre", {})):
        assert not zero_advantage_has_zero_gradient(get_config(algo, **overrides)), algo


def test_informative_rows_by_group():
    advantages = torch.tensor([0.0, 0.0, 0.5, -0.5, 0.0, 0.0])
    assert informative_rows(advantages, 2).tolist() == [False, False, True, True, False, False]
    per_token = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.0])[:, None].expand(6, 4)
    assert informative_rows(per_token, 3).tolist() == [False, False, False, True, True, True]
    assert not informative_rows(torch.zeros(4), 1).any()  # G = 1: group advantages are all 0
    with pytest.raises(ValueError, match="num_generations=4"):
        informative_rows(advantages, 4)


def test_kept_share_and_select_rows():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([True, True, False, False])
    assert kept_share(mask, keep, "token-mean") == pytest.approx(2 / 6)
    assert kept_share(mask, keep, "seq-mean-token-mean") == pytest.approx(1 / 3)  # the empty row counts nowhere
    assert kept_share(mask, keep, "seq-mean-token-sum-norm") == pytest.approx(2 / 4)
    assert kept_share(mask, torch.ones(4, dtype=torch.bool), "token-mean") == 1.0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        kept_share(mask, keep, "sum")
    batch = RolloutBatch(torch.arange(8).view(4, 2), torch.ones(4, 2, dtype=torch.long), torch.arange(12).view(4, 3),
                         mask, logps=torch.randn(4, 3))
    sub = select_rows(batch, keep)
    assert sub.completion_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and sub.vocab_mean is None
    assert torch.equal(sub.logps, batch.logps[:2]) and sub.completion_ids.shape[1] == 3


def one_spread_group(texts, golds, *args, **kwargs):
    """Group 0 gets rewards with spread (by completion length), group 1 all zero."""
    rewards = [float(len(t) % 3) for t in texts[:G]] + [0.0] * (len(texts) - G)
    if len(set(rewards[:G])) == 1:
        rewards[0] += 1.0
    return RewardResult(rewards, [False] * len(texts), [False] * len(texts))


def all_zero(texts, golds, *args, **kwargs):
    return RewardResult([0.0] * len(texts), [False] * len(texts), [False] * len(texts))


def step_once(smollm2_dir, tmp_path, skip, rewards, algo="grpo"):
    patch = pytest.MonkeyPatch()
    patch.setattr(reward_funcs_mod, "gsm8k_rewards", rewards)
    try:
        args = TrainArgs(algo=algo, model=smollm2_dir, data=str(DATA / "gsm8k_train_sample.jsonl"), prompts_per_step=2,
                         num_generations=G, max_new_tokens=6, learning_rate=1e-4, skip_zero_advantage_groups=skip,
                         mixed_precision="no",  # equality to float32 rounding: bf16 matmul outputs round per batch shape
                         output_dir=str(tmp_path / f"{algo}-{skip}-{rewards.__name__}"))
        trainer = Trainer(args)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        record = trainer.step(1)
    finally:
        patch.undo()
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    after = {n: p.detach() for n, p in trainer.model.named_parameters()}
    return record, grads, before, after


@pytest.mark.parametrize("algo", ["grpo", "dapo"])
def test_trainer_skips_the_uniform_group_with_the_same_loss_and_gradient(smollm2_dir, tmp_path, algo):
    skipped, grads, _, _ = step_once(smollm2_dir, tmp_path, True, one_spread_group, algo)
    full, full_grads, _, _ = step_once(smollm2_dir, tmp_path, False, one_spread_group, algo)
    assert skipped["trained_groups_frac"] == 0.5 and full["trained_groups_frac"] == 1.0
    assert skipped["loss"] == pytest.approx(full["loss"], rel=1e-4, abs=1e-6)  # ~0 on-policy: advantages sum to 0
    assert skipped["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-4) and full["grad_norm"] > 0
    flat = torch.cat([g.flatten() for g in grads.values()])
    full_flat = torch.cat([g.flatten() for g in full_grads.values()])
    assert (flat - full_flat).norm() <= 1e-4 * full_flat.norm()


def test_all_uniform_step_trains_nothing_and_matches_the_full_step(smollm2_dir, tmp_path):
    skipped, grads, before, after = step_once(smollm2_dir, tmp_path, True, all_zero)
    full, full_grads, full_before, full_after = step_once(smollm2_dir, tmp_path, False, all_zero)
    assert skipped["trained_groups_frac"] == 0.0 and skipped["entropy"] is None and skipped["loss"] == 0.0
    assert full["entropy"] is not None and full["grad_norm"] == skipped["grad_norm"] == 0.0
    for name, grad in grads.items():
        assert torch.equal(grad, full_grads[name]) and not grad.any()
        assert torch.equal(after[name], before[name]) and torch.equal(full_after[name], full_before[name])

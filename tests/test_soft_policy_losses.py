"""SAPO, LUSPO and VESPO in rlfuse's loss math, in float64, against TRL's formulas: the functions of
``rlfuse.integrations.trl_losses`` that ``tests/test_integration_trl.py`` checks against TRL's own ``_compute_loss``,
and TRL's own ``get_gamma_weights``."""

import pytest
import torch

from rlfuse.algos import LUSPOConfig, SAPOConfig, VESPOConfig, get_config, policy_loss
from rlfuse.algos.losses import vespo_weights
from rlfuse.integrations.trl_losses import grpo_token_loss

B, T = 6, 9


def batch(seed, per_token_advantages=False):
    g = torch.Generator().manual_seed(seed)
    logps = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 5, 0, 7, 3])
    mask = torch.arange(T) < lengths[:, None]
    advantages = torch.randn(B, T if per_token_advantages else 1, generator=g, dtype=torch.float64)
    advantages[2] = 0.0
    return logps, old, advantages, mask


def trl_loss(loss_type, logps, old, advantages, mask, level, **kwargs):
    """TRL 1.16's loss of one batch, as rlfuse's TRL trainer computes it (grpo_token_loss and TRL's normalizer)."""
    m = mask.to(logps.dtype)
    weights = None
    if loss_type == "vespo":
        weights = vespo_weights(advantages, logps - old, m)
    token_loss, _ = grpo_token_loss(logps, old, advantages, m, loss_type=loss_type, importance_sampling_level=level,
                                    vespo_weights=weights, **kwargs)
    if loss_type == "sapo":  # TRL's grpo normalizer, over sequences with a token (rlfuse's sequence mean)
        per_seq = (token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq[mask.any(-1)].mean()
    if loss_type == "luspo":
        return (token_loss * m).sum(-1)[mask.any(-1)].mean()
    return (token_loss * m).sum() / m.sum()  # vespo: token-mean


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token", [False, True])
def test_sapo_matches_trl(level, per_token):
    logps, old, advantages, mask = batch(1, per_token)
    config = SAPOConfig(importance_sampling_level=level, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3)
    loss, metrics = policy_loss(logps, old, advantages.squeeze(-1) if not per_token else advantages, mask,
                                config=config)
    expected = trl_loss("sapo", logps, old, advantages, mask, level, epsilon_low=0.2, epsilon_high=0.2,
                        sapo_temperature_pos=0.8, sapo_temperature_neg=1.3)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(x, logps)[0] for x in (loss, expected)), rtol=1e-10, atol=1e-12)
    assert 0 <= float(metrics["clip_frac"]) <= 1


def test_sapo_gate_fades_where_ppo_clips():
    """Far outside the trust region the gate's gradient is small but not cut to 0; at r = 1 it is PPO's."""
    logps = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, -3.0, 3.0]], dtype=torch.float64)  # r = 1, e^3, e^-3
    loss, metrics = policy_loss(logps, old, torch.ones(1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool),
                                config=SAPOConfig())
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad[0, 0], torch.tensor(-1 / 3, dtype=torch.float64))  # -A·r/3 tokens at r = 1
    assert 0 < -grad[0, 1] < 1e-3 and 0 < -grad[0, 2] < 1 / 3
    # only r = e^3 is past the half-peak point of the gate (|tau·(r - 1)| > 1.76); r = e^-3 is not
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(1 / 3, dtype=torch.float64))


def test_luspo_matches_trl_and_weighs_sequences_by_length():
    logps, old, advantages, mask = batch(2)
    config = LUSPOConfig(epsilon_low=0.2, epsilon_high=0.28)
    loss, _ = policy_loss(logps, old, advantages.squeeze(-1), mask, config=config)
    expected = trl_loss("luspo", logps, old, advantages, mask, "sequence", epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(x, logps)[0] for x in (loss, expected)), rtol=1e-10, atol=1e-12)
    gspo, _ = policy_loss(logps, old, advantages.squeeze(-1), mask, config=get_config("gspo", epsilon_low=0.2,
                                                                                       epsilon_high=0.28))
    assert not torch.isclose(loss, gspo)  # GSPO averages each sequence's tokens; LUSPO sums them


@pytest.mark.parametrize("per_token", [False, True])
def test_vespo_matches_trl(per_token):
    logps, old, advantages, mask = batch(3, per_token)
    loss, _ = policy_loss(logps, old, advantages if per_token else advantages.squeeze(-1), mask, config=VESPOConfig())
    expected = trl_loss("vespo", logps, old, advantages, mask, "token", epsilon_low=0.2, epsilon_high=0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(x, logps)[0] for x in (loss, expected)), rtol=1e-10, atol=1e-12)


def test_vespo_weights_are_trl_s_own():
    trl = pytest.importorskip("trl")
    logps, old, advantages, mask = batch(4)
    m = mask.to(torch.float64)
    ratio = torch.exp(0.2 * torch.randn(B, T, dtype=torch.float64))
    for sampler_ratio in (None, ratio):
        ours = vespo_weights(advantages, logps.detach() - old, m, sampler_ratio, 1.5, 2.5, 2.0, 1.5)
        theirs = trl.GRPOTrainer.get_gamma_weights(advantages, logps.detach() - old, m, sampler_ratio,
                                                   k_pos=1.5, lambda_pos=2.5, k_neg=2.0, lambda_neg=1.5)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    equal = vespo_weights(advantages, torch.zeros(B, T, dtype=torch.float64), m)
    torch.testing.assert_close(equal, torch.ones_like(equal))  # phi(1) = 1


@pytest.mark.parametrize("field, value", [("sapo_temperature_pos", 0.0), ("sapo_temperature_neg", -1.0),
                                          ("vespo_k_pos", -0.5), ("vespo_lambda_neg", 0.0)])
def test_bad_dials_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("sapo", **{field: value})


def test_vespo_refuses_sequence_ratios():
    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        VESPOConfig(importance_sampling_level="sequence")


@pytest.mark.parametrize("algo", ["sapo", "luspo", "vespo"])
def test_each_is_a_trainer_algo_and_a_verl_loss(algo):
    from rlfuse.engine.args import TrainArgs
    from rlfuse.integrations.verl import VERL_POLICY_LOSSES, verl_policy_loss

    assert TrainArgs(algo=algo).loss_config() == get_config(algo)
    assert f"rlfuse_{algo}" in VERL_POLICY_LOSSES
    logps, old, advantages, mask = batch(5)
    ours, _ = verl_policy_loss(algo, old, logps, advantages.expand(B, T), mask, loss_agg_mode="token-mean")
    expected, _ = policy_loss(logps, old, advantages.squeeze(-1), mask, config=get_config(algo,
                                                                                          loss_agg_mode="token-mean"))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

"""rlfuse's off-policy presets as ``loss_type`` in rlfuse's TRL GRPOTrainer, against rlfuse's own ``policy_loss``.

reinforce, rec, rec_is, rec_ring, opmd, asymre, red_weight and gmpo: the oracle scores each completion from the
model's materialized logits in float64 and calls :func:`rlfuse.algos.policy_loss` with the preset's config
(``get_config``, TRL's clip range where the preset clips); the trainer's loss must equal it (rescaled to TRL's
normalizer of the preset's ``loss_agg_mode``) and so must the gradients to every weight. The bias-corrected KL
(TRL's ``use_bias_correction_kl``) is written out here in plain PyTorch. red_drop and options without meaning
must raise a ``ValueError`` that names the option and the fix.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_integration_trl import (  # noqa: E402
    CallCounter, dataset, grpo_args, make_batch, make_model, make_tokenizer, model_dir, reward_len, train,
)
from test_integration_trl_topr_rover import materialized  # noqa: E402

import rlfuse.integrations.trl_head as trl_head  # noqa: E402
from rlfuse.algos import aggregate_loss, get_config, policy_loss  # noqa: E402
from rlfuse.integrations.trl import GRPOTrainer  # noqa: E402

PRESETS = ("reinforce", "rec", "rec_is", "rec_ring", "opmd", "asymre", "red_weight", "gmpo")
CLIPPING = {"rec": "rec/masked_ratio", "rec_is": "rec_is/masked_ratio", "rec_ring": "rec_ring/masked_ratio",
            "gmpo": "clip_ratio/region_mean"}
GRAD_ACCUM = 4


def bias_corrected_kl(logps, ref, old, mask, level):
    """TRL's k3 KL times its differentiable importance ratio (token, or the sequence's mean log-ratio), (B, T)."""
    delta = ref - logps
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))
    return (torch.exp(delta) - delta - 1) * torch.exp(log_ratio)


def oracle_loss(trainer, logps, inputs, loss_type, beta=0.0, bias_correction=False, level="token"):
    """rlfuse's policy_loss on ``logps``, (B, T) float64 from :func:`materialized`, rescaled to TRL's normalizer of
    the preset's loss_agg_mode."""
    mask = inputs["completion_mask"].bool()
    old = logps.detach() if "old_per_token_logps" not in inputs else inputs["old_per_token_logps"].double()
    clip = {"epsilon_low": trainer.epsilon_low, "epsilon_high": trainer.epsilon_high} if loss_type in CLIPPING else {}
    config = get_config(loss_type, beta=0.0 if bias_correction else beta, kl_estimator="k3",
                        importance_sampling_level=level, **clip)
    ref = inputs.get("ref_per_token_logps")
    ref = None if ref is None else ref.double()
    loss, _ = policy_loss(logps, old, inputs["advantages"].double(), mask, config=config,
                          ref_logps=None if bias_correction else ref)
    if bias_correction:
        kl = bias_corrected_kl(logps, ref, old, mask.double(), level)
        loss = loss + beta * aggregate_loss(kl, mask, config.loss_agg_mode)
    if config.loss_agg_mode == "token-mean":  # TRL's dapo normalizer: tokens of the accumulated batch
        normalizer = inputs["num_items_in_batch"] * trainer.current_gradient_accumulation_steps
        return loss * mask.sum() / (normalizer / trainer.args.steps_per_generation)
    assert config.loss_agg_mode == "seq-mean-token-mean"  # TRL's grpo: mean over sequences, per accumulation step
    return loss / trainer.current_gradient_accumulation_steps


def assert_same_loss_and_grads(trainer, model, inputs, loss, loss_type, **oracle_kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    logps, _ = materialized(model, inputs)
    expected = oracle_loss(trainer, logps, inputs, loss_type, **oracle_kwargs)
    expected_grads = torch.autograd.grad(expected, params, retain_graph=True)
    assert abs(expected.item()) > 1e-4
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        scale = float(expected_grad.abs().max())
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-4 * scale + 1e-9)
    return expected, logps


@pytest.fixture(scope="module")
def offpolicy_trainer(tmp_path_factory):
    args = grpo_args(tmp_path_factory.mktemp("out"), loss_type="reinforce", scale_rewards="none", epsilon_high=None,
                     beta=0.0)
    return GRPOTrainer(make_model(tie_word_embeddings=False, seed=1), reward_funcs=reward_len, args=args,
                       train_dataset=dataset(), processing_class=make_tokenizer())


@pytest.fixture(scope="module")
def offpolicy_batch(offpolicy_trainer):
    """make_batch's padded batch: old log-probs 0.4·N(0, 1) off the policy's, advantages N(0, 1)."""
    return make_batch(offpolicy_trainer)


CASES = [dict(loss_type=loss_type) for loss_type in PRESETS] + [
    dict(loss_type="opmd", on_policy=True),  # k2 regularizer and its gradient vanish at the sampling policy
    dict(loss_type="asymre", on_policy=True),
    dict(loss_type="rec_is", on_policy=True),
    dict(loss_type="gmpo", epsilon=0.4, beta=0.05, bias_correction=True),
    dict(loss_type="rec", beta=0.05, bias_correction=True),
    dict(loss_type="rec", epsilon=0.1),  # TRL's epsilon, not the preset's 0.2, sets the clip range
    dict(loss_type="opmd", beta=0.05),
    dict(loss_type="topr", beta=0.05, bias_correction=True),
    dict(loss_type="topr", beta=0.05, bias_correction=True, level="sequence"),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compute_loss_equals_policy_loss(offpolicy_trainer, offpolicy_batch, monkeypatch, case):
    """One padded batch with off-policy old log-probs (or none: on-policy) through ``_compute_loss``: loss and
    gradients equal policy_loss with the preset's config; a clipping preset's clip is active on this batch and every
    preset's loss differs from plain REINFORCE's, so a loss that ignored its dials would fail."""
    trainer, loss_type = offpolicy_trainer, case["loss_type"]
    beta, bias_correction, level = case.get("beta", 0.0), case.get("bias_correction", False), case.get("level", "token")
    epsilon = case.get("epsilon", 0.2)
    for name, value in (("loss_type", loss_type), ("importance_sampling_level", level), ("beta", beta),
                        ("epsilon_low", epsilon), ("epsilon_high", epsilon),
                        ("current_gradient_accumulation_steps", GRAD_ACCUM)):
        monkeypatch.setattr(trainer, name, value, raising=False)
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction)
    inputs = {k: v for k, v in offpolicy_batch.items() if k not in ("tool_mask", "sampling_per_token_logps")}
    if case.get("on_policy"):
        del inputs["old_per_token_logps"]
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    assert fused.calls > 0
    expected, logps = assert_same_loss_and_grads(trainer, trainer.model, inputs, loss, loss_type, beta=beta,
                                          bias_correction=bias_correction, level=level)
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    assert ("kl" in metrics) == (beta != 0.0) and "entropy" in metrics
    if loss_type in CLIPPING:
        assert (metrics[CLIPPING[loss_type]] > 0) != bool(case.get("on_policy"))
    if loss_type != "reinforce" and not (case.get("on_policy") and loss_type in ("opmd", "rec_is")):
        baseline = oracle_loss(trainer, logps, inputs, "reinforce", beta, bias_correction)
        assert abs(float(baseline - expected)) > 1e-4, f"{loss_type} equals reinforce on this batch"


def test_on_policy_opmd_is_reinforce(offpolicy_trainer, offpolicy_batch, monkeypatch):
    """On-policy TRL passes no old log-probs: the current ones, detached, are the sampling policy's, so OPMD's k2
    term adds nothing, to the loss or the gradients, and its logged k2 is 0."""
    trainer = offpolicy_trainer
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", GRAD_ACCUM, raising=False)
    inputs = {k: v for k, v in offpolicy_batch.items() if k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                      "completion_mask", "advantages", "num_items_in_batch")}
    results = {}
    for loss_type in ("reinforce", "opmd"):
        monkeypatch.setattr(trainer, "loss_type", loss_type)
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        results[loss_type] = loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]
    assert trainer._metrics["train"]["opmd/k2"] == [0.0]
    torch.testing.assert_close(results["opmd"][0], results["reinforce"][0])
    for grad, expected in zip(results["opmd"][1], results["reinforce"][1]):
        torch.testing.assert_close(grad, expected)


def test_two_training_steps_equal_policy_loss(model_dir, tmp_path, monkeypatch):
    """OPMD trained for two optimizer steps from one generation batch with a reference model and TRL's default
    bias-corrected KL: the second step is off-policy (TRL's old log-probs), and each step's loss and gradients equal
    policy_loss with OPMDConfig."""
    checked = []
    compute_loss = GRPOTrainer._compute_loss

    def checking(self, model, inputs):
        loss = compute_loss(self, model, inputs)
        assert "old_per_token_logps" in inputs
        assert_same_loss_and_grads(self, model, inputs, loss, "opmd", beta=0.05, bias_correction=True)
        checked.append(loss.item())
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", checking)
    losses, grads, trainer = train(GRPOTrainer, model_dir, tmp_path, loss_type="opmd", scale_rewards="none",
                                   epsilon_high=None, beta=0.05)
    assert len(losses) == 2 and len(checked) == 2 and len(grads) == 2
    first, second = trainer.state.log_history[:2]
    for logs in (first, second):
        assert {"entropy", "kl", "opmd/k2"} <= logs.keys() and not any(k.startswith("clip_ratio") for k in logs)
    assert second["opmd/k2"] > 1e-6 > first["opmd/k2"]  # the first step's old policy is the current one


# Last: building a GRPOConfig resets accelerate's state, which the module-scoped trainer above needs.
ERROR_CASES = [
    (dict(loss_type="red_drop", scale_rewards="none", epsilon_high=None), r"loss_type='red_drop'.*reinforce"),
    (dict(loss_type="reinforce", epsilon_high=None), r"scale_rewards='none'"),
    (dict(loss_type="rec", scale_rewards="none", multi_objective_aggregation="normalize_then_sum"),
     r"multi_objective_aggregation='normalize_then_sum'.*sum_then_normalize"),
    (dict(loss_type="gmpo", scale_rewards="none"), r"scale_rewards='group'"),
    (dict(loss_type="opmd", scale_rewards="none", epsilon_high=0.28), r"epsilon_high=0.28 .*loss_type='opmd'"),
    (dict(loss_type="red_weight", scale_rewards="none", epsilon_high=None, epsilon=0.3),
     r"epsilon=0.3 .*loss_type='red_weight'.*default"),
    (dict(loss_type="topr", epsilon_high=None, epsilon=0.3), r"epsilon=0.3 .*loss_type='topr'"),
    (dict(loss_type="rec", scale_rewards="none", delta=2.0), r"delta=2.0 .*loss_type='rec'"),
    (dict(loss_type="rec_is", scale_rewards="none", importance_sampling_level="sequence"),
     r"importance_sampling_level='sequence' .*loss_type='rec_is'.*'token'"),
    (dict(loss_type="gmpo", top_entropy_quantile=0.5), r"top_entropy_quantile=0.5 .*loss_type='gmpo'"),
    (dict(loss_type="rec_ring", scale_rewards="none", epsilon=1.5), r"epsilon=1.5.*loss_type='rec_ring'.*< 1"),
]


@pytest.mark.parametrize("overrides, match", ERROR_CASES, ids=[case["loss_type"] + "-" + "-".join(
    k for k in case if k != "loss_type") for case, _ in ERROR_CASES])
def test_options_without_meaning_raise_at_construction(model_dir, tmp_path, overrides, match):
    args = grpo_args(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        GRPOTrainer(model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset())


def test_gmpo_refuses_the_vllm_token_correction(tmp_path):
    from types import SimpleNamespace

    from rlfuse.integrations.trl import check_grpo_config

    args = vars(grpo_args(tmp_path, loss_type="gmpo"))
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=False"):
        check_grpo_config(SimpleNamespace(**{**args, "use_vllm": True, "vllm_importance_sampling_correction": True}))
    check_grpo_config(SimpleNamespace(**{**args, "use_vllm": True, "vllm_importance_sampling_correction": False}))

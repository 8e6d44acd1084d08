"""``loss_type="topr"`` and ``loss_type="rover"`` in rlfuse's TRL GRPOTrainer, against rlfuse's own ``policy_loss``.

The oracle scores each completion from the model's materialized logits in float64 (log-probs, vocabulary
means, KL to TRL's reference log-probs) and calls :func:`rlfuse.algos.policy_loss`; the trainer's loss must
equal it (times TRL's token normalizer) and so must the gradients to every weight. TRL (tiny random Llama,
CPU) trains two steps from one generation batch, so the second step is off-policy and ROVER reads the old
vocabulary means from TRL's old-policy pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_integration_trl import (  # noqa: E402
    CallCounter, P, T, dataset, grpo_args, make_batch, make_model, make_tokenizer, model_dir, reward_len, train,
)

import rlfuse.integrations.trl_head as trl_head  # noqa: E402
from rlfuse.algos import get_config, policy_loss  # noqa: E402
from rlfuse.integrations.trl import GRPOTrainer  # noqa: E402

TEMPERATURE = 0.7  # grpo_args'


def materialized(model, inputs):
    """Float64 log-probs of the completion tokens and vocabulary means of log_softmax(logits / T), (B, T), from the
    model's own logits (with grad), 0 at padding."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    num = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -num - 1 : -1].double() / TEMPERATURE
    logp = torch.log_softmax(logits, -1)
    mask = inputs["completion_mask"].bool()
    logps = logp.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    return torch.where(mask, logps, 0.0), torch.where(mask, logp.mean(-1), 0.0)


def oracle_loss(trainer, model, inputs, loss_type, beta):
    """rlfuse's policy_loss on materialized log-probs, rescaled from its token mean to TRL's dapo normalizer."""
    logps, vocab_mean = materialized(model, inputs)
    mask = inputs["completion_mask"].bool()
    on_policy = "old_per_token_logps" not in inputs
    old = logps.detach() if on_policy else inputs["old_per_token_logps"].double()
    old_vm = vocab_mean.detach() if on_policy else inputs["old_vocab_mean"].double() if loss_type == "rover" else None
    config = get_config(loss_type, beta=beta, kl_estimator="k3", loss_agg_mode="token-mean",
                        importance_sampling_level=trainer.importance_sampling_level)
    ref = inputs.get("ref_per_token_logps")
    loss, _ = policy_loss(logps, old, inputs["advantages"].double(), mask, config=config,
                          ref_logps=None if ref is None else ref.double(),
                          vocab_mean=vocab_mean if loss_type == "rover" else None, old_vocab_mean=old_vm)
    normalizer = inputs["num_items_in_batch"] * trainer.current_gradient_accumulation_steps
    normalizer = normalizer / trainer.args.steps_per_generation
    return loss * mask.sum() / normalizer, vocab_mean.detach()


def assert_same_loss_and_grads(trainer, model, inputs, loss, loss_type, beta):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected, _ = oracle_loss(trainer, model, inputs, loss_type, beta)
    expected_grads = torch.autograd.grad(expected, params)
    assert abs(expected.item()) > 1e-4
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        scale = float(expected_grad.abs().max())
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-3, atol=1e-4 * scale + 1e-9)


@pytest.mark.parametrize("loss_type", ["topr", "rover"])
def test_two_training_steps_equal_policy_loss(model_dir, tmp_path, monkeypatch, loss_type):
    """Two optimizer steps from one generation batch with a reference model: each step's loss and gradients
    equal rlfuse's policy_loss on materialized log-probs, through the fused-linear path."""
    checked = []
    compute_loss = GRPOTrainer._compute_loss

    def checking(self, model, inputs):
        loss = compute_loss(self, model, inputs)
        if loss_type == "rover" and not checked:  # the first step runs the policy that sampled the batch
            _, vocab_mean = materialized(model, inputs)
            torch.testing.assert_close(inputs["old_vocab_mean"].double(), vocab_mean, rtol=1e-5, atol=1e-5)
        assert_same_loss_and_grads(self, model, inputs, loss, loss_type, beta=0.05)
        checked.append(loss.item())
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", checking)
    fused = CallCounter(monkeypatch, trl_head, "linear_token_logprobs")
    # TRL's default use_bias_correction_kl multiplies the KL by the ratio, which rlfuse's policy_loss does not
    losses, grads, trainer = train(GRPOTrainer, model_dir, tmp_path, loss_type=loss_type, epsilon_high=None,
                                   beta=0.05, use_bias_correction_kl=False)
    assert len(losses) == 2 and len(checked) == 2 and len(grads) == 2
    assert fused.calls > 0
    key = "topr/tapered_ratio" if loss_type == "topr" else "rover/td_error"
    for logs in trainer.state.log_history[:2]:
        assert {"entropy", "kl", key} <= logs.keys() and not any(k.startswith("clip_ratio") for k in logs)
    assert trainer.state.log_history[1]["kl"] > 0
    if loss_type == "rover":
        assert trainer.state.log_history[1][key] > 0


@pytest.fixture(scope="module")
def rover_topr_trainer(tmp_path_factory):
    return GRPOTrainer(make_model(tie_word_embeddings=False, seed=1), reward_funcs=reward_len,
                       args=grpo_args(tmp_path_factory.mktemp("out"), loss_type="topr", epsilon_high=None, beta=0.0),
                       train_dataset=dataset(), processing_class=make_tokenizer())


@pytest.mark.parametrize("loss_type, on_policy, level", [
    ("topr", False, "token"), ("topr", True, "token"), ("topr", False, "sequence"),
    ("rover", False, "token"), ("rover", True, "token"),
])
def test_compute_loss_equals_policy_loss(rover_topr_trainer, monkeypatch, loss_type, on_policy, level):
    """One batch with padding and off-policy old log-probs (or none: on-policy) through ``_compute_loss``."""
    trainer = rover_topr_trainer
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    monkeypatch.setattr(trainer, "importance_sampling_level", level)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 4, raising=False)
    batch = make_batch(trainer)
    inputs = {k: v for k, v in batch.items() if k not in ("tool_mask", "ref_per_token_logps")}
    if on_policy:
        del inputs["old_per_token_logps"]
    elif loss_type == "rover":
        with torch.no_grad():
            _, vocab_mean = materialized(trainer.model, inputs)
        inputs["old_vocab_mean"] = vocab_mean.float() + 0.05 * torch.randn(vocab_mean.shape)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    assert_same_loss_and_grads(trainer, trainer.model, inputs, loss, loss_type, beta=0.0)
    assert inputs["completion_ids"].shape == (len(batch["advantages"]), T) and inputs["prompt_ids"].shape[1] == P


def test_rover_vocab_means_match_materialized_logits(rover_topr_trainer, monkeypatch):
    """The head's vocabulary means, through the fused-linear path and the logits fallback alike."""
    trainer = rover_topr_trainer
    monkeypatch.setattr(trainer, "loss_type", "rover")
    batch = make_batch(trainer)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        _, expected = materialized(trainer.model, batch)
        out, _ = trainer._token_outputs(trainer.model, ids, attention, T, batch_size=4)
        fallback = copy.deepcopy(trainer.model)
        trl_head.add_rlfuse_head(fallback, fused=False)
        targets = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        unfused = fallback(input_ids=ids, attention_mask=attention, rlfuse_targets=targets,
                           rlfuse_temperature=TEMPERATURE, rlfuse_vocab_mean=True)
    torch.testing.assert_close(out.vocab_mean.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused.vocab_mean.double(), expected, rtol=1e-5, atol=1e-5)


# Last: building a GRPOConfig resets accelerate's state, which the module-scoped trainer above needs.
@pytest.mark.parametrize("loss_type, option, value", [
    ("topr", "epsilon_high", 0.28), ("rover", "epsilon_high", 0.28), ("topr", "delta", 2.0), ("rover", "delta", 2.0),
    ("rover", "importance_sampling_level", "sequence"),
])
def test_options_without_meaning_raise_at_construction(model_dir, tmp_path, loss_type, option, value):
    args = grpo_args(tmp_path, loss_type=loss_type, **{"epsilon_high": None, option: value})
    with pytest.raises(ValueError, match=f"{option}=.*loss_type='{loss_type}'"):
        GRPOTrainer(model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset())

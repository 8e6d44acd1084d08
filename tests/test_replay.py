"""Stale-batch replay: the buffer, the replayed backward, and the trainer on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from rlfuse.algos import policy_loss
from rlfuse.engine import reward_funcs as reward_funcs_mod
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.replay import ReplayBuffer, ReplayItem, replay_backward
from rlfuse.engine.rewards import RewardResult
from rlfuse.engine.rollout import RolloutBatch
from rlfuse.engine.trainer import Trainer, completion_logprobs

DATA = Path(__file__).parent / "data"
REPLAY_KEYS = {"replay_batches", "replay_staleness", "replay_ratio_mean", "replay_ratio_max"}


def fake_item(step, B=2, T=3, device="cpu"):
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    if T:
        mask[0, -1] = False
    batch = RolloutBatch(torch.zeros(B, 1, dtype=torch.long, device=device),
                         torch.ones(B, 1, dtype=torch.long, device=device),
                         torch.zeros(B, T, dtype=torch.long, device=device), mask)
    return ReplayItem(step, batch, torch.zeros(B, device=device), torch.full((B, T), -1.0 * step, device=device))


def test_buffer_keeps_the_last_k_batches_oldest_first():
    buffer = ReplayBuffer(2)
    for step in (1, 2, 3):
        buffer.add(fake_item(step))
    assert [item.step for item in buffer] == [2, 3] and len(buffer) == 2
    off = ReplayBuffer(0)
    off.add(fake_item(1))
    assert len(off) == 0 and list(off) == []


@pytest.mark.parametrize("staleness", [-1, 1.5, True, "2"])
def test_bad_staleness_raises(staleness):
    with pytest.raises(ValueError, match="staleness"):
        ReplayBuffer(staleness)


def test_replay_backward_scales_each_loss_and_reports_staleness_and_ratios():
    weight = torch.tensor(2.0, requires_grad=True)
    items = [fake_item(3), fake_item(4)]
    ratios = {3: (1.5, 3.0), 4: (0.5, 0.75)}

    def loss_fn(item):
        mean, peak = ratios[item.step]
        return weight * item.step, {"ratio_mean": torch.tensor(mean), "ratio_max": torch.tensor(peak)}

    record = replay_backward(items, 5, loss_fn, scale=1 / 3)
    assert weight.grad.item() == pytest.approx((3 + 4) / 3)
    tokens = [int(item.batch.completion_mask.sum()) for item in items]
    assert record == pytest.approx({"replay_batches": 2, "replay_staleness": 1.5,
                                    "replay_ratio_mean": (1.5 * tokens[0] + 0.5 * tokens[1]) / sum(tokens),
                                    "replay_ratio_max": 3.0})
    assert replay_backward([], 5, loss_fn, 1.0) == {"replay_batches": 0, "replay_staleness": 0.0,
                                                     "replay_ratio_mean": None, "replay_ratio_max": None}


def test_negative_staleness_option_fails_clearly():
    with pytest.raises(ValueError, match="--replay-staleness"):
        TrainArgs(replay_staleness=-1).validate()


def full_item(step, device):
    """An item with every optional field set, as a sampling step with ROVER and a reference stores it."""
    item = fake_item(step, device=device)
    logps = torch.randn(2, 3, device=device)
    batch = dataclasses.replace(item.batch, logps=logps, vocab_mean=torch.randn(2, 3, device=device),
                                truncated=torch.tensor([True, False], device=device))
    return dataclasses.replace(item, batch=batch, behaviour_logps=logps,  # the sampler's own tensor, as the trainer
                               behaviour_vocab_mean=batch.vocab_mean, ref_logps=torch.randn(2, 3, device=device))


def assert_same_items(old_items, new_items, device):
    for old, new in zip(old_items, new_items, strict=True):
        assert new.step == old.step
        for name, value in [(f.name, getattr(old, f.name)) for f in dataclasses.fields(ReplayItem)] + [
                ("batch." + f.name, getattr(old.batch, f.name)) for f in dataclasses.fields(RolloutBatch)]:
            got = getattr(new.batch, name[6:]) if name.startswith("batch.") else getattr(new, name)
            if isinstance(value, torch.Tensor):
                assert got.device.type == device.type and got.dtype == value.dtype, name
                assert torch.equal(got.cpu(), value.cpu()), name
            elif name not in ("step", "batch"):
                assert got is None and value is None, name


def test_state_dict_is_plain_values_and_names_every_field(device):
    buffer = ReplayBuffer(2)
    buffer.add(full_item(1, device))
    state = buffer.state_dict()
    assert set(state) == {"staleness", "items"} and state["staleness"] == 2
    item = state["items"][0]
    assert set(item) == {f.name for f in dataclasses.fields(ReplayItem)}  # a new field is not forgotten
    assert set(item["batch"]) == {f.name for f in dataclasses.fields(RolloutBatch)}
    assert type(item["batch"]) is dict and item["step"] == 1 and item["behaviour_logps"].device.type == "cpu"
    assert item["behaviour_logps"] is item["batch"]["logps"]  # one tensor in memory, saved once
    assert ReplayBuffer(3).state_dict() == {"staleness": 3, "items": []}


def test_buffer_state_round_trips_through_a_checkpoint(tmp_path, device):
    from safetensors.torch import save_model

    from rlfuse.engine import checkpoint as ckpt

    buffer = ReplayBuffer(3)
    for item in (fake_item(1, device=device), full_item(2, device), fake_item(3, T=0, device=device),
                 full_item(4, device)):  # the first is evicted; an empty completion; None and set optional fields
        buffer.add(item)
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda folder: save_model(model, str(Path(folder) / "model.safetensors"))
    tokenizer = type("Tok", (), {"save_pretrained": lambda self, folder: None})()
    optimizer = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(tmp_path, model, tokenizer, optimizer, {"step": 4}, {"replay": buffer.state_dict()})
    assert "ReplayItem" not in (path / "extra_state.json").read_text()

    restored = ReplayBuffer(3)
    restored.load_state_dict(ckpt.load_extra_state(path)["replay"], device)
    assert [item.step for item in restored] == [2, 3, 4]
    assert_same_items(list(buffer), list(restored), device)
    assert all(item.behaviour_logps is item.batch.logps for item in list(restored)[::2])  # still one tensor
    smaller = ReplayBuffer(1)  # a resume with a smaller --replay-staleness keeps the newest
    smaller.load_state_dict(buffer.state_dict(), device)
    assert [item.step for item in smaller] == [4]
    (tmp_path / "empty").mkdir()
    empty = ckpt.save_checkpoint(tmp_path / "empty", model, tokenizer, optimizer, {}, {"replay": {"staleness": 2,
                                                                                                "items": []}})
    restored.load_state_dict(ckpt.load_extra_state(empty)["replay"], device)
    assert len(restored) == 0
    (tmp_path / "plain").mkdir()  # a checkpoint saved without extra state (as before replay was saved)
    assert ckpt.load_extra_state(ckpt.save_checkpoint(tmp_path / "plain", model, tokenizer, optimizer, {})) == {}


def good_state():
    buffer = ReplayBuffer(2)
    buffer.add(full_item(1, torch.device("cpu")))
    return buffer.state_dict()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("staleness"), "{'staleness', 'items'}"),
    (lambda s: s.update(items=(1, 2)), "items a list"),
    (lambda s: s["items"].append(fake_item(2)), "replay items[1] must be a dict of ReplayItem fields, got ReplayItem"),
    (lambda s: s["items"][0].pop("advantages"), "replay items[0] lacks ReplayItem's field 'advantages'"),
    (lambda s: s["items"][0].update(extra=1), "replay items[0] has keys ['extra'] that are not ReplayItem fields"),
    (lambda s: s["items"][0].update(step=True), "replay items[0]['step'] must be int, got bool"),
    (lambda s: s["items"][0].update(advantages=[0.0, 1.0]), "replay items[0]['advantages'] must be Tensor, got list"),
    (lambda s: s["items"][0].update(behaviour_logps=None), "replay items[0]['behaviour_logps'] must be Tensor"),
    (lambda s: s["items"][0]["batch"].update(truncated="no"), "replay items[0]['batch']['truncated'] must be Tensor"),
    (lambda s: s["items"][0].update(batch=[]), "replay items[0]['batch'] must be a dict of RolloutBatch fields"),
])
def test_bad_replay_state_names_what_is_wrong(change, message):
    state = good_state()
    change(state)
    buffer = ReplayBuffer(2)
    buffer.add(fake_item(7))
    with pytest.raises(ValueError, match=re.escape(message)):
        buffer.load_state_dict(state, "cpu")
    assert [item.step for item in buffer] == [7]  # a refused state leaves the buffer as it was


def test_missing_optional_fields_take_their_defaults():
    """A state from before a field with a default was added loads, the field at its default."""
    buffer = ReplayBuffer(2)
    optional = good_state()
    del optional["items"][0]["ref_logps"], optional["items"][0]["batch"]["truncated"]  # fields with defaults
    buffer.load_state_dict(optional, "cpu")
    assert next(iter(buffer)).ref_logps is None and next(iter(buffer)).batch.truncated is None


# --------------------------------------------------------------------------------------------------
# The trainer on the real model
# --------------------------------------------------------------------------------------------------


def length_rewards(texts, golds, *args, **kwargs):
    """Deterministic rewards with spread (completion length mod 3), so both runs see the same advantages."""
    return RewardResult([float(len(t) % 3) for t in texts], [False] * len(texts), [False] * len(texts))


def make_trainer(smollm2_dir, tmp_path, staleness, algo="rec"):
    args = TrainArgs(algo=algo, model=smollm2_dir, data=str(DATA / "gsm8k_train_sample.jsonl"), prompts_per_step=2,
                     num_generations=3, max_new_tokens=6, learning_rate=1e-4, replay_staleness=staleness,
                     output_dir=str(tmp_path / f"{algo}-{staleness}"))
    return Trainer(args)


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def runs(smollm2_dir, tmp_path_factory):
    """Two steps of ``rec`` without replay and with --replay-staleness 2 (records, weights after each step)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(reward_funcs_mod, "gsm8k_rewards", length_rewards)
    out = {}
    try:
        for staleness in (0, 2):
            trainer = make_trainer(smollm2_dir, tmp_path_factory.mktemp("replay"), staleness)
            steps = []
            for step in (1, 2):
                steps.append((trainer.step(step), weights(trainer)))
            out[staleness] = (trainer, steps)
    finally:
        patch.undo()
    return out


def test_staleness_zero_is_the_on_policy_step_and_replay_starts_empty(runs):
    (_, plain), (replaying, stale) = runs[0], runs[2]
    (record0, weights0), (record2, weights2) = plain[0], stale[0]
    assert not REPLAY_KEYS & record0.keys()  # the on-policy record is unchanged
    assert record2["replay_batches"] == 0 and record2["replay_ratio_mean"] is None
    assert record0["reward_std"] > 0 and record0["grad_norm"] > 0
    # With nothing to replay yet, the step is the on-policy one, bit for bit.
    for key in ("loss", "grad_norm", "ratio_mean", "clip_frac", "entropy"):
        assert record0[key] == record2[key], key
    assert all(torch.equal(weights0[n], weights2[n]) for n in weights0)


def test_second_step_replays_the_first_batch_against_its_behaviour_policy(runs):
    (_, plain), (replaying, stale) = runs[0], runs[2]
    (record0, weights0), (record2, weights2) = plain[1], stale[1]
    assert record0["loss"] == record2["loss"]  # the same fresh batch from the same weights and seed
    assert record2["replay_batches"] == 1 and record2["replay_staleness"] == 1.0
    assert math.isfinite(record2["replay_ratio_mean"]) and record2["replay_ratio_mean"] != 1.0
    assert record2["replay_ratio_max"] >= record2["replay_ratio_mean"]
    assert any(not torch.equal(weights0[n], weights2[n]) for n in weights0)  # the replayed batch moved them
    assert [item.step for item in replaying.replay] == [1, 2]


def test_replayed_loss_uses_the_stored_behaviour_log_probs(runs):
    trainer = runs[2][0]
    item = next(iter(trainer.replay))
    assert item.behaviour_logps is item.batch.logps  # recorded by the sampler, no extra forward
    loss, metrics = trainer._replay_loss(item)
    with torch.no_grad():
        logps = completion_logprobs(trainer.model, item.batch, trainer.args.temperature).logps
    want, want_metrics = policy_loss(logps, item.behaviour_logps, item.advantages, item.batch.completion_mask,
                                     config=trainer.config)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["ratio_mean"], want_metrics["ratio_mean"], rtol=1e-4, atol=1e-6)

    shifted = dataclasses.replace(item, behaviour_logps=item.behaviour_logps - 0.5)
    changed, changed_metrics = trainer._replay_loss(shifted)
    assert abs(changed.item() - loss.item()) > 1e-4
    assert changed_metrics["ratio_mean"].item() == pytest.approx(metrics["ratio_mean"].item() * math.exp(0.5),
                                                                 rel=1e-4)


def test_resumed_run_replays_what_the_uninterrupted_run_replays(smollm2_dir, tmp_path, monkeypatch):
    """Stop after step 2 (a checkpoint), resume to step 3: step 3 replays the same two stored batches, so its
    record equals the uninterrupted run's. An empty buffer after the resume would replay none."""
    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", length_rewards)

    def run(out, steps, resume=False):
        args = TrainArgs(algo="rec", model=smollm2_dir, data=str(DATA / "gsm8k_train_sample.jsonl"),
                         prompts_per_step=2, num_generations=3, max_new_tokens=6, learning_rate=1e-4,
                         replay_staleness=2, steps=steps, save_every=steps, resume=resume, output_dir=str(out),
                         mixed_precision="no")
        Trainer(args).train()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "parts", 2)
    resumed = run(tmp_path / "parts", 3, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[2]["replay_batches"] == 2
    for key in ("loss", "grad_norm", "replay_ratio_mean", "replay_ratio_max", "reward_mean"):
        assert resumed[2][key] == pytest.approx(whole[2][key], rel=1e-5, abs=1e-7), key

"""The non-finite guard: a NaN gradient skips exactly that update, leaving weights and AdamW state bit-identical,
and ``--max-nonfinite-steps`` such steps in a row stop the run (exit code 2) with the last checkpoint intact."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfuse.engine.args import TrainArgs
from rlfuse.engine.checkpoint import find_checkpoint, verify_checkpoint
from rlfuse.engine.cli import main
from rlfuse.engine.trainer import Trainer

DATA = str(Path(__file__).parent / "data" / "gsm8k_train_sample.jsonl")
SPREAD = ("def spread(prompts, completions, completion_ids, **kwargs):\n"
          "    return [float(i % 2) for i in range(len(prompts))]\n")


def spread(prompts, completions, completion_ids, **kwargs):
    """Rewards with spread in every group, so that every step runs a backward."""
    return [float(i % 2) for i in range(len(prompts))]


def poison(trainer):
    """A hook that turns one parameter's gradient into NaN; returns its handle."""
    return trainer.trainable[0].register_hook(lambda grad: torch.full_like(grad, math.nan))


def snapshot(trainer):
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in trainer.optimizer.state.items()}
    return weights, state


def test_a_nan_gradient_skips_exactly_that_update(smollm2_dir, tmp_path):
    args = TrainArgs(model=smollm2_dir, data=DATA, prompts_per_step=2, num_generations=2, max_new_tokens=6, steps=3,
                     save_every=0, output_dir=str(tmp_path / "run"), dtype="float32", mixed_precision="no")
    trainer = Trainer(args, reward_funcs=[spread])
    assert trainer.step(1)["nonfinite_skipped"] == 0
    weights, state = snapshot(trainer)
    handle = poison(trainer)
    record = trainer.step(2)
    handle.remove()
    assert record["nonfinite_skipped"] == 1 and not math.isfinite(record["grad_norm"])
    after_weights, after_state = snapshot(trainer)
    assert all(torch.equal(weights[name], after_weights[name]) for name in weights)
    assert state.keys() == after_state.keys()
    for key, values in state.items():
        for name, value in values.items():
            assert torch.equal(value, after_state[key][name]), name  # exp_avg, exp_avg_sq and step unchanged
    record = trainer.step(3)  # the next, clean step updates again
    assert record["nonfinite_skipped"] == 0 and math.isfinite(record["grad_norm"])
    assert any(not torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())


def test_steps_in_a_row_stop_the_run_with_the_checkpoint_intact(smollm2_dir, tmp_path, monkeypatch, capsys):
    """Steps 2 and 3 are poisoned, --max-nonfinite-steps 2: step 2 is skipped and saved (its weights are step 1's),
    step 3 stops the run before any save."""
    reward = tmp_path / "spread_reward.py"
    reward.write_text(SPREAD)
    real_step = Trainer.step

    def poisoned(self, step):
        handle = poison(self) if step >= 2 else None
        try:
            return real_step(self, step)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(Trainer, "step", poisoned)
    out = tmp_path / "run"
    code = main(["train", "--model", smollm2_dir, "--data", DATA, "--prompts-per-step", "2", "--num-generations",
                 "2", "--max-new-tokens", "6", "--steps", "5", "--save-every", "1", "--max-nonfinite-steps", "2",
                 "--reward", f"{reward}:spread", "--output-dir", str(out), "--dtype", "float32"])
    assert code == 2
    error = capsys.readouterr().err
    assert "step 3: the loss or the gradient norm was not finite for 2 steps in a row" in error
    assert "is intact (step 2)" in error
    checkpoint = find_checkpoint(out)
    verify_checkpoint(checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 1]
    assert not (out / ".rlfuse.lock").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_nonfinite_steps_must_be_positive(value, tmp_path, capsys):
    assert main(["train", "--max-nonfinite-steps", value, "--output-dir", str(tmp_path / "x")]) == 2
    assert "--max-nonfinite-steps must be >= 1" in capsys.readouterr().err

"""End to end on the real SmolLM2-135M-Instruct: every --algo trains 2 steps, checkpoints, and resumes; on the
``device`` fixture's device (``--device`` of the CLI)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfuse.engine import reward_funcs as reward_funcs_mod
from rlfuse.engine.checkpoint import find_checkpoint
from rlfuse.engine.cli import main
from rlfuse.engine.args import TrainArgs
from rlfuse.engine.rewards import RewardResult
from rlfuse.engine.trainer import Trainer

ALGOS = ["grpo", "dr_grpo", "dapo", "gspo", "topr", "rover"]
KEYS = {"step", "loss", "reward_mean", "reward_std", "accuracy", "format_rate", "completion_len_mean", "kl",
        "clip_frac", "entropy", "grad_norm", "tokens_per_s", "time_rollout", "time_logprobs", "time_update", "truncated_rate", "peak_mem_gb"}
DATA = Path(__file__).parent / "data"
# The first GSM8K train and test questions, shipped with the tests so that they never need the hub.
TINY = ["--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8",
        "--data", str(DATA / "gsm8k_train_sample.jsonl"), "--eval-data", str(DATA / "gsm8k_test_sample.jsonl")]


def read_metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(folder):
    return json.loads((Path(folder) / "checkpoint" / "trainer_state.json").read_text())["step"]


@pytest.fixture
def noisy_rewards(monkeypatch):
    """Real GSM8K rewards plus seeded noise: 8-token completions never solve a problem, and the
    update path needs non-zero advantages to be exercised."""
    real = reward_funcs_mod.gsm8k_rewards
    generator = torch.Generator().manual_seed(7)

    def rewards(texts, golds, *args, **kwargs):
        # the default reward pays only a derived answer: each completion comes with its own question
        assert len(kwargs["questions"]) == len(texts) and all(kwargs["questions"])
        scored = real(texts, golds, *args, **kwargs)
        noise = torch.rand(len(texts), generator=generator).tolist()
        return RewardResult([r + n for r, n in zip(scored.rewards, noise)], scored.correct, scored.formatted)

    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", rewards)


@pytest.mark.parametrize("algo", ALGOS)
def test_algo_trains_checkpoints_and_resumes(algo, smollm2_dir, tmp_path, noisy_rewards, device):
    out = tmp_path / algo
    common = ["train", "--algo", algo, "--model", smollm2_dir, *TINY, "--output-dir", str(out), "--device", device.type]
    assert main([*common, "--steps", "2", "--eval-every", "2", "--eval-prompts", "2"]) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert KEYS <= record.keys()
        assert record["kl"] is None  # beta is 0 for every built-in algorithm
        for key, value in record.items():
            if value is not None:
                assert math.isfinite(value), (key, value)
        assert record["grad_norm"] > 0 and record["tokens_per_s"] > 0
    assert 0.0 <= records[1]["eval_accuracy"] <= 1.0
    evaluated = json.loads((out / "eval" / "step_000002.json").read_text())  # the per-problem record
    assert evaluated["step"] == 2 and len(evaluated["problems"]) == 2
    assert sum(p["greedy_correct"] for p in evaluated["problems"]) / 2 == records[1]["eval_accuracy"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_000002.json"]  # no temporary file left
    assert (out / "reward.png").stat().st_size > 1000
    assert checkpoint_step(out) == 2
    trained = load_file(out / "checkpoint" / "model.safetensors")
    initial = load_file(Path(smollm2_dir) / "model.safetensors")
    # The update changed the weights (compared in the saved dtype: bfloat16 on a GPU).
    assert any(not torch.equal(trained[k], initial[k].to(trained[k].dtype)) for k in initial)

    assert main([*common, "--steps", "3", "--resume"]) == 0
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == records
    assert checkpoint_step(out) == 3


def test_kl_reference_and_multiple_iterations_on_the_baseline_paths(smollm2_dir, tmp_path, noisy_rewards, device):
    out = tmp_path / "kl"
    args = ["train", "--algo", "grpo", "--model", smollm2_dir, *TINY, "--output-dir", str(out), "--steps", "1",
            "--device", device.type,
            "--beta", "0.04", "--kl-estimator", "k3", "--num-iterations", "3", "--loss-impl", "logits",
            "--rollout", "hf", "--no-stop-after-answer", "--training-forward", "padded"]
    assert main(args) == 0
    (record,) = read_metrics(out)
    assert record["kl"] is not None and record["kl"] >= 0  # k3 is non-negative
    assert record["time_logprobs"] > 0  # old and reference log-probs were computed
    assert record["ratio_mean"] != 1.0  # the later iterations ran off the sampling policy


def test_sampler_log_probs_serve_as_old_log_probs(smollm2_dir, tmp_path, noisy_rewards, device):
    out = tmp_path / "sampler-old"
    assert main(["train", "--algo", "rover", "--model", smollm2_dir, *TINY, "--output-dir", str(out),
                 "--device", device.type, "--steps", "1", "--num-iterations", "2", "--gradient-checkpointing"]) == 0
    (record,) = read_metrics(out)
    assert math.isfinite(record["loss"]) and record["ratio_mean"] != 1.0  # the second update ran off-policy


def test_training_accuracy_counts_truncated_completions_as_wrong(smollm2_dir, tmp_path, monkeypatch, device):
    """The logged ``accuracy`` follows the reward and ``rlfuse eval``: a completion cut at --max-new-tokens never
    gave its answer, so it is wrong even when its text parses as correct. Every text is marked correct here; at 8
    new tokens the one-shot completions are mostly cut, so accuracy must be 1 - truncated_rate, not 1."""
    real = reward_funcs_mod.gsm8k_rewards
    generator = torch.Generator().manual_seed(11)

    def all_correct(texts, golds, *args, **kwargs):
        scored = real(texts, golds, *args, **kwargs)
        noise = torch.rand(len(texts), generator=generator).tolist()
        return RewardResult(noise, [True] * len(texts), scored.formatted)

    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", all_correct)
    out = tmp_path / "run"
    assert main(["train", "--model", smollm2_dir, *TINY, "--num-generations", "4", "--output-dir", str(out),
                 "--device", device.type, "--steps", "1", "--prompt-style", "one_shot"]) == 0
    (record,) = read_metrics(out)
    assert record["truncated_rate"] > 0
    assert record["accuracy"] == pytest.approx(1.0 - record["truncated_rate"])


# Run in the killed subprocess: pause (and say so in a marker file) on the second call of what the phase names,
# that is during step 2, so that the test can kill -9 the run there.
PAUSE_IN_PHASE = """
import os, pathlib, sys, time
import torch
from rlfuse.engine import checkpoint, cli, sampler

phase, marker, calls = os.environ["KILL_PHASE"], pathlib.Path(os.environ["KILL_MARKER"]), [0]

def pausing(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            marker.write_text(phase)
            time.sleep(600)
        return real(*args, **kwargs)
    return wrapped

if phase == "sampling":  # inside the sampler, its KV cache built, before the batch is returned
    sampler.SharedPrefixSampler.generate = pausing(sampler.SharedPrefixSampler.generate)
elif phase == "update":  # after the backward, before AdamW's step
    torch.optim.AdamW.step = pausing(torch.optim.AdamW.step)
else:  # "save": the weights written to the staging folder, the optimizer state not yet
    checkpoint.torch.save = pausing(checkpoint.torch.save)
sys.exit(cli.main(sys.argv[1:]))
"""
KILL_ARGS = ["--algo", "topr", *TINY, "--steps", "3", "--save-every", "1", "--dtype", "float32",
             "--mixed-precision", "no"]


@pytest.fixture(scope="module")
def uninterrupted(smollm2_dir, tmp_path_factory):
    """The metrics and final weights of the run that the killed ones must reproduce (it never saves: saving must
    not change the trajectory either)."""
    whole = tmp_path_factory.mktemp("whole")
    args = ["train", "--model", smollm2_dir, *KILL_ARGS, "--device", "cpu", "--output-dir", str(whole / "run"),
            "--save-every", "0"]
    assert main(args) == 0
    assert find_checkpoint(whole / "run") is None
    return read_metrics(whole / "run")


@pytest.mark.parametrize("phase", ["sampling", "update", "save"])
def test_killed_run_resumes_to_the_same_result(phase, smollm2_dir, tmp_path, uninterrupted, device):
    """kill -9 during step 2's sampling, update or checkpoint save; --resume continues from step 1's checkpoint
    (taking over the dead run's lock) and matches the uninterrupted run step for step, in float32."""
    if device.type != "cpu":
        pytest.skip("the uninterrupted reference runs on the CPU")
    killed, marker = tmp_path / "killed", tmp_path / "marker"
    args = ["--model", smollm2_dir, *KILL_ARGS, "--device", device.type, "--output-dir", str(killed)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", KILL_PHASE=phase, KILL_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_PHASE, "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    stderr = proc.communicate()[1].decode(errors="replace")
    assert marker.exists(), stderr[-2000:]
    assert checkpoint_step(killed) == 1  # step 2 never completed, in any phase
    assert (killed / ".rlfuse.lock").exists()  # left by the killed run: stale, taken over below
    if phase == "save":
        assert list(killed.glob(".checkpoint-*"))  # the torn staging folder, never read

    assert main(["train", *args, "--resume"]) == 0
    resumed = read_metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, uninterrupted):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_len_mean"] == b["completion_len_mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert not (killed / ".rlfuse.lock").exists()


def test_full_disk_is_reported_before_training(smollm2_dir, tmp_path, monkeypatch, capsys, device):
    """A disk without room for one checkpoint (1.6 GB here: fp32 weights and AdamW's two moments) stops the run
    before its first step, with the way out; --save-every 0 trains on it and writes no checkpoint."""
    from collections import namedtuple

    from rlfuse.engine import checkpoint as ckpt

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**30, 2**30))  # 1 GiB free
    out = tmp_path / "full"
    argv = ["train", "--model", smollm2_dir, *TINY, "--output-dir", str(out), "--steps", "1", "--device", device.type]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "needs 1.5" in error and "1.00 GiB free" in error and "--save-every 0" in error
    assert not (out / "metrics.jsonl").exists()

    assert main([*argv, "--save-every", "0"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert find_checkpoint(out) is None and not list(out.glob(".checkpoint-*"))
    assert "checkpoint/" not in capsys.readouterr().out


def test_gguf_alias_runs_one_step(tmp_path, device):
    out = tmp_path / "alias"
    assert main(["train", "--model", "smollm2-135m", *TINY, "--steps", "1", "--output-dir", str(out),
                 "--device", device.type]) == 0
    assert checkpoint_step(out) == 1
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert "quantization_config" not in config  # saved as plain float weights, loadable by any trainer


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-generations", "1"], "num-generations 1"),
        (["--data", "/no/such/file.jsonl"], "no such file or folder"),
        (["--eval-every", "1", "--eval-data", "/no/such/test.jsonl"], "does not exist"),
        (["--resume"], "resume"),
        (["--steps", "0"], "--steps"),
        (["--save-every", "-1"], "--save-every"),
        (["--eval-on-start"], "--eval-on-start needs --eval-every"),
    ],
)
def test_bad_options_fail_clearly(extra, message, tmp_path, capsys):
    argv = ["train", "--model", "smollm2-135m", "--output-dir", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written for a run that could not start


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--output-dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_unknown_algo_is_rejected_by_the_cli():
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--algo", "ppo"])
    assert exit_info.value.code == 2


def length_rewards(texts, golds, *args, **kwargs):
    """A deterministic reward with spread (completion length mod 3), so equal rollouts get equal updates."""
    return RewardResult([float(len(t) % 3) for t in texts], [False] * len(texts), [False] * len(texts))


@pytest.mark.parametrize("loss_impl", ["fused_linear", "logits"])
def test_shared_prefix_training_forward_matches_the_padded_one(loss_impl, smollm2_dir, tmp_path, monkeypatch, device):
    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", length_rewards)
    records, weights = [], []
    for forward in ("shared_prefix", "padded"):
        args = TrainArgs(algo="grpo", model=smollm2_dir, data=str(DATA / "gsm8k_train_sample.jsonl"),
                         prompts_per_step=2, num_generations=3, max_new_tokens=6, beta=0.04, num_iterations=2,
                         recompute_old_logps=True, learning_rate=1e-5, training_forward=forward,
                         loss_impl=loss_impl, output_dir=str(tmp_path / forward), device=device.type,
                         dtype="float32", mixed_precision="no")  # float32 matmuls on every device: the two
        # forwards must agree to float32 rounding (dtype auto is bfloat16 on a GPU, mixed precision auto is bf16
        # matmuls on a CPU with AVX512-BF16)
        trainer = Trainer(args)
        records.append(trainer.step(1))
        weights.append(trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    shared, padded = records
    # lr 1e-5 moves the second iteration off-policy (ratio ~1.15, KL ~0.1) without the blow-up of 1e-4 (KL in
    # the thousands through exp(), where float32 rounding of two equal computations differs by 3e-4).
    assert 0.01 < shared["kl"] < 10 and shared["ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert shared["completion_len_mean"] == padded["completion_len_mean"] and shared["reward_std"] > 0
    for key in ("loss", "kl", "ratio_mean", "entropy", "grad_norm"):
        assert shared[key] == pytest.approx(padded[key], rel=2e-4, abs=1e-6), key
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_disabled(smollm2_dir, tmp_path, monkeypatch, device):
    monkeypatch.setattr(reward_funcs_mod, "gsm8k_rewards", length_rewards)
    out = tmp_path / "lora"
    common = ["train", "--model", smollm2_dir, *TINY, "--output-dir", str(out), "--lora-rank", "4", "--beta", "0.1",
              "--learning-rate", "1e-3", "--device", device.type]
    assert main([*common, "--steps", "2"]) == 0
    first, second = read_metrics(out)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0 at init: the adapted model is the base
    assert second["kl"] > 1e-9  # after one update the policy has moved away from its reference
    saved = load_file(out / "checkpoint" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)
    assert not (out / "checkpoint" / "model.safetensors").exists()  # adapters only, the base stays shared
    assert main([*common, "--steps", "3", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_eval_on_start_reports_initial_beside_final(smollm2_dir, tmp_path, noisy_rewards, device, capsys):
    """--eval-on-start evaluates the initial weights as step 0; the run ends with both side by side, and a resumed
    run does not evaluate step 0 again."""
    out = tmp_path / "run"
    common = ["train", "--algo", "grpo", "--model", smollm2_dir, *TINY, "--output-dir", str(out),
              "--device", device.type, "--eval-every", "2", "--eval-prompts", "2", "--eval-on-start"]
    assert main([*common, "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    initial = json.loads((out / "eval" / "step_000000.json").read_text())
    assert initial["step"] == 0 and len(initial["problems"]) == 2
    assert "| metric | step 0 (initial) | step 1 (final) |" in printed
    paid = sum(p["greedy_paid"] for p in initial["problems"])
    assert f"| pass@1 greedy, paid (right and derived) | {paid / 2:.3f} ({paid}/2) |" in printed
    written = (out / "eval" / "step_000000.json").stat().st_mtime_ns
    assert main([*common, "--steps", "2", "--resume"]) == 0
    assert (out / "eval" / "step_000000.json").stat().st_mtime_ns == written
    assert "step 2 (final)" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

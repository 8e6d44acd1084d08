"""``rlfuse train`` on the user's own prompts and rewards (TRL's conventions), on the real SmolLM2-135M-Instruct:
user rewards by file and module path and from Python, weights, plain and conversational prompts, columns
reaching the rewards, reward faults ending with exit code 2 and the checkpoint intact, and models outside the
engine decoder's families."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from rlfuse.engine.args import TrainArgs
from rlfuse.engine.checkpoint import find_checkpoint, verify_checkpoint
from rlfuse.engine.cli import main
from rlfuse.engine.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = ["--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6", "--dtype", "float32",
        "--mixed-precision", "no"]

# Rewards that append what they returned to the file in $RLFUSE_TEST_REWARD_LOG, so the test can compare the
# logged means with the functions' outputs.
REWARDS = textwrap.dedent("""
    import json, os

    def _record(name, values):
        with open(os.environ["RLFUSE_TEST_REWARD_LOG"], "a") as handle:
            handle.write(json.dumps({"name": name, "values": values}) + "\\n")
        return values

    def _text(completion):
        return completion if isinstance(completion, str) else completion[0]["content"]

    def tagged(prompts, completions, completion_ids, tag, **kwargs):
        # a column of the data set: its per-sample value decides the reward
        return _record("tagged", [float(len(_text(c)) % 3) + (1.0 if t == "b" else 0.0)
                                  for c, t in zip(completions, tag)])

    def ids_length(prompts, completions, completion_ids, **kwargs):
        return _record("ids_length", [float(len(ids)) for ids in completion_ids])

    def shape(prompts, completions, completion_ids, **kwargs):
        # plain prompts and completions are strings, conversational ones lists of messages
        return _record("shape", [float(isinstance(p, str)) + 2 * float(isinstance(c, str))
                                 for p, c in zip(prompts, completions)])

    def raises(prompts, completions, completion_ids, **kwargs):
        if kwargs["trainer_state"].global_step >= 2:
            raise RuntimeError("scorer crashed")
        return [float(i % 2) for i in range(len(prompts))]

    def all_none(prompts, completions, completion_ids, **kwargs):
        return [None] * len(prompts)

    def short(prompts, completions, completion_ids, **kwargs):
        return [1.0] * (len(prompts) - 1)

    def nan(prompts, completions, completion_ids, **kwargs):
        return [float("nan")] + [0.0] * (len(prompts) - 1)
""")


def read_metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """The reward file's path, importable as the module ``user_rewards_mod``; the log of what they returned."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "user_rewards_mod.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(folder))
    log = tmp_path / "reward_log.jsonl"
    monkeypatch.setenv("RLFUSE_TEST_REWARD_LOG", str(log))
    return folder / "user_rewards_mod.py", log


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def plain_data(tmp_path):
    return write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"Count to {n}:", "tag": "ab"[n % 2]} for n in range(4)])


def returned(log):
    by_name = {}
    for line in Path(log).read_text().splitlines():
        entry = json.loads(line)
        by_name.setdefault(entry["name"], []).append(entry["values"])
    return by_name


def test_user_rewards_by_path_and_module_with_weights_and_columns(smollm2_dir, tmp_path, user_rewards):
    path, log = user_rewards
    out = tmp_path / "run"
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"Name a color, {n}."}],
                                                 "tag": "ab"[n % 2]} for n in range(4)])
    assert main(["train", "--model", smollm2_dir, "--data", data, *FAST, "--steps", "2", "--output-dir", str(out),
                 "--reward", f"{path}:tagged", "--reward", "user_rewards_mod:ids_length",
                 "--reward", "user_rewards_mod:shape", "--reward-weights", "1.0", "0.25", "2.0",
                 "--save-every", "0"]) == 0
    records, outputs = read_metrics(out), returned(log)
    assert [r["step"] for r in records] == [1, 2] and "accuracy" not in records[0]  # no math reward, no accuracy
    for step, record in enumerate(records):
        tagged, lengths, shape = (outputs[name][step] for name in ("tagged", "ids_length", "shape"))
        assert record["reward/tagged"] == pytest.approx(sum(tagged) / 4)
        assert record["reward/ids_length"] == pytest.approx(sum(lengths) / 4)
        assert shape == [0.0] * 4  # conversational prompts and completions reached the function as messages
        total = [a + 0.25 * b + 2.0 * c for a, b, c in zip(tagged, lengths, shape)]
        assert record["reward_mean"] == pytest.approx(sum(total) / 4)
        assert all(1 <= n <= 6 for n in lengths)  # completion_ids: each sample's tokens, up to its stop token


def test_plain_prompts_from_python_with_callables(smollm2_dir, tmp_path, user_rewards):
    _, log = user_rewards
    import user_rewards_mod

    args = TrainArgs(model=smollm2_dir, data=plain_data(tmp_path), prompts_per_step=2, num_generations=2,
                     max_new_tokens=6, steps=1, save_every=0, output_dir=str(tmp_path / "py"),
                     reward_weights=(1.0, 3.0), dtype="float32", mixed_precision="no")
    Trainer(args, reward_funcs=[user_rewards_mod.tagged, user_rewards_mod.shape]).train()
    (record,) = read_metrics(tmp_path / "py")
    outputs = returned(log)
    assert outputs["shape"][0] == [3.0] * 4  # plain prompts: strings in, strings out
    assert record["reward/shape"] == 3.0
    assert record["reward_mean"] == pytest.approx(sum(outputs["tagged"][0]) / 4 + 9.0)


@pytest.mark.parametrize("function, message", [
    ("raises", "reward function 'raises' raised RuntimeError: scorer crashed on sample 0 (prompt: 'Count to"),
    ("all_none", "no reward function applies to sample 0"),
    ("short", "returned 3 rewards for 4 samples"),
    ("nan", "returned nan for sample 0"),
])
def test_reward_faults_stop_with_exit_code_2_and_keep_the_checkpoint(function, message, smollm2_dir, tmp_path,
                                                                     user_rewards, capsys):
    out = tmp_path / function
    code = main(["train", "--model", smollm2_dir, "--data", plain_data(tmp_path), *FAST, "--steps", "3",
                 "--save-every", "1", "--output-dir", str(out), "--reward", f"user_rewards_mod:{function}"])
    assert code == 2
    assert message in capsys.readouterr().err
    if function == "raises":  # step 1 scored and saved; step 2's fault lost nothing of it
        checkpoint = find_checkpoint(out)
        verify_checkpoint(checkpoint)
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
        assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / ".rlfuse.lock").exists()  # the lock is dropped on the way out


@pytest.mark.parametrize("rows, message", [
    ([{"text": "no prompt here"}], "its rows have columns ['text']"),
    ("{\"prompt\": \"ok\"}\n{broken\n", "line 2"),
])
def test_malformed_data_fails_before_the_model_loads(rows, message, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    if isinstance(rows, str):
        path.write_text(rows)
    else:
        write_jsonl(path, rows)
    assert main(["train", "--model", "/no/such/model", "--data", str(path), "--reward", "format",
                 "--output-dir", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert message in error and str(path) in error
    assert not (tmp_path / "x").exists()


def test_math_reward_on_data_without_an_answer_column_fails_early(tmp_path, capsys):
    assert main(["train", "--model", "/no/such/model", "--data", plain_data(tmp_path),
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "no 'answer' column, which the math reward reads" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt2_dir(smollm2_dir, tmp_path_factory):
    """A tiny random GPT-2 (a family the engine's decoder does not cover) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_model_outside_the_decoder_families_trains_through_transformers(gpt2_dir, tmp_path, capsys):
    spread = tmp_path / "spread.py"
    spread.write_text("def spread(prompts, completions, completion_ids, **kwargs):\n"
                      "    return [float(i % 2) for i in range(len(prompts))]\n")
    common = ["train", "--model", gpt2_dir, "--data", str(EXAMPLES / "data" / "keywords.jsonl"), *FAST,
              "--reward", f"{spread}:spread", "--steps", "1"]
    assert main([*common, "--output-dir", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert out.count("not 'gpt2'") == 1 and "--rollout hf" in out and "--training-forward padded" in out
    (record,) = read_metrics(tmp_path / "auto")
    assert record["grad_norm"] > 0
    for flag in (["--rollout", "engine"], ["--training-forward", "shared_prefix"]):
        assert main([*common, *flag, "--output-dir", str(tmp_path / "explicit")]) == 2
        error = capsys.readouterr().err
        assert "llama" in error and "'gpt2'" in error and "--rollout hf --training-forward padded" in error


class Touch:
    """Unpickling it creates ``marker``: what a malicious checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_an_edited_or_malicious_checkpoint(smollm2_dir, tmp_path, capsys):
    """A changed byte, and a pickle that would create a file even behind a manifest recomputed to match it: both
    refused on --resume with exit code 2, the file never created, the checkpoint left as it was."""
    from rlfuse.engine import checkpoint as ckpt

    out = tmp_path / "run"
    argv = ["train", "--model", smollm2_dir, "--data", str(Path(__file__).parent / "data" / "gsm8k_train_sample.jsonl"),
            *FAST, "--output-dir", str(out)]
    assert main([*argv, "--steps", "1"]) == 0
    checkpoint = find_checkpoint(out)
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 1
    weights.write_bytes(bytes(edited))
    assert main([*argv, "--steps", "2", "--resume"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    weights.write_bytes(original)

    marker = tmp_path / "pwned"
    torch.save({"state": Touch(marker), "param_groups": []}, checkpoint / "optimizer.pt")
    ckpt._write_manifest(checkpoint)  # an attacker who also rewrote the manifest
    assert main([*argv, "--steps", "2", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "optimizer.pt" in error and not marker.exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_conversational_prompts_without_a_chat_template_fail_before_training(gpt2_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-template"
    shutil.copytree(gpt2_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    assert main(["train", "--model", str(folder), "--data", str(EXAMPLES / "data" / "keywords.jsonl"), *FAST,
                 "--reward", "format", "--output-dir", str(tmp_path / "x")]) == 2
    assert "has no chat template, which conversational prompts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_example_runs_from_the_command_line_and_from_python(smollm2_dir, tmp_path, monkeypatch, capsys):
    """docs/cli.md's two forms of examples/custom_reward.py, one short step each."""
    import importlib.util
    import sys

    short = ["--model", smollm2_dir, "--steps", "1", "--max-new-tokens", "6", "--prompts-per-step", "2",
             "--num-generations", "2", "--save-every", "0"]
    example = EXAMPLES / "custom_reward.py"
    assert main(["train", "--data", str(EXAMPLES / "data" / "keywords.jsonl"), "--reward", f"{example}:keyword_reward",
                 "--reward", f"{example}:brevity_reward", "--reward-weights", "1.0", "0.5", *short,
                 "--output-dir", str(tmp_path / "cli")]) == 0
    spec = importlib.util.spec_from_file_location("custom_reward_example", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(EXAMPLES.parent)  # its default --data is relative to the repository
    monkeypatch.setattr(sys, "argv", ["custom_reward.py", *short, "--output-dir", str(tmp_path / "py")])
    module.main()
    for run in ("cli", "py"):
        (record,) = read_metrics(tmp_path / run)
        assert record["reward_mean"] == pytest.approx(record["reward/keyword_reward"]
                                                      + 0.5 * record["reward/brevity_reward"])
        assert record["reward/brevity_reward"] == 1.0  # 6 tokens are short

"""rlfuse eval: the metrics of scripted completions against hand-counted values, truncation flags, CPU peak
memory, and the command on the real SmolLM2-135M-Instruct with a tiny budget."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlfuse.engine.cli import main
from rlfuse.engine.data import Example
from rlfuse.engine.evaluate import (answer_concentration, evaluate_examples, flat_metrics, format_table,
                                    majority_baseline)
from rlfuse.engine.rollout import RolloutBatch, truncated_rows

DATA = Path(__file__).parent / "data"
STOP, CUT = 0, 1  # the fake vocabulary's stop token, and a token that is not one


def test_truncated_rows_against_a_loop(device):
    ids = torch.tensor([[5, 6, 0, 9], [5, 6, 7, 8], [0, 9, 9, 9], [5, 2, 2, 2]], device=device)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool, device=device)
    stop_ids = [0, 2]
    expected = []
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        last = [token for token, keep in zip(row, row_mask) if keep][-1]
        expected.append(last not in stop_ids)
    assert truncated_rows(ids, mask, stop_ids).tolist() == expected == [False, True, False, False]
    assert truncated_rows(ids, mask, torch.tensor(stop_ids)).tolist() == expected


class FakeTokenizer:
    """Prompts are the questions' indices; a completion row [text id, STOP or CUT] decodes to its text."""

    def __init__(self, questions, texts):
        self.questions, self.texts = questions, texts

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return messages[0]["content"].split("\n")[0]

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [self.questions.index(text)]}

    def batch_decode(self, ids, skip_special_tokens):
        return [self.texts[row[0]] for row in ids.tolist()]


class FakeRollout:
    """Scripted completions: ``script[(problem, greedy)]`` lists (text id, truncated) for its samples."""

    def __init__(self, script):
        self.script, self.stop_ids = script, [STOP]
        self.model = torch.nn.Linear(1, 1)

    def generate(self, prompts, num_generations, max_new_tokens, temperature, greedy=False):
        torch.rand(3)  # sampling consumes random numbers, as the real sampler does
        rows = [[text, CUT if cut else STOP] for (problem,) in prompts for text, cut in self.script[problem, greedy]]
        assert len(rows) == len(prompts) * num_generations
        ids = torch.tensor(rows)
        return RolloutBatch(ids[:, :1], torch.ones_like(ids[:, :1]), ids, torch.ones_like(ids, dtype=torch.bool))


TEXTS = ["Half of 4 is 2.\n#### 2", "#### 4", "#### 2", "It is 2", "#### 3", "#### 5", "no answer", "8 / 4 = 2\n#### 2"]


def comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_metrics_of_scripted_completions():
    examples = [Example("q0", "2"), Example("q1", "5")]
    script = {
        (0, True): [(0, False)], (1, True): [(1, False)],  # greedy: right, then wrong
        (0, False): [(2, False), (3, False), (4, False), (2, True)],  # 2 right; the cut "#### 2" is wrong
        (1, False): [(5, False), (5, False), (5, False), (6, False)],  # 3 right, one without an answer
    }
    rollout = FakeRollout(script)
    tokenizer = FakeTokenizer([ex.question for ex in examples], TEXTS)
    result = evaluate_examples(rollout, tokenizer, examples, num_samples=4, batch_size=1)
    assert result["pass@1"] == 0.5
    assert result["greedy"] == {"accuracy": 0.5, "derived_accuracy": 0.0, "format_rate": 1.0, "truncated_rate": 0.0,
                                "completion_len_mean": 2.0, "top_answer_share": 0.5}
    assert result["majority_baseline"] == 0.5 and result["top_answer"] in ("2", "4")
    for k in (1, 2, 4):
        oracle = (comb_pass_at_k(4, 2, k) + comb_pass_at_k(4, 3, k)) / 2
        assert result["pass@k"][str(k)] == pytest.approx(oracle)
    assert list(result["pass@k"]) == ["1", "2", "4"]
    assert result["diversity"] == pytest.approx((2 + 1) / 2)  # {2, 3}, then {5}: "no answer" is no answer
    assert result["sampled"] == {"accuracy": 5 / 8, "derived_accuracy": 0.0, "format_rate": 6 / 8,
                                 "truncated_rate": 1 / 8, "completion_len_mean": 2.0}
    problems = result["problems"]  # per problem, in order: what a paired comparison of two models needs
    assert [p["gold"] for p in problems] == ["2", "5"]
    assert [p["greedy_correct"] for p in problems] == [True, False]
    assert [p["greedy_answer"] for p in problems] == ["2", "4"]
    assert [p["greedy_completion"] for p in problems] == [TEXTS[0], TEXTS[1]]
    assert [p["greedy_truncated"] for p in problems] == [False, False]
    assert [p["sampled_correct"] for p in problems] == [2, 3]
    assert problems[0]["sampled_answers"] == ["2", "2", "3", "2"] and problems[1]["sampled_answers"][3] is None
    record = flat_metrics(result)
    assert record["eval_accuracy"] == 0.5 and record["eval_pass@4"] == result["pass@k"]["4"]
    # no sample derives its answer (derived_accuracy 0 above): nothing is paid at any k
    assert [p["sampled_paid"] for p in problems] == [0, 0] and set(result["pass@k_paid"].values()) == {0.0}
    assert record["eval_pass@4_paid"] == 0.0 and [p["greedy_paid"] for p in problems] == [False, False]
    assert record["eval_diversity"] == 1.5 and record["eval_truncated_rate"] == 0.0
    table = format_table(result, 4, 0.7)
    assert "| pass@1 (greedy)" in table and "| 0.5000 |" in table and "pass@4 (n=4, T=0.7)" in table
    assert record["eval_top_answer_share"] == 0.5 and "one constant answer" in table


def test_a_constant_guess_is_seen_against_the_majority_baseline():
    """A policy that prints one number for every question: its pass@1 equals the majority baseline and the
    most frequent answer's share is 1."""
    golds = ["2", "7", "2", "9", "2", "11"]
    examples = [Example(f"q{i}", gold) for i, gold in enumerate(golds)]
    examples[0] = Example("8 cakes for 4 boys", "2")
    script = {(i, True): [(2, False)] for i in range(len(golds))}  # "#### 2" whatever the question
    script[0, True] = [(7, False)]  # "8 / 4 = 2": derived from the question's numbers
    tokenizer = FakeTokenizer([ex.question for ex in examples], TEXTS)
    result = evaluate_examples(FakeRollout(script), tokenizer, examples, batch_size=4)
    assert result["pass@1"] == result["majority_baseline"] == 0.5
    assert result["greedy"]["derived_accuracy"] == pytest.approx(1 / 6)  # only the derived 2 counts
    # With a gold equation (SVAMP), the step must be the equation's: 8 / 4 is, 8 - 6 would not be.
    for equation, paid in (("( 8.0 / 4.0 )", 1 / 6), ("( 8.0 - 6.0 )", 0.0)):
        examples[0] = Example("8 cakes for 4 boys", "2", equation)
        result = evaluate_examples(FakeRollout(script), tokenizer, examples, batch_size=4)
        assert result["greedy"]["derived_accuracy"] == pytest.approx(paid)
        assert result["problems"][0]["greedy_paid"] == (paid > 0)
    assert result["top_answer"] == "2" and result["greedy"]["top_answer_share"] == 1.0
    assert answer_concentration([None, "3", "4", "3"]) == ("3", 0.5)
    assert answer_concentration([None, None]) == (None, 0.0)
    assert majority_baseline(["1", "5", "5"]) == pytest.approx(2 / 3)


def test_sampling_leaves_the_callers_random_state_alone():
    examples = [Example("q0", "2")]
    script = {(0, True): [(0, False)], (0, False): [(2, False), (3, False)]}
    rollout, tokenizer = FakeRollout(script), FakeTokenizer(["q0"], TEXTS)
    torch.manual_seed(0)
    torch.rand(3)  # what the greedy pass draws
    expected = torch.rand(4)
    torch.manual_seed(0)
    evaluate_examples(rollout, tokenizer, examples, num_samples=2)
    assert torch.equal(torch.rand(4), expected)


def test_no_problems_and_bad_k():
    with pytest.raises(ValueError, match="no problems"):
        evaluate_examples(FakeRollout({}), FakeTokenizer([], TEXTS), [], num_samples=2)
    script = {(0, True): [(0, False)], (0, False): [(2, False), (3, False)]}
    with pytest.raises(ValueError, match="k must be"):
        evaluate_examples(FakeRollout(script), FakeTokenizer(["q0"], TEXTS), [Example("q0", "2")], 2, ks=[3])


def test_cpu_peak_memory_sees_a_large_allocation():
    # In a fresh process: in this one, memory freed by earlier tests stays resident, and a new tensor may
    # reuse it without raising the resident set.
    code = (
        "import torch\n"
        "from rlfuse.engine.memory import peak_memory_gb, reset_peak_memory\n"
        "cpu = torch.device('cpu')\n"
        "reset_peak_memory(cpu)\n"
        "before = peak_memory_gb(cpu)\n"
        "block = torch.ones(64 * 2**20)  # 256 MiB, written so that it is resident\n"
        "print(peak_memory_gb(cpu) - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert float(out.stdout.strip().splitlines()[-1]) > 0.2


def test_eval_command_on_the_real_model(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", smollm2_dir, "--data", str(DATA / "svamp_test_sample.jsonl"), "--num-problems", "3",
            "--num-samples", "4", "--ks", "1", "4", "--max-new-tokens", "12", "--batch-size", "2", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_problems"] == 3 and list(result["pass@k"]) == ["1", "4"]
    assert 0.0 <= result["pass@k"]["1"] <= result["pass@k"]["4"] <= 1.0
    assert 0.0 <= result["diversity"] <= 4.0
    for part in ("greedy", "sampled"):
        rates = result[part]
        assert 0 < rates["completion_len_mean"] <= 12 and 0 <= rates["truncated_rate"] <= 1
        if rates["truncated_rate"] == 1.0:
            assert rates["completion_len_mean"] == 12 and rates["accuracy"] == 0.0
    assert result["args"]["num_samples"] == 4
    assert f"| {result['pass@1']:.4f} |" in printed and "distinct answers per problem" in printed and str(out) in printed
    # Greedy decoding is deterministic and sampling seeded: a second run gives the same numbers.
    assert main([*argv[:-1], str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: again[k] for k in ("pass@1", "pass@k", "diversity", "greedy", "sampled")} == \
           {k: result[k] for k in ("pass@1", "pass@k", "diversity", "greedy", "sampled")}


@pytest.mark.parametrize("extra, message", [(["--ks", "9"], "--ks"), (["--temperature", "0"], "--temperature"),
                                            (["--data", "/no/such.jsonl"], "does not exist")])
def test_eval_bad_options_fail_clearly(extra, message, tmp_path, capsys):
    assert main(["eval", "--num-samples", "4", "--output", str(tmp_path / "x.json"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

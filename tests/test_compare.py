"""rlfuse compare on the real SmolLM2-135M-Instruct with a tiny budget: same options per algorithm, a figure,
a summary whose rows are the runs' last evaluations, and resumption."""

import json
from pathlib import Path

import pytest

from rlfuse.engine.cli import main
from rlfuse.engine.compare import CompareArgs, summarize, summary_markdown

DATA = Path(__file__).parent / "data"
TINY = ["--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6",
        "--data", str(DATA / "svamp_train_sample.jsonl"), "--eval-data", str(DATA / "svamp_test_sample.jsonl"),
        "--eval-prompts", "2", "--eval-samples", "2"]


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_compare_runs_resumes_and_summarizes(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--algos", "grpo", "topr", "--model", smollm2_dir, *TINY, "--output-dir", str(out)]
    assert main([*argv, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    states = {algo: json.loads((out / algo / "checkpoint" / "trainer_state.json").read_text())["args"]
              for algo in ("grpo", "topr")}
    assert states["grpo"].pop("algo") == "grpo" and states["topr"].pop("algo") == "topr"
    states["grpo"].pop("output_dir"), states["topr"].pop("output_dir")
    assert states["grpo"] == states["topr"]  # the same seed, data, budget and evaluation
    assert states["grpo"]["eval_every"] == 2  # evaluated at the end although --eval-every was left at 0

    rows = json.loads((out / "summary.json").read_text())
    assert [r["algo"] for r in rows] == ["base model", "grpo", "topr"]
    base = json.loads((out / "base_eval.json").read_text())
    assert rows[0] == {"algo": "base model", "step": 0, **base}
    for row in rows[1:]:
        last = metrics(out / row["algo"])[-1]
        assert row["step"] == last["step"] == 2
        for key in ("eval_accuracy", "eval_pass@1", "eval_pass@2", "eval_diversity", "reward_mean"):
            assert row[key] == last[key], key
        assert 0 <= row["eval_pass@1"] <= row["eval_pass@2"] <= 1 and 0 <= row["eval_diversity"] <= 2
        assert row["eval_pass@2_paid"] <= row["eval_pass@2"]  # paid answers are correct answers
    table = (out / "summary.md").read_text()
    assert table in printed
    header = table.splitlines()[0]
    assert ("| pass@1 (greedy) | pass@1 (greedy, derived) | pass@1 (sampled) | pass@2 (sampled) "
            "| pass@1 (sampled, derived) | pass@2 (sampled, derived) | distinct answers |") in header
    assert header.endswith("| most frequent answer's share |")  # a policy printing one number shows here
    assert table.splitlines()[3].startswith("| grpo | 2 | ")
    assert (out / "compare.png").stat().st_size > 5000

    # Rerunning with a larger budget continues every run from its checkpoint; the base model is not redone.
    before = {algo: metrics(out / algo) for algo in ("grpo", "topr")}
    assert main([*argv, "--steps", "3"]) == 0
    for algo, records in before.items():
        after = metrics(out / algo)
        assert [r["step"] for r in after] == [1, 2, 3] and after[:2] == records
    assert json.loads((out / "base_eval.json").read_text()) == base
    assert [r["step"] for r in json.loads((out / "summary.json").read_text())] == [0, 3, 3]


def test_summary_of_records_without_runs_or_evaluations():
    runs = {"grpo": [{"step": 1, "reward_mean": 0.5, "completion_len_mean": 9.0}], "topr": []}
    rows = summarize(runs, None)
    assert rows == [{"algo": "grpo", "step": 1, "reward_mean": 0.5, "completion_len_mean": 9.0},
                    {"algo": "topr", "step": 0}]
    assert summary_markdown(rows).startswith("| algorithm | step |")


@pytest.mark.parametrize("algos, message", [((), "empty"), (("grpo", "grpo"), "twice")])
def test_bad_algos(algos, message):
    with pytest.raises(ValueError, match=message):
        CompareArgs(algos=algos).validate()


def test_figure_draws_each_step_faint_and_its_running_mean(tmp_path, monkeypatch):
    """Per algorithm and panel: the raw values, then their 5-step running mean; the paid share when logged,
    the train accuracy for runs without it."""
    import matplotlib.axes

    from rlfuse.engine.compare import plot_runs
    from rlfuse.engine.metrics import running_mean

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, x, y, *args, **kwargs):
        drawn.append((self.get_title(), kwargs.get("label"), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    paid = [0.0, 0.1, 0.0, 0.3, 0.2, 0.5, 0.4]
    runs = {"grpo": [{"step": i + 1, "reward_mean": v + 0.01, "accuracy": 0.9, "derived_rate": v,
                      "completion_len_mean": 40.0 - i} for i, v in enumerate(paid)],
            "topr": [{"step": i + 1, "reward_mean": -1.0, "accuracy": v, "completion_len_mean": 50.0}
                     for i, v in enumerate(paid[:4])]}
    plot_runs(runs, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 5000
    assert len(drawn) == 3 * 2 * 2  # 3 panels x 2 algorithms x (raw, mean); titles are set after drawing
    second_panel = drawn[4:8]
    assert second_panel[0] == ("", None, paid) and second_panel[1] == ("", "grpo", running_mean(paid, 5))
    assert second_panel[2][2] == paid[:4] and second_panel[3][1] == "topr"  # no derived_rate: accuracy

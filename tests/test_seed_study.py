"""The seed study's statistics (``bench.studies.seed_study``) against hand computations on a few numbers, the
t table against a numerical integration of Student's t density, and the summary of the kept study files."""

import json
import math
import statistics
from pathlib import Path

import pytest

from bench.studies import seed_study

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "cpu-seed-study-equation"


def student_t_cdf(x, df, steps=20000):
    """P(T <= x) for x > 0: 1/2 plus Simpson's rule over [0, x] of the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", sorted(seed_study.T95))
def test_t_table_is_the_two_sided_95_percent_quantile(df):
    assert student_t_cdf(seed_study.T95[df], df) == pytest.approx(0.975, abs=2e-4)


def test_seed_level_on_three_gains():
    out = seed_study.seed_level([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, half-width t(0.975, 2) * 1 / sqrt(3)
    assert out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["t"] == pytest.approx(2.0 * math.sqrt(3))
    half = 4.303 / math.sqrt(3)
    assert out["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    # Of the 8 sign assignments only (+, +, +) reaches a mean of 2.
    assert out["sign_flip_p_one_sided"] == pytest.approx(1 / 8)


def test_sign_flip_counts_ties_and_larger_means():
    # Gains 3, -1, 1 (mean 1): the sums of +-3 +-1 +-1 that reach 3 are 3+1+1, 3-1+1 and 3+1-1.
    assert seed_study.seed_level([3.0, -1.0, 1.0])["sign_flip_p_one_sided"] == pytest.approx(3 / 8)


def test_seed_level_without_spread_has_no_t():
    out = seed_study.seed_level([0.5, 0.5])
    assert out["sd"] == 0 and out["t"] is None and out["ci95"] == [0.5, 0.5]


def test_problem_paired_on_three_problems():
    base = [1, 0, 0]
    seeds = [[1, 1, 0], [0, 1, 0]]
    differences = [0.5 - 1, 1 - 0, 0 - 0]
    out = seed_study.problem_paired(base, seeds)
    se = statistics.stdev(differences) / math.sqrt(3)
    assert out["mean"] == pytest.approx(statistics.mean(differences))
    assert out["se"] == pytest.approx(se)
    assert out["ci95"] == pytest.approx([out["mean"] - 1.96 * se, out["mean"] + 1.96 * se])
    assert (out["gained"], out["lost"]) == (1, 1)


def test_per_epoch_groups_steps_by_their_first_prompt():
    # 8 training problems, 4 prompts a step: steps 1-2 are epoch 0, 3-4 epoch 1, 5 epoch 2.
    records = [{"step": 1, "derived_rate": 0.25}, {"step": 2, "derived_rate": 0.75},
               {"step": 3, "derived_rate": None}, {"step": 4, "derived_rate": 0.5}, {"step": 5}]
    assert seed_study.per_epoch(records, 8) == pytest.approx([0.5, 0.25, 0.0])


def evaluation(paid, paid_as_run, correct, golds=("2", "3", "5", "2")):
    problems = [{"gold": g, "greedy_paid": bool(p), "greedy_paid_as_run": bool(r), "greedy_correct": bool(c)}
                for g, p, r, c in zip(golds, paid, paid_as_run, correct)]
    greedy = {"top_answer_share": 0.5, "format_rate": 1.0, "truncated_rate": 0.0, "completion_len_mean": 20.0}
    return {"problems": problems, "greedy": greedy, "top_answer": "2"}


def test_build_summary_counts_and_gains():
    base = evaluation([0, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1])
    evals = {0: evaluation([1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1]),
             1: evaluation([1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1])}
    summary = seed_study.build_summary(base, evals, {0: [0.1], 1: [0.2]}, size=18)
    assert summary["majority_baseline"] == pytest.approx(2 / 4)
    assert [summary["seeds"][s]["paid"] for s in (0, 1)] == [2, 3] and summary["base"]["paid"] == 1
    assert summary["gain_paid"]["seed_level"]["gains"] == pytest.approx([1 / 4, 2 / 4])
    assert summary["gain_answer_only"]["seed_level"]["gains"] == pytest.approx([1 / 4, 2 / 4])
    assert summary["gain_paid_as_run"]["problem_paired"]["gained"] == 2
    table = seed_study.markdown(summary, [0, 1])
    assert "| seed 1 | 3 | 3 | 4 |" in table and "majority-answer baseline: 0.500" in table


def test_build_summary_refuses_evaluations_of_other_problems():
    base = evaluation([0] * 4, [0] * 4, [0] * 4)
    other = evaluation([0] * 4, [0] * 4, [0] * 4, golds=("2", "3", "5", "7"))
    with pytest.raises(ValueError, match="same problems"):
        seed_study.build_summary(base, {0: other}, {0: [0.0]}, size=18)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "svamp").is_dir(),
                    reason="needs the SVAMP test split in ../shared/data/svamp")
def test_summary_of_the_kept_study_files_is_the_kept_summary(tmp_path, monkeypatch, capsys):
    """The results folder keeps the evaluations and metrics its summary was made from."""
    monkeypatch.chdir(RESULTS.parents[2])
    seed_study.main([str(RESULTS), str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((RESULTS / "summary.json").read_text())
    assert capsys.readouterr().out == (RESULTS / "summary.md").read_text()
    assert (tmp_path / "seeds.png").stat().st_size > 0

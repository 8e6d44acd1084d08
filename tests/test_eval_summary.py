"""The initial-beside-final table of ``rlfuse train --eval-on-start``, from synthetic evaluation files."""

import json

import pytest

from rlfuse.engine.eval_summary import before_after_table, paired_counts


def result(step, paid, correct, golds=("1", "2", "3", "4")):
    problems = [{"gold": g, "greedy_paid": p, "greedy_correct": c} for g, p, c in zip(golds, paid, correct)]
    return {"step": step, "num_problems": len(golds), "pass@1": sum(correct) / len(golds),
            "majority_baseline": 0.25, "top_answer": "2", "problems": problems,
            "greedy": {"top_answer_share": 0.5, "format_rate": 1.0, "completion_len_mean": 12.0}}


def write(folder, evaluation):
    folder.mkdir(exist_ok=True)
    (folder / f"step_{evaluation['step']:06d}.json").write_text(json.dumps(evaluation))


def test_table_counts_each_model_and_the_paired_change(tmp_path):
    write(tmp_path, result(0, [1, 0, 0, 0], [1, 1, 0, 0]))
    write(tmp_path, result(10, [0, 0, 0, 1], [0, 0, 0, 1]))
    write(tmp_path, result(30, [0, 1, 1, 0], [0, 1, 1, 1]))
    table = before_after_table(tmp_path)
    assert "| metric | step 0 (initial) | step 30 (final) |" in table
    assert "| pass@1 greedy, paid (right and derived) | 0.250 (1/4) | 0.500 (2/4) |" in table
    assert "| pass@1 greedy, answer only | 0.500 (2/4) | 0.750 (3/4) |" in table
    assert "| one constant answer (the most common gold) | 0.250 | 0.250 |" in table
    assert "final model only: 2 problems; by the initial model only: 1" in table


def test_no_table_without_a_step_zero_or_a_later_step(tmp_path):
    assert before_after_table(tmp_path / "missing") is None
    write(tmp_path, result(0, [1, 0, 0, 0], [1, 0, 0, 0]))
    assert before_after_table(tmp_path) is None
    (tmp_path / "step_000000.json").unlink()
    write(tmp_path, result(5, [1, 0, 0, 0], [1, 0, 0, 0]))
    write(tmp_path, result(9, [1, 0, 0, 0], [1, 0, 0, 0]))
    assert before_after_table(tmp_path) is None


def test_reward_function_evaluations_are_skipped(tmp_path):
    write(tmp_path, result(0, [1, 0, 0, 0], [1, 0, 0, 0]))
    (tmp_path / "step_000004.json").write_text(json.dumps({"step": 4, "eval_reward_mean": 0.3}))
    assert before_after_table(tmp_path) is None


def test_paired_counts_refuse_different_problems():
    first, last = result(0, [1, 0, 0, 0], [1, 0, 0, 0]), result(1, [1, 0, 0, 0], [1, 0, 0, 0], golds="1235")
    with pytest.raises(ValueError, match="not of the same problems"):
        paired_counts(first, last)
    with pytest.raises(ValueError, match="not of the same problems"):
        paired_counts(first, result(1, [1, 0, 0], [1, 0, 0], golds="123"))

"""The initial model beside the final one: the table ``rlfuse train --eval-on-start`` prints at the end of a run.

Both evaluations are :func:`rlfuse.engine.evaluate.evaluate_examples` results of the same test problems, read
from ``<output_dir>/eval/step_<step>.json``. Greedy pass@1 is given under the paid rule (right answer, derived,
by the gold equation where the data gives one) and the answer-only rule, beside the majority-answer baseline
(one constant answer, the most common gold), with the problems each model alone solved: a paired comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

STEP_GLOB = "step_*.json"


def _evaluations(folder: Path) -> List[Tuple[int, Dict[str, object]]]:
    """The (step, result) of every math evaluation in ``folder``, by step."""
    found = []
    for path in sorted(folder.glob(STEP_GLOB)):
        result = json.loads(path.read_text())
        if "pass@1" in result and "problems" in result:
            found.append((int(result["step"]), result))
    return found  # the file names are zero-padded steps, so glob order is step order


def paired_counts(first: Dict[str, object], last: Dict[str, object], key: str = "greedy_paid") -> Tuple[int, int]:
    """(problems only ``last`` solved, problems only ``first`` solved) under the per-problem flag ``key``.

    Raises:
        ValueError: the two results are not of the same problems (different counts or gold answers).
    """
    a, b = first["problems"], last["problems"]
    if len(a) != len(b) or any(x["gold"] != y["gold"] for x, y in zip(a, b)):
        raise ValueError("the two evaluations are not of the same problems in the same order")
    gained = sum(1 for x, y in zip(a, b) if y[key] and not x[key])
    lost = sum(1 for x, y in zip(a, b) if x[key] and not y[key])
    return gained, lost


def before_after_table(folder: Path) -> Optional[str]:
    """Markdown table of the step-0 evaluation beside the last one in ``folder`` (an ``eval/`` folder).

    Returns None when ``folder`` lacks a step-0 evaluation or a later one (a run without ``--eval-on-start``,
    or one whose data is not GSM8K-format).
    """
    found = _evaluations(Path(folder)) if Path(folder).is_dir() else []
    if len(found) < 2 or found[0][0] != 0:
        return None
    (_, first), (step, last) = found[0], found[-1]
    n = int(first["num_problems"])

    def share(result, key):
        count = sum(bool(p[key]) for p in result["problems"])
        return f"{count / n:.3f} ({count}/{n})"

    gained, lost = paired_counts(first, last)
    rows = [("pass@1 greedy, paid (right and derived)", share(first, "greedy_paid"), share(last, "greedy_paid")),
            ("pass@1 greedy, answer only", share(first, "greedy_correct"), share(last, "greedy_correct")),
            ("one constant answer (the most common gold)", f"{first['majority_baseline']:.3f}",
             f"{last['majority_baseline']:.3f}"),
            ("share of the most frequent answer", f"{first['greedy']['top_answer_share']:.3f} ({first['top_answer']})",
             f"{last['greedy']['top_answer_share']:.3f} ({last['top_answer']})"),
            ("format rate", f"{first['greedy']['format_rate']:.3f}", f"{last['greedy']['format_rate']:.3f}"),
            ("mean length (tokens)", f"{first['greedy']['completion_len_mean']:.1f}",
             f"{last['greedy']['completion_len_mean']:.1f}")]
    lines = [f"Greedy evaluation on the first {n} test problems:", "",
             f"| metric | step 0 (initial) | step {step} (final) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in rows]
    lines += ["", f"Paid by the final model only: {gained} problems; by the initial model only: {lost} "
                  f"(paired: the net change is {gained - lost} of {n})."]
    return "\n".join(lines)

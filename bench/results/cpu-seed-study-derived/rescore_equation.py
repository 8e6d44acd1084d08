"""Rescore the seed study's stored greedy completions under the equation-checked rule (rlfuse.engine.rewards.score).

The study (README.md here) trained and evaluated under the earlier, heuristic derivation check. This script
reads the same completions (the base model's and each seed's step-60 evaluation of the 300 SVAMP test
problems) and counts, per model, correct answers, answers paid by the heuristic, and answers paid by the gold
equation; and, per seed, the seed-level gain with the seed as the unit (mean over seeds, t-interval).

    python bench/results/cpu-seed-study-derived/rescore_equation.py > rescored-equation.json
"""

import json
import math
import sys
from pathlib import Path

from rlfuse.engine.data import load_examples
from rlfuse.engine.derivation import derivation_shown
from rlfuse.engine.rewards import score

HERE = Path(__file__).parent
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95% t quantiles by degrees of freedom


def counts(problems, examples):
    texts = [p["greedy_completion"] for p in problems]
    truncated = [p["greedy_truncated"] for p in problems]
    result = score(texts, examples, truncated=truncated)
    correct = [c and not t for c, t in zip(result.correct, truncated)]
    heuristic = [c and derivation_shown(x, e.question, e.gold) for c, x, e in zip(correct, texts, examples)]
    equation = [d and not t for d, t in zip(result.derived, truncated)]
    return {"correct": sum(correct), "paid_heuristic": sum(heuristic), "paid_equation": sum(equation),
            "problems": len(problems)}


def main() -> None:
    examples = load_examples("svamp", "test")
    base = json.loads((HERE.parent / "cpu-make-train-derived" / "base-eval-300.json").read_text())["problems"]
    rows = {"base": counts(base, examples[:len(base)])}
    for seed in (0, 1, 2):
        problems = json.loads((HERE / f"seed{seed}" / "eval-step60.json").read_text())["problems"]
        rows[f"seed{seed}"] = counts(problems, examples[:len(problems)])
    gains = [(rows[f"seed{s}"]["paid_equation"] - rows["base"]["paid_equation"]) / 300 for s in (0, 1, 2)]
    mean = sum(gains) / len(gains)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1))
    half = T_975[len(gains) - 1] * sd / math.sqrt(len(gains))
    json.dump({"rows": rows, "seed_gains_paid_equation": gains, "mean_gain": mean,
               "t95_interval": [mean - half, mean + half], "unit": "seed (n=3, df=2)"}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

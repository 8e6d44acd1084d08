"""The seed study's pooled gain with a paired standard error: the base model and the three step-25
checkpoints answer the same 300 SVAMP test problems, so the problem is the unit of comparison.

    python bench/results/cpu-seed-study/paired.py EVAL_DIR [OUT_JSON]

EVAL_DIR holds base.json and seed<N>.json for the seeds evaluated: `rlfuse eval --num-samples 0` results
with their per-problem records (`chain3.sh`).

For the pooled gain g = mean over the S seeds of pass@1, minus the base's:
- unpaired binomial SE: sqrt(p0 (1 - p0) / n + p (1 - p) / (n S)), as if the base and the seeds had been
  scored on independent problem samples (the figure in summary.json);
- paired SE: d_i = (mean over seeds of correct_i) - base_correct_i for each problem i, SE = sd(d) / sqrt(n).
  Problem difficulty, which the models share, drops out. For one seed this is McNemar's comparison:
  SE = sqrt(b + c - (c - b)^2 / n) / n with b, c the problems only the base, only the seed solved.
"""

import json
import math
import sys
from pathlib import Path


def paired(base, seeds):
    """Gain, paired SE and discordant counts from 0/1 lists of the same problems."""
    n = len(base)
    d = [sum(s[i] for s in seeds) / len(seeds) - base[i] for i in range(n)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"gain": mean, "se_paired": se, "gain_over_se_paired": mean / se if se else None,
            "solved_by_base_only": sum(1 for i in range(n) if base[i] and not any(s[i] for s in seeds)),
            "solved_by_a_seed_not_base": sum(1 for i in range(n) if not base[i] and any(s[i] for s in seeds))}


def main() -> None:
    folder = Path(sys.argv[1])
    names = ["base"] + sorted(p.stem for p in folder.glob("seed*.json"))
    results = {name: json.loads((folder / f"{name}.json").read_text()) for name in names}
    golds = [p["gold"] for p in results["base"]["problems"]]
    correct = {}
    for name, result in results.items():
        if [p["gold"] for p in result["problems"]] != golds:
            raise ValueError(f"{name}.json was scored on other problems than base.json")
        correct[name] = [int(p["greedy_correct"]) for p in result["problems"]]
    n, seeds = len(golds), names[1:]
    p0 = sum(correct["base"]) / n
    pooled = sum(sum(correct[s]) for s in seeds) / (n * len(seeds))
    se_unpaired = math.sqrt(p0 * (1 - p0) / n + pooled * (1 - pooled) / (n * len(seeds)))
    summary = {"num_problems": n, "correct": {name: sum(c) for name, c in correct.items()},
               "pass@1": {name: sum(c) / n for name, c in correct.items()},
               "solved_by_base_and_seed": {s: sum(b and x for b, x in zip(correct["base"], correct[s])) for s in seeds},
               "per_seed": {s: paired(correct["base"], [correct[s]]) for s in seeds},
               "pooled": {**paired(correct["base"], [correct[s] for s in seeds]), "pass@1": pooled,
                          "se_unpaired": se_unpaired, "gain_over_se_unpaired": (pooled - p0) / se_unpaired}}
    text = json.dumps(summary, indent=2) + "\n"
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

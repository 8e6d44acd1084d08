"""Summarize the derivation-checked seed study: the base model's and each seed's greedy evaluation on the 300
SVAMP test problems, counted by answer (pass@1) and by derived answer, with unpaired and paired binomial
standard errors of the pooled gain, the answers' concentration, and one figure of the training curves.

    python bench/results/cpu-seed-study-derived/summarize.py BASE_EVAL RUNS_DIR 0,1,2 OUT_DIR

BASE_EVAL is an `rlfuse eval --num-samples 0` result of the base model; RUNS_DIR holds seed<N>/metrics.jsonl
and seed<N>/eval/step_<S>.json (from `rlfuse train --eval-every S --eval-prompts 300`), and optionally
passk-base.json and passk-seed<N>.json (`passk.sh`). A problem counts as
derived when `derivation_shown` finds the gold answer in its completion, the check the training reward uses;
it is recomputed here for the base and the seeds alike.
"""

import json
import math
import sys
from pathlib import Path

from rlfuse.engine.data import load_examples
from rlfuse.engine.derivation import derivation_shown
from rlfuse.engine.evaluate import answer_concentration, flat_metrics
from rlfuse.engine.metrics import RUNNING_MEAN_STEPS, running_mean


def scores(result, examples):
    """Per-problem 0/1 lists (answer correct, answer derived) and the answers, checked against ``examples``."""
    problems = result["problems"]
    if [p["gold"] for p in problems] != [e.gold for e in examples[:len(problems)]]:
        raise ValueError("an evaluation was scored on other problems than the test split's first ones")
    correct = [int(p["greedy_correct"]) for p in problems]
    derived = [int(p["greedy_correct"] and derivation_shown(p["greedy_completion"], e.question, p["gold"]))
               for p, e in zip(problems, examples)]
    return correct, derived, [p["greedy_answer"] for p in problems]


def gain(base, seeds):
    """Pooled gain of the seeds over the base, with unpaired and paired (by problem) binomial SEs."""
    n, s = len(base), len(seeds)
    p0, p = sum(base) / n, sum(map(sum, seeds)) / (n * s)
    se_unpaired = math.sqrt(p0 * (1 - p0) / n + p * (1 - p) / (n * s))
    d = [sum(x[i] for x in seeds) / s - base[i] for i in range(n)]
    mean = sum(d) / n
    se_paired = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"base": p0, "pooled": p, "gain": p - p0, "se_unpaired": se_unpaired,
            "gain_over_se_unpaired": (p - p0) / se_unpaired if se_unpaired else None,
            "se_paired": se_paired, "gain_over_se_paired": mean / se_paired if se_paired else None}


def plot(runs, path):
    """Training curves per seed: paid (derived) correct share, its 5-step running mean, and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, records), color in zip(runs.items(), ("C0", "C1", "C2", "C3")):
        steps = [r["step"] for r in records]
        derived = [r.get("derived_rate") or 0.0 for r in records]
        axes[0].plot(steps, derived, color=color, alpha=0.3)
        axes[0].plot(steps, running_mean(derived, RUNNING_MEAN_STEPS), color=color,
                     label=f"{name} ({RUNNING_MEAN_STEPS}-step mean)")
        axes[1].plot(steps, [r["completion_len_mean"] for r in records], color=color, label=name)
    axes[0].set_title("paid correct share of the 32 samples (derived)")
    axes[1].set_title("completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    base_path, runs_dir = Path(sys.argv[1]), Path(sys.argv[2])
    seeds, out = [int(s) for s in sys.argv[3].split(",")], Path(sys.argv[4])
    examples = load_examples("svamp", "test")
    base = json.loads(base_path.read_text())
    base_correct, base_derived, base_answers = scores(base, examples)
    rows, correct, derived, runs = [], [], [], {}
    for seed in seeds:
        folder = runs_dir / f"seed{seed}"
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs[f"seed {seed}"] = records
        last = max(records, key=lambda r: r["step"])["step"]
        result = json.loads((folder / "eval" / f"step_{last:06d}.json").read_text())
        c, d, answers = scores(result, examples)
        correct.append(c)
        derived.append(d)
        top, share = answer_concentration(answers)
        rows.append({"seed": seed, "step": last, "correct": sum(c), "derived": sum(d),
                     "pass@1": sum(c) / len(c), "derived_accuracy": sum(d) / len(d),
                     "top_answer": top, "top_answer_share": share,
                     "correct_with_top_answer": sum(ci for ci, a in zip(c, answers) if a == top),
                     **{k: result["greedy"][k] for k in ("format_rate", "truncated_rate", "completion_len_mean")},
                     "train_derived_first10": sum(r.get("derived_rate") or 0 for r in records[:10]) * 32,
                     "train_derived_last10": sum(r.get("derived_rate") or 0 for r in records[-10:]) * 32,
                     "peak_mem_gb": max(r["peak_mem_gb"] for r in records)})
    top, share = answer_concentration(base_answers)
    summary = {"num_problems": len(base_correct),
               "base": {"correct": sum(base_correct), "derived": sum(base_derived), "top_answer": top,
                        "top_answer_share": share, **{k: base["greedy"][k] for k in
                                                      ("format_rate", "truncated_rate", "completion_len_mean")}},
               "seeds": rows, "pass@1": gain(base_correct, correct), "derived": gain(base_derived, derived)}
    # Optional: pass@k and diversity from `rlfuse eval --num-samples n` (passk.sh) of the base and each seed.
    sampled = {}
    for name in ["base"] + [f"seed{seed}" for seed in seeds]:
        path = runs_dir / f"passk-{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            # greedy pass@1 as "accuracy", the greedy rates, pass@k and diversity; then the samples' own rates
            sampled[name] = {"num_problems": result["num_problems"], **flat_metrics(result, prefix=""),
                             "sampled": result["sampled"]}
    if sampled:
        summary["sampled_eval"] = sampled
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(runs, out / "seeds.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

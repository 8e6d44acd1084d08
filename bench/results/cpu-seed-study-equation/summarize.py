"""Summarize the five-seed study (`run.sh`): the gain in greedy pass@1 on the 300 SVAMP test problems, paid rule
and answer-only rule, with the seed as the unit (mean, t-interval, exact sign-flip test) and the problem-paired
test beside it; paid share per epoch on the training problems; one figure.

    python bench/results/cpu-seed-study-equation/summarize.py RUNS_DIR OUT_DIR [SEEDS]

RUNS_DIR is run.sh's $R: eval-base.json, eval-seed<N>.json and seed<N>/metrics.jsonl. SEEDS defaults to 0,1,2,3,4.
Writes OUT_DIR/summary.json and OUT_DIR/seeds.png and prints the tables in markdown.
"""

import itertools
import json
import math
import sys
from pathlib import Path

from rlfuse.engine.evaluate import majority_baseline

# Two-sided 95% quantiles of Student's t (the standard table), by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
PROMPTS_PER_STEP = 4  # make train's --prompts-per-step (the default)


def flags(result, key):
    return [int(bool(p[key])) for p in result["problems"]]


def rescore(result, examples):
    """Recompute each problem's ``greedy_paid`` from its stored completion under today's paid rule
    (``rlfuse.engine.rewards.score``), keeping the rule the run was evaluated with as ``greedy_paid_as_run``."""
    from rlfuse.engine.rewards import score

    problems = result["problems"]
    if [p["gold"] for p in problems] != [e.gold for e in examples[: len(problems)]]:
        raise ValueError("an evaluation was scored on other problems than the test split's first ones")
    scored = score([p["greedy_completion"] for p in problems], examples[: len(problems)],
                   truncated=[p["greedy_truncated"] for p in problems])
    for problem, paid in zip(problems, scored.derived):
        problem["greedy_paid_as_run"], problem["greedy_paid"] = problem["greedy_paid"], bool(paid)
    return result


def seed_level(gains):
    """Mean gain over seeds with its t-interval (the seed is the unit) and the exact one-sided sign-flip p:
    the share of the 2^s sign assignments whose mean is at least the observed one."""
    s = len(gains)
    mean = sum(gains) / s
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (s - 1))
    half = T95[s - 1] * sd / math.sqrt(s)
    flips = [sum(sign * g for sign, g in zip(signs, gains)) / s for signs in itertools.product((1, -1), repeat=s)]
    p = sum(1 for m in flips if m >= mean - 1e-12) / len(flips)
    return {"gains": gains, "mean": mean, "sd": sd, "t": mean / (sd / math.sqrt(s)) if sd else None,
            "ci95": [mean - half, mean + half], "sign_flip_p_one_sided": p}


def problem_paired(base, seeds):
    """Mean over problems of (mean over seeds of solved) - (base solved), its SE and 95% normal interval."""
    n = len(base)
    d = [sum(x[i] for x in seeds) / len(seeds) - base[i] for i in range(n)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return {"mean": mean, "se": se, "z": mean / se if se else None, "ci95": [mean - 1.96 * se, mean + 1.96 * se],
            "gained": sum(1 for x in d if x > 0), "lost": sum(1 for x in d if x < 0)}


def per_epoch(records, size):
    """Paid share of the training samples per epoch: steps grouped by the epoch of their first prompt."""
    epochs = {}
    for record in records:
        epoch = (record["step"] - 1) * PROMPTS_PER_STEP // size
        epochs.setdefault(epoch, []).append(record.get("derived_rate") or 0.0)
    return [sum(v) / len(v) for _, v in sorted(epochs.items())]


def describe(result):
    greedy = result["greedy"]
    return {"paid": sum(flags(result, "greedy_paid")), "paid_as_run": sum(flags(result, "greedy_paid_as_run")),
            "correct": sum(flags(result, "greedy_correct")),
            "top_answer": result["top_answer"], "top_answer_share": greedy["top_answer_share"],
            "format_rate": greedy["format_rate"], "truncated_rate": greedy["truncated_rate"],
            "completion_len_mean": greedy["completion_len_mean"]}


def plot(epochs, base_paid, seed_paid, majority, n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (seed, shares), color in zip(epochs.items(), (f"C{i}" for i in range(10))):
        axes[0].plot(range(1, len(shares) + 1), shares, marker="o", color=color, alpha=0.6, label=f"seed {seed}")
    longest = max(len(v) for v in epochs.values())
    mean = [sum(v[e] for v in epochs.values() if len(v) > e) / sum(1 for v in epochs.values() if len(v) > e)
            for e in range(longest)]
    axes[0].plot(range(1, longest + 1), mean, color="black", linewidth=2, label="mean")
    axes[0].set_xlabel("epoch over the training problems (the last may be partial)")
    axes[0].set_title("training: paid share of the samples (the rule as run)")
    axes[0].set_xticks(range(1, longest + 1))
    for (seed, paid), color in zip(seed_paid.items(), (f"C{i}" for i in range(10))):
        axes[1].plot([0, 1], [base_paid / n, paid / n], marker="o", color=color, alpha=0.6, label=f"seed {seed}")
    axes[1].plot([0, 1], [base_paid / n, sum(seed_paid.values()) / len(seed_paid) / n], color="black",
                 linewidth=2, label="mean")
    axes[1].axhline(majority, color="grey", linestyle="--", label="one constant answer (answer only)")
    axes[1].set_xticks([0, 1], ["base", "after training"])
    axes[1].set_title(f"test: greedy pass@1, paid rule with the answer line ({n} problems)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1,2,3,4").split(",")]
    from rlfuse.engine.data import load_examples

    examples = load_examples("svamp", "test")
    base = rescore(json.loads((runs / "eval-base.json").read_text()), examples)
    evals = {s: rescore(json.loads((runs / f"eval-seed{s}.json").read_text()), examples) for s in seeds}
    golds = [p["gold"] for p in base["problems"]]
    if any([p["gold"] for p in e["problems"]] != golds for e in evals.values()):
        raise ValueError("the evaluations are not of the same problems")
    n = len(golds)
    size = sum(1 for line in Path("data/svamp-train-learnable.jsonl").read_text().splitlines() if line.strip())
    epochs = {s: per_epoch([json.loads(line) for line in (runs / f"seed{s}" / "metrics.jsonl").read_text()
                            .splitlines()], size) for s in seeds}
    summary = {"problems": n, "majority_baseline": majority_baseline(golds), "training_problems": size,
               "base": describe(base), "seeds": {s: describe(e) for s, e in evals.items()},
               "paid_share_per_epoch": epochs}
    for key, name in (("greedy_paid", "paid"), ("greedy_paid_as_run", "paid_as_run"), ("greedy_correct", "answer_only")):
        base_flags = flags(base, key)
        seed_flags = [flags(evals[s], key) for s in seeds]
        summary[f"gain_{name}"] = {
            "seed_level": seed_level([(sum(f) - sum(base_flags)) / n for f in seed_flags]),
            "problem_paired": problem_paired(base_flags, seed_flags)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(epochs, summary["base"]["paid"], {s: summary["seeds"][s]["paid"] for s in seeds},
         summary["majority_baseline"], n, out / "seeds.png")
    print(f"| model | paid / {n} | paid as run / {n} | answer only / {n} | top answer (share) | format | truncated "
          "| length |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d in [("base", summary["base"])] + [(f"seed {s}", summary["seeds"][s]) for s in seeds]:
        print(f"| {name} | {d['paid']} | {d['paid_as_run']} | {d['correct']} | `{d['top_answer']}` "
              f"({d['top_answer_share']:.2f}) | "
              f"{d['format_rate']:.2f} | {d['truncated_rate']:.2f} | {d['completion_len_mean']:.1f} |")
    print(f"\nmajority-answer baseline: {summary['majority_baseline']:.3f}\n")
    for name in ("paid", "paid_as_run", "answer_only"):
        s, p = summary[f"gain_{name}"]["seed_level"], summary[f"gain_{name}"]["problem_paired"]
        print(f"{name}: seed-level gain {s['mean']:+.4f}, 95% t-interval [{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}]"
              f" (sd {s['sd']:.4f}, one-sided sign-flip p {s['sign_flip_p_one_sided']:.3f}); problem-paired "
              f"{p['mean']:+.4f} +- {p['se']:.4f} (z {p['z'] if p['z'] is None else round(p['z'], 2)}), "
              f"problems gained {p['gained']}, lost {p['lost']}")
    print("\npaid share per epoch:", {s: [round(x, 3) for x in v] for s, v in epochs.items()})


if __name__ == "__main__":
    main()

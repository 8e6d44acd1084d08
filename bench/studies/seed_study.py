"""Summarize the five-seed study of `make train`'s recipe (``seed_study.sh``): the gain in greedy pass@1 on the
300 SVAMP test problems, paid rule and answer-only rule, with the seed as the unit (mean, t-interval, exact
sign-flip test) and the problem-paired test beside it; paid share per epoch on the training problems; one figure.

    python -m bench.studies.seed_study RUNS_DIR OUT_DIR [SEEDS] [--copy-inputs] > OUT_DIR/summary.md

RUNS_DIR is ``seed_study.sh``'s $R: eval-base.json, eval-seed<N>.json and seed<N>/metrics.jsonl (or, as kept
in the results folder, seed<N>-metrics.jsonl). SEEDS defaults to 0,1,2,3,4. Writes OUT_DIR/summary.json and
OUT_DIR/seeds.png and prints the tables in markdown. ``--copy-inputs`` also copies the evaluations and the
metrics it read into OUT_DIR (as eval-<name>.json and seed<N>-metrics.jsonl), so the summary can be re-made
from OUT_DIR alone. Run from the repository root (the SVAMP test split is read from ``../shared/data/svamp``).
"""

import argparse
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from rlfuse.engine.evaluate import majority_baseline

ROOT = Path(__file__).resolve().parents[2]
TRAIN_DATA = ROOT / "data" / "svamp-train-learnable.jsonl"
# Two-sided 95% quantiles of Student's t (the standard table), by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
PROMPTS_PER_STEP = 4  # make train's --prompts-per-step (the default)


def flags(result, key):
    """0/1 per problem of ``result["problems"][i][key]``."""
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
    """One model's counts over the problems (paid, paid as run, answer only) and its greedy metrics."""
    greedy = result["greedy"]
    return {"paid": sum(flags(result, "greedy_paid")), "paid_as_run": sum(flags(result, "greedy_paid_as_run")),
            "correct": sum(flags(result, "greedy_correct")),
            "top_answer": result["top_answer"], "top_answer_share": greedy["top_answer_share"],
            "format_rate": greedy["format_rate"], "truncated_rate": greedy["truncated_rate"],
            "completion_len_mean": greedy["completion_len_mean"]}


def build_summary(base, evals: Dict[int, dict], epochs: Dict[int, List[float]], size: int) -> dict:
    """summary.json's content from the rescored evaluations of the base and of each seed (keyed by seed)."""
    golds = [p["gold"] for p in base["problems"]]
    if any([p["gold"] for p in e["problems"]] != golds for e in evals.values()):
        raise ValueError("the evaluations are not of the same problems")
    n = len(golds)
    seeds = list(evals)
    summary = {"problems": n, "majority_baseline": majority_baseline(golds), "training_problems": size,
               "base": describe(base), "seeds": {s: describe(e) for s, e in evals.items()},
               "paid_share_per_epoch": epochs}
    rules = (("greedy_paid", "paid"), ("greedy_paid_as_run", "paid_as_run"), ("greedy_correct", "answer_only"))
    for key, name in rules:
        base_flags = flags(base, key)
        seed_flags = [flags(evals[s], key) for s in seeds]
        summary[f"gain_{name}"] = {
            "seed_level": seed_level([(sum(f) - sum(base_flags)) / n for f in seed_flags]),
            "problem_paired": problem_paired(base_flags, seed_flags)}
    return summary


def markdown(summary: dict, seeds: Sequence[int]) -> str:
    """The tables that summary.md holds (what the summary prints)."""
    n = summary["problems"]
    lines = [f"| model | paid / {n} | paid as run / {n} | answer only / {n} | top answer (share) | format "
             "| truncated | length |", "|---|---|---|---|---|---|---|---|"]
    for name, d in [("base", summary["base"])] + [(f"seed {s}", summary["seeds"][s]) for s in seeds]:
        lines.append(f"| {name} | {d['paid']} | {d['paid_as_run']} | {d['correct']} | `{d['top_answer']}` "
                     f"({d['top_answer_share']:.2f}) | "
                     f"{d['format_rate']:.2f} | {d['truncated_rate']:.2f} | {d['completion_len_mean']:.1f} |")
    lines.append(f"\nmajority-answer baseline: {summary['majority_baseline']:.3f}\n")
    for name in ("paid", "paid_as_run", "answer_only"):
        s, p = summary[f"gain_{name}"]["seed_level"], summary[f"gain_{name}"]["problem_paired"]
        lines.append(f"{name}: seed-level gain {s['mean']:+.4f}, 95% t-interval [{s['ci95'][0]:+.4f}, "
                     f"{s['ci95'][1]:+.4f}] (sd {s['sd']:.4f}, one-sided sign-flip p "
                     f"{s['sign_flip_p_one_sided']:.3f}); problem-paired {p['mean']:+.4f} +- {p['se']:.4f} "
                     f"(z {p['z'] if p['z'] is None else round(p['z'], 2)}), problems gained {p['gained']}, "
                     f"lost {p['lost']}")
    epochs = summary["paid_share_per_epoch"]
    lines.append("\npaid share per epoch: " + str({s: [round(x, 3) for x in v] for s, v in epochs.items()}))
    return "\n".join(lines)


def plot(epochs, base_paid, seed_paid, majority, n, path):
    """seeds.png: paid share per epoch of each seed's training samples, and test pass@1 before and after."""
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


def metrics_path(runs: Path, seed: int) -> Path:
    """A seed's metrics: seed<N>/metrics.jsonl in a run folder, seed<N>-metrics.jsonl in a results folder."""
    in_run = runs / f"seed{seed}" / "metrics.jsonl"
    return in_run if in_run.exists() else runs / f"seed{seed}-metrics.jsonl"


def copy_inputs(runs: Path, out: Path, seeds: Sequence[int]) -> None:
    """Copy the evaluations and metrics the summary read into ``out``, named as the results folder keeps them."""
    for name in ["base"] + [f"seed{s}" for s in seeds]:
        source = runs / f"eval-{name}.json"
        if source.resolve() != (out / source.name).resolve():
            shutil.copyfile(source, out / source.name)
    for s in seeds:
        source, target = metrics_path(runs, s), out / f"seed{s}-metrics.jsonl"
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the study's run folder (seed_study.sh's $R)")
    parser.add_argument("out", type=Path, help="where summary.json and seeds.png go")
    parser.add_argument("seeds", nargs="?", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    parser.add_argument("--copy-inputs", action="store_true",
                        help="also copy eval-*.json and each seed's metrics into OUT")
    args = parser.parse_args(argv)
    runs, out = args.runs, args.out
    seeds = [int(s) for s in args.seeds.split(",")]
    from rlfuse.engine.data import load_examples

    examples = load_examples("svamp", "test")
    base = rescore(json.loads((runs / "eval-base.json").read_text()), examples)
    evals = {s: rescore(json.loads((runs / f"eval-seed{s}.json").read_text()), examples) for s in seeds}
    size = sum(1 for line in TRAIN_DATA.read_text().splitlines() if line.strip())
    epochs = {s: per_epoch([json.loads(line) for line in metrics_path(runs, s).read_text().splitlines()], size)
              for s in seeds}
    summary = build_summary(base, evals, epochs, size)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(epochs, summary["base"]["paid"], {s: summary["seeds"][s]["paid"] for s in seeds},
         summary["majority_baseline"], summary["problems"], out / "seeds.png")
    if args.copy_inputs:
        copy_inputs(runs, out, seeds)
    print(markdown(summary, seeds))


if __name__ == "__main__":
    main()

"""Summarize the seed study: base and per-seed greedy pass@1 on the 300 SVAMP test problems, the pooled gain
with its binomial standard errors, and one figure of the training curves (one line per seed).

    python bench/results/cpu-seed-study/summarize.py RUNS_DIR 0,1,2 [OUT_DIR]

RUNS_DIR holds base/eval.json (from `rlfuse eval`) and seed<N>/metrics.jsonl (from `rlfuse train`), and
optionally passk-base.json and passk-seed<N>.json (`rlfuse eval --num-samples n`), whose pass@k and diversity
are added to the summary."""

import json
import math
import sys
from pathlib import Path

from rlfuse.engine.compare import plot_runs, read_records


def main() -> None:
    runs_dir, seeds = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else runs_dir
    base = json.loads((runs_dir / "base" / "eval.json").read_text())
    n = base["num_problems"]
    p0 = base["pass@1"]
    rows, runs = [], {}
    for seed in seeds:
        records = read_records(runs_dir / f"seed{seed}")
        runs[f"seed {seed}"] = records
        last = [r for r in records if r.get("eval_accuracy") is not None][-1]
        p1 = last["eval_accuracy"]
        se = math.sqrt(p0 * (1 - p0) / n + p1 * (1 - p1) / n)
        rows.append({"seed": seed, "step": last["step"], "pass@1": p1, "correct": round(p1 * n),
                     "format_rate": last.get("eval_format_rate"), "truncated_rate": last.get("eval_truncated_rate"),
                     "completion_len_mean": last.get("eval_completion_len_mean"),
                     "gain": p1 - p0, "gain_over_se": (p1 - p0) / se if se else None,
                     "train_steps_with_reward": sum(1 for r in records if r["reward_mean"] > 0),
                     "median_step_s": sorted(r["time_rollout"] + r["time_logprobs"] + r["time_update"]
                                             for r in records)[len(records) // 2],
                     "peak_mem_gb": max(r["peak_mem_gb"] for r in records)})
    pooled = sum(r["correct"] for r in rows) / (n * len(rows))
    # Two binomial standard errors: of the difference (the base measured once on n problems, the seeds on
    # n * seeds), and of the pooled-after proportion alone (the base taken as a fixed number).
    se_diff = math.sqrt(p0 * (1 - p0) / n + pooled * (1 - pooled) / (n * len(rows)))
    se_after = math.sqrt(pooled * (1 - pooled) / (n * len(rows)))
    summary = {"num_problems": n, "base": {"pass@1": p0, "correct": round(p0 * n),
                                           **{k: base["greedy"][k] for k in base["greedy"] if k != "accuracy"}},
               "seeds": rows, "pooled_pass@1": pooled, "pooled_gain": pooled - p0,
               "se_difference": se_diff, "gain_over_se_difference": (pooled - p0) / se_diff,
               "se_pooled_after": se_after, "gain_over_se_pooled_after": (pooled - p0) / se_after}
    # Optional: pass@k and diversity from `rlfuse eval --num-samples n` of the base and each seed's checkpoint.
    passk = {}
    for name in ["base"] + [f"seed{seed}" for seed in seeds]:
        path = runs_dir / f"passk-{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            passk[name] = {"num_problems": result["num_problems"], "greedy_pass@1": result["pass@1"],
                           "pass@k": result["pass@k"], "diversity": result["diversity"],
                           "sampled": result["sampled"]}
    if passk:
        summary["sampled_eval"] = passk
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_runs(runs, out / "seeds.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

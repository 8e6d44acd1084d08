"""Paid correct samples per block of ten steps, the greedy evaluation, and seeds.png, for the three 30-step
runs of `make train`'s command in this folder. Run from the repository root:
`.venv/bin/python bench/results/cpu-make-train-bf16/summarize.py`."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlfuse.engine.metrics import RUNNING_MEAN_STEPS, running_mean  # noqa: E402

HERE = Path(__file__).parent
SAMPLES = 32  # 4 prompts x G = 8 per step

summary, fig = {}, plt.figure(figsize=(7, 4))
for index, folder in enumerate(sorted(HERE.glob("seed*"))):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    paid = [round(r["derived_rate"] * SAMPLES) for r in records]
    last = records[-1]
    summary[folder.name] = {
        "paid_per_step": paid,
        "paid_per_ten_steps": [sum(paid[i:i + 10]) for i in range(0, len(paid), 10)],
        "completion_len_first_last": [records[0]["completion_len_mean"], last["completion_len_mean"]],
        "eval_accuracy": last["eval_accuracy"], "eval_derived_accuracy": last["eval_derived_accuracy"],
        "eval_completion_len_mean": last["eval_completion_len_mean"],
    }
    steps = [r["step"] for r in records]
    share = [p / SAMPLES for p in paid]
    plt.plot(steps, share, color=f"C{index}", alpha=0.25, linewidth=0.8)
    plt.plot(steps, running_mean(share, RUNNING_MEAN_STEPS), color=f"C{index}", label=folder.name)
plt.xlabel("step")
plt.ylabel("paid (derived) share of the 32 samples")
plt.title(f"make train for 30 steps: each step faint, {RUNNING_MEAN_STEPS}-step mean solid", fontsize=10)
plt.grid(alpha=0.3)
plt.legend()
plt.tight_layout()
plt.savefig(HERE / "seeds.png", dpi=100)
(HERE / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
for name, row in summary.items():
    print(name, row["paid_per_ten_steps"], row["eval_accuracy"], row["eval_derived_accuracy"])

"""Run outputs: ``metrics.jsonl`` (one JSON object per step) and the ``reward.png`` curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "reward.png"
RUNNING_MEAN_STEPS = 5
"""Window of the plot's running mean of the paid correctness: a step's 4 prompts differ in difficulty, so one
step's share is noisy."""


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Trailing running mean: element i is the mean of ``values[max(0, i - window + 1) : i + 1]``.

    Raises:
        ValueError: ``window`` below 1.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends step records to ``output_dir/metrics.jsonl`` and redraws ``output_dir/reward.png``."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / METRICS_FILE
        self.plot_path = Path(output_dir) / PLOT_FILE
        self.records: List[Dict[str, Any]] = []
        if self.path.is_file():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, last_step: int) -> None:
        """Drop records after ``last_step`` (steps a killed run logged after its last checkpoint)."""
        self.records = [r for r in self.records if r["step"] <= last_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: Dict[str, Any]) -> None:
        """Write one step's record (non-finite floats become null) and refresh the plot."""
        record = {key: _clean(value) for key, value in record.items()}
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.plot()

    def plot(self) -> None:
        """Draw reward, accuracy (with the derived share and, past 5 steps, its running mean when logged), format
        rate and eval accuracy against step with matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("reward_mean", "reward"), ("accuracy", "accuracy"),
                           ("derived_rate", "accuracy, answer derived (paid)"), ("format_rate", "format rate"),
                           ("eval_accuracy", "eval accuracy (greedy)")):
            points = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                line, = ax.plot(steps, values, marker="o" if key == "eval_accuracy" else None, label=label)
                if key == "derived_rate" and len(values) > RUNNING_MEAN_STEPS:
                    ax.plot(steps, running_mean(values, RUNNING_MEAN_STEPS), color=line.get_color(), linestyle="--",
                            label=f"{label}, {RUNNING_MEAN_STEPS}-step mean")
        ax.set_xlabel("step")
        ax.set_title("reward and accuracy")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        tmp = self.plot_path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.plot_path)

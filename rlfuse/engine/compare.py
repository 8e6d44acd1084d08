"""``rlfuse compare``: train several algorithms with the same seed, data and budget, one after another, and
draw them side by side.

Each algorithm runs in ``<output_dir>/<algo>`` through the trainer, resumed from its checkpoint when one is
there, so an interrupted comparison continues where it stopped. The base model is evaluated once with the
same settings (``base_eval.json``). Outputs: ``compare.png`` (reward, the paid share and completion length
against step, one colour per algorithm, with running means), ``summary.json`` and ``summary.md`` (final
greedy pass@1, pass@k and diversity on the evaluation questions per algorithm, and the base model's).
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tyro

from rlfuse.engine.args import Algo, TrainArgs

ALL_ALGOS: Tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "gspo", "topr", "rover")
FIGURE = "compare.png"
SUMMARY_JSON, SUMMARY_MD, BASE_EVAL = "summary.json", "summary.md", "base_eval.json"
# (keys, the first a run logs is drawn; title). derived_rate is the paid share under --require-derivation.
PANELS = ((("reward_mean",), "reward"),
          (("derived_rate", "accuracy"), "paid (derived) share of the train samples"),
          (("completion_len_mean",), "completion length (tokens)"))


@dataclass
class CompareArgs(TrainArgs):
    """Train several --algos with the same seed, data and budget; write compare.png and a summary table. Every
    training option applies to each algorithm."""

    algo: tyro.conf.Suppress[Algo] = "grpo"  # replaced by --algos
    resume: tyro.conf.Suppress[bool] = False  # each run resumes by itself
    algos: Tuple[Algo, ...] = ALL_ALGOS
    """Algorithms to run, in this order."""
    output_dir: Optional[str] = "runs/compare"
    """Folder of the comparison: one sub-folder per algorithm, the figure and the summary."""
    baseline: bool = True
    """Also evaluate the base model (--model) with the same evaluation settings."""

    def run_args(self, algo: str) -> TrainArgs:
        """The :class:`TrainArgs` of ``algo``'s run: these options, its folder, and an evaluation at the end."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainArgs)}
        fields.update(algo=algo, output_dir=str(Path(self.output_dir) / algo), resume=False,
                      eval_every=self.eval_every or self.steps)
        return TrainArgs(**fields)

    def validate(self) -> None:
        """Raise ``ValueError`` for options no run could use (each run then checks its own)."""
        if not self.algos:
            raise ValueError("--algos is empty; name at least one algorithm")
        if len(set(self.algos)) != len(self.algos):
            raise ValueError(f"--algos {' '.join(self.algos)} names an algorithm twice")
        for algo in self.algos:
            self.run_args(algo).validate()


def read_records(run_dir: Path) -> List[Dict[str, object]]:
    """The step records of a run's ``metrics.jsonl`` (empty when there is none)."""
    from rlfuse.engine.metrics import METRICS_FILE

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_algo(args: TrainArgs) -> None:
    """Train one algorithm's run to ``args.steps``, continuing from its checkpoint if it has one.

    A folder with metrics but no checkpoint (a run killed before its first save) starts over.
    """
    from rlfuse.engine.checkpoint import find_checkpoint
    from rlfuse.engine.metrics import METRICS_FILE
    from rlfuse.engine.trainer import Trainer

    run_dir = Path(args.output_dir)
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()
    if checkpoint is not None:
        if json.loads((checkpoint / "trainer_state.json").read_text())["step"] >= args.steps:
            return  # finished (and evaluated at its last step): nothing to do
        args = dataclasses.replace(args, resume=True)
    trainer = Trainer(args)
    try:
        trainer.train()
    finally:
        del trainer
        gc.collect()


def evaluate_base(args: CompareArgs) -> Dict[str, object]:
    """The flat eval metrics of the base model (``base_eval.json``, computed once and then read back)."""
    path = Path(args.output_dir) / BASE_EVAL
    if path.is_file():
        return json.loads(path.read_text())
    from rlfuse.engine.data import load_examples
    from rlfuse.engine.evaluate import flat_metrics, load_and_evaluate

    examples = load_examples(args.eval_data or args.data, "test")[: args.eval_prompts]
    result = load_and_evaluate(args.model, None, args.dtype, args.mixed_precision, args.torch_device(), examples,
                               args.stop_after_answer, num_samples=args.eval_samples,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               batch_size=max(1, 32 // max(1, args.eval_samples)), seed=args.seed,
                               prompt_style=args.prompt_style)
    metrics = flat_metrics(result)
    gc.collect()  # the model loaded for it is gone with load_and_evaluate's frame
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summarize(runs: Dict[str, List[Dict[str, object]]], base: Optional[Dict[str, object]] = None) -> List[Dict]:
    """One summary row per run (and ``base`` first, as step 0): the last evaluation's metrics, the last step,
    and the final step's train reward and completion length."""
    rows = []
    if base is not None:
        rows.append({"algo": "base model", "step": 0, **base})
    for algo, records in runs.items():
        row: Dict[str, object] = {"algo": algo, "step": records[-1]["step"] if records else 0}
        evaluated = [r for r in records if "eval_accuracy" in r]
        if evaluated:
            row.update({k: v for k, v in evaluated[-1].items() if k.startswith("eval_")})
        if records:
            row.update(reward_mean=records[-1]["reward_mean"], completion_len_mean=records[-1]["completion_len_mean"])
        rows.append(row)
    return rows


def summary_markdown(rows: List[Dict[str, object]]) -> str:
    """The summary rows as a markdown table: pass@1 (greedy, then derived), each pass@k, diversity, format and
    truncation, and the share of problems given the most frequent greedy answer (near 1: one number for every
    question)."""
    keys = [k for k in ("eval_accuracy",) if any(k in r for r in rows)]
    passk = sorted({k for r in rows for k in r if k.startswith("eval_pass@")},  # answer-only, then paid, by k
                   key=lambda k: (k.endswith("_paid"), int(k.split("@")[1].removesuffix("_paid"))))
    keys += [k for k in ("eval_derived_accuracy",) if any(k in r for r in rows)]
    keys += passk + [k for k in ("eval_diversity", "eval_format_rate", "eval_truncated_rate",
                                 "eval_completion_len_mean", "eval_top_answer_share") if any(k in r for r in rows)]
    names = {"eval_accuracy": "pass@1 (greedy)", "eval_derived_accuracy": "pass@1 (greedy, derived)",
             "eval_diversity": "distinct answers",
             "eval_format_rate": "format rate", "eval_truncated_rate": "truncated rate",
             "eval_completion_len_mean": "length (tokens)", "eval_top_answer_share": "most frequent answer's share"}
    names.update({k: f"{k[len('eval_'):].removesuffix('_paid')} (sampled, derived)" for k in passk
                  if k.endswith("_paid")})
    header = ["algorithm", "step"] + [names.get(k, k[len("eval_"):] + " (sampled)") for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["algo"]), str(row["step"])]
        cells += ["" if row.get(k) is None else f"{row[k]:.3f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: Dict[str, List[Dict[str, object]]], path: Path) -> None:
    """Draw reward, the paid share (``derived_rate``, else ``accuracy``) and completion length against step,
    one colour per algorithm: each step faint, its :data:`rlfuse.engine.metrics.RUNNING_MEAN_STEPS`-step
    running mean solid (one step's 32 samples are too few to rank algorithms by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlfuse.engine.metrics import RUNNING_MEAN_STEPS, running_mean

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (keys, title) in zip(axes, PANELS):
        for index, (algo, records) in enumerate(runs.items()):
            key = next((k for k in keys if any(r.get(k) is not None for r in records)), None)
            points = [(r["step"], r[key]) for r in records if key is not None and r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                colour = f"C{index % 10}"
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, running_mean(values, RUNNING_MEAN_STEPS), color=colour, label=algo)
        ax.set_xlabel("step")
        ax.set_title(f"{title}, {RUNNING_MEAN_STEPS}-step mean", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_compare(args: CompareArgs) -> Path:
    """Run every algorithm (resuming finished or partial runs), then write the figure and the summary.

    Returns the comparison folder.

    Raises:
        ValueError: bad options (checked for every algorithm before any run starts).
    """
    args.validate()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = evaluate_base(args) if args.baseline else None
    runs = {}
    for algo in args.algos:
        run_args = args.run_args(algo)
        run_algo(run_args)
        runs[algo] = read_records(Path(run_args.output_dir))
    plot_runs(runs, output_dir / FIGURE)
    rows = summarize(runs, base)
    (output_dir / SUMMARY_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    (output_dir / SUMMARY_MD).write_text(summary_markdown(rows))
    return output_dir

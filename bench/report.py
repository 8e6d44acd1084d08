"""Gather ``bench/results/*.json`` into ``bench/REPORT.md`` and ``bench/plots/*.png``.

Reads both kinds of result file: those of ``python -m bench.X`` (:func:`bench.common.write_results`:
``{benchmark, device, smoke, rows, ...}``) and pytest-benchmark's JSON of ``pytest bench/``
(``{machine_info, benchmarks: [{stats, extra_info}, ...]}``, the roofline in ``extra_info``). One section
per device and size: CPU smoke runs and GPU runs never share a table or a plot. Per benchmark and pass, a
table of the median time, the achieved GB/s (TFLOP/s for ``linear``) and its percentage of the ceiling
measured in the same run, peak memory, and each rlfuse implementation's speed-up against each peer; and
a plot of the achieved GB/s (TFLOP/s) against the vocabulary size, one line per implementation, the
ceiling drawn as a horizontal line. ``python -m bench.report [--results-dir ... --out ... --plots-dir ...]``.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tyro

SHAPE_KEYS = ("model", "algo", "n_tokens", "m_tokens", "hidden", "prompts", "num_generations", "max_new_tokens",
              "vocab")
"""Result fields that make a shape, in display order (vocabulary last: the plots' x axis)."""
SHAPE_LABELS = {"n_tokens": "N", "m_tokens": "M", "hidden": "H", "prompts": "P", "num_generations": "G",
                "max_new_tokens": "T", "vocab": "V"}
BENCHMARK_ORDER = ("logprobs", "policy_loss", "linear", "rollout", "e2e")
PLOTTED = ("logprobs", "policy_loss", "linear")
"""Benchmarks plotted against the vocabulary size (the rollout has one model, hence one V: a table only)."""
PASS_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward", "generate": "generate", "step": "whole GRPO step"}


@dataclass(frozen=True)
class Record:
    """One implementation, pass and shape, from either kind of result file.

    Attributes:
        seconds: median time of one call.
        achieved: GB/s (TFLOP/s for ``linear``) of the fewest bytes (FLOPs), None if not recorded.
        ceiling: the device ceiling in the same unit, measured in the same run (copy bandwidth, or a
            bare GEMM of the same shape for ``linear``), None if not recorded.
        tokens_per_s: generated tokens per second (rollout only).
        peak_mem_bytes: peak device memory of the pass (above inputs and gradients for ``linear``); None
            where not measured (CPU).
        date: ISO time of the run; the newest record wins when two files hold the same one.
    """

    benchmark: str
    device: str
    smoke: bool
    impl: str
    pass_name: str
    shape: Tuple[Tuple[str, object], ...]
    seconds: float
    achieved: Optional[float] = None
    ceiling: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    date: str = ""
    roofline_pct: Optional[float] = None

    @property
    def pct_of_ceiling(self) -> Optional[float]:
        """The percentage of the roofline of the implementation's own work (``bench.work``) where the result
        records it; else the achieved throughput as a percentage of the ceiling."""
        if self.roofline_pct is not None:
            return self.roofline_pct
        if self.achieved is None or not self.ceiling:
            return None
        return 100 * self.achieved / self.ceiling

    @property
    def vocab(self) -> Optional[int]:
        """The vocabulary size V of the shape."""
        return dict(self.shape).get("vocab")


@dataclass
class Results:
    """Everything read from a results folder."""

    records: List[Record] = field(default_factory=list)
    errors: Dict[Tuple[str, bool], List[str]] = field(default_factory=lambda: defaultdict(list))
    notes: Dict[Tuple[str, bool], List[str]] = field(default_factory=lambda: defaultdict(list))
    ignored: List[str] = field(default_factory=list)
    files: int = 0
    compiled: List[Dict] = field(default_factory=list)
    """Static reports of ``python -m bench.compiled`` (compiled for GPUs, not run on them)."""


def _shape(values: Dict) -> Tuple[Tuple[str, object], ...]:
    return tuple((key, values[key]) for key in SHAPE_KEYS if values.get(key) is not None)


def shape_label(shape, without_vocab: bool = False) -> str:
    """``N=64 V=4096``-style label of a shape (its items as ``(key, value)`` pairs)."""
    return " ".join(f"{SHAPE_LABELS.get(key, key)}={value}" for key, value in shape
                    if not (without_vocab and key == "vocab"))


def _memory(value) -> Optional[int]:
    return None if value is None or value < 0 else int(value)


def _script_records(payload: Dict, results: Results) -> None:
    """Records of a ``python -m bench.X`` file (rows with ``fwd_ms``/``fwd_bwd_ms``, or rollout rows)."""
    name, device = payload["benchmark"], payload["device"]
    name = "e2e" if name.startswith("e2e") else name  # e2e-<model>
    smoke = bool(payload.get("smoke", device.startswith("cpu")))
    common = {"benchmark": name, "device": device, "smoke": smoke, "date": payload.get("date", "")}
    if "memory_check" in payload and payload["memory_check"].get("fp32_logits_bytes"):
        check = payload["memory_check"]
        results.notes[device, smoke].append(
            f"Memory check of the chunked CPU path ({name}, N = {check.get('n_tokens')}, V = {check.get('vocab')}): "
            f"{check['peak_extra_bytes'] / 2**20:.0f} MiB above inputs and gradients, against "
            f"{check['fp32_logits_bytes'] / 2**20:.0f} MiB of fp32 logits.")
    for row in payload["rows"]:
        shape = _shape({"model": payload.get("model"), **row})
        if "error" in row:
            results.errors[device, smoke].append(f"{name} {row['impl']} at {shape_label(shape)}: {row['error']}")
            continue
        if name == "rollout":
            results.records.append(Record(impl=row["impl"], pass_name="generate", shape=shape,
                                          seconds=row["seconds"], tokens_per_s=row.get("tokens_per_s"), **common))
            continue
        if name == "e2e":  # seconds per step; the decode bandwidth is the rlfuse row's (its %, of copy bandwidth)
            shape = _shape({"model": row.get("model"), "P": row.get("prompts"), "G": row.get("num_generations"),
                            "T": row.get("max_new_tokens")})
            results.records.append(Record(impl=row["impl"], pass_name="step", shape=shape, seconds=row["step_s"],
                                          tokens_per_s=row.get("tokens_per_s"), achieved=row.get("decode_gbs"),
                                          ceiling=payload.get("copy_bandwidth_gbs") if row.get("decode_gbs") else None,
                                          **common))
            continue
        for pass_name in ("fwd", "fwd_bwd"):
            results.records.append(_kernel_record(payload, row, pass_name, shape, common))


def _kernel_record(payload: Dict, row: Dict, pass_name: str, shape, common: Dict) -> Record:
    """One pass of a ``bench.logprobs`` / ``policy_loss`` / ``linear`` row; the peak memory is the
    forward+backward's (the scripts measure only that one)."""
    if payload["benchmark"] == "linear":
        achieved, peak = row.get(f"{pass_name}_tflops"), row.get("peak_extra_mem_bytes")
        ceiling = payload.get("gemm_tflops", {}).get(f"{row.get('m_tokens')}x{row.get('hidden')}x{row.get('vocab')}")
    else:
        achieved, peak = row.get(f"{pass_name}_gbs"), row.get("peak_mem_bytes")
        ceiling = payload.get("copy_bandwidth_gbs")
    return Record(impl=row["impl"], pass_name=pass_name, shape=shape, seconds=row[f"{pass_name}_ms"] / 1e3,
                  achieved=achieved, ceiling=ceiling, peak_mem_bytes=_memory(peak) if pass_name == "fwd_bwd" else None,
                  roofline_pct=row.get(f"{pass_name}_pct_roofline"), **common)


def _suite_records(payload: Dict, results: Results) -> None:
    """Records of a pytest-benchmark JSON written by ``pytest bench/`` (the roofline in ``extra_info``)."""
    for bench in payload["benchmarks"]:
        info = bench.get("extra_info", {})
        if "benchmark" not in info or "device" not in info:
            continue  # a benchmark from another suite
        linear = info["benchmark"] == "linear"
        seconds = info.get("seconds") or bench["stats"]["median"]
        peak = info.get("peak_extra_mem_bytes") if linear else info.get("peak_mem_bytes")
        results.records.append(Record(
            benchmark=info["benchmark"], device=info["device"], smoke=bool(info.get("smoke")), impl=info["impl"],
            pass_name=info["pass"], shape=_shape({**info.get("shape", {}), "vocab": info.get("vocab")}),
            seconds=seconds, achieved=info.get("achieved_tflops" if linear else "achieved_gbs"),
            ceiling=info.get("gemm_tflops" if linear else "copy_bandwidth_gbs"),
            tokens_per_s=info.get("tokens_per_s"), peak_mem_bytes=_memory(peak), date=payload.get("datetime", ""),
            roofline_pct=info.get("pct_of_ceiling") if info.get("ceiling") == "roofline of its own work" else None))


def load_results(results_dir: Path) -> Results:
    """Read every ``*.json`` in ``results_dir``; a file of neither format is listed in ``ignored``.

    When the same (device, size, benchmark, pass, shape, implementation) appears in several files, the
    newest run is kept.
    """
    results = Results()
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            payload = json.loads(path.read_text())
            if isinstance(payload, dict) and "rows" in payload and "benchmark" in payload:
                _script_records(payload, results)
            elif isinstance(payload, dict) and isinstance(payload.get("benchmarks"), list):
                _suite_records(payload, results)
            elif isinstance(payload, dict) and payload.get("kind") == "compiled":
                results.compiled.append(payload)
            else:
                raise ValueError("neither a bench.X nor a pytest-benchmark result")
            results.files += 1
        except (ValueError, KeyError, TypeError) as error:
            results.ignored.append(f"{path.name} ({type(error).__name__}: {error})"[:200])
    newest: Dict[Tuple, Record] = {}
    for record in results.records:
        key = (record.device, record.smoke, record.benchmark, record.pass_name, record.shape, record.impl)
        if key not in newest or _when(record.date) >= _when(newest[key].date):
            newest[key] = record
    results.records = list(newest.values())
    return results


def _when(date: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(date)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def is_rlfuse(impl: str) -> bool:
    """rlfuse's own implementations (their names start with ``rlfuse``); the others are peers."""
    return impl.startswith("rlfuse")


def speedup(record: Record, peer: Record) -> float:
    """How many times faster ``record`` is than ``peer`` at the same shape.

    The ratio of generated tokens per second when both have one (rollout, whose samplers may stop at
    different lengths), else peer time / record time.
    """
    if record.tokens_per_s and peer.tokens_per_s:
        return record.tokens_per_s / peer.tokens_per_s
    return peer.seconds / record.seconds


def unit_of(benchmark: str) -> str:
    """The throughput unit the benchmark is judged in: TFLOP/s for ``linear``, GB/s otherwise."""
    return "TFLOP/s" if benchmark == "linear" else "GB/s"


def _fmt(value, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.4g}{suffix}"


def _sort_key(record: Record):
    return tuple(str(v).zfill(12) for _, v in record.shape), not is_rlfuse(record.impl), record.impl


def _section_order(section: Tuple[str, bool]):
    device, smoke = section
    return device.startswith("cpu"), smoke, device


def _table_order(key: Tuple[str, str]):
    benchmark, pass_name = key
    return BENCHMARK_ORDER.index(benchmark) if benchmark in BENCHMARK_ORDER else len(BENCHMARK_ORDER), key


def _groups(records: List[Record]):
    """Records by (device, smoke), then by (benchmark, pass); GPU sections first, CPU smoke last."""
    sections: Dict[Tuple[str, bool], Dict[Tuple[str, str], List[Record]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        sections[record.device, record.smoke][record.benchmark, record.pass_name].append(record)
    for section in sorted(sections, key=_section_order):
        tables = sections[section]
        yield section, [(key, sorted(tables[key], key=_sort_key)) for key in sorted(tables, key=_table_order)]


def size_label(device: str, smoke: bool) -> str:
    """``CPU smoke``, ``CPU full``, ``GPU smoke`` or ``GPU full``: what kind of figures a section holds."""
    return f"{'CPU' if device.startswith('cpu') else 'GPU'} {'smoke' if smoke else 'full'}"


SIZE_NOTES = {"CPU smoke": "Triton interpreter; checks that everything runs, not a speed figure",
              "CPU full": "the engine benchmarks on the real model; CPU figures, not GPU ones",
              "GPU smoke": "small shapes, not representative", "GPU full": "full shapes"}


def section_title(device: str, smoke: bool) -> str:
    """The heading of one device's section; CPU runs are labelled as smoke runs, not speed figures."""
    label = size_label(device, smoke)
    return f"{device} ({label}: {SIZE_NOTES[label]})"


def table_markdown(benchmark: str, records: List[Record]) -> str:
    """One markdown table: shape, implementation, time, throughput, ceiling, %, memory, speed-ups."""
    unit = unit_of(benchmark)
    peers = sorted({r.impl for r in records if not is_rlfuse(r.impl)})
    by_shape: Dict[Tuple, Dict[str, Record]] = defaultdict(dict)
    for record in records:
        by_shape[record.shape][record.impl] = record
    header = ["shape", "impl", "time (ms)"]
    if benchmark in ("rollout", "e2e"):
        header.append("tokens/s")
    header += [unit, f"ceiling {unit}", "% of ceiling", "peak mem (MiB)"] + [f"speed-up vs {peer}" for peer in peers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        cells = [shape_label(record.shape), record.impl, _fmt(record.seconds * 1e3)]
        if benchmark in ("rollout", "e2e"):
            cells.append(_fmt(record.tokens_per_s))
        peak = None if record.peak_mem_bytes is None else record.peak_mem_bytes / 2**20
        cells += [_fmt(record.achieved), _fmt(record.ceiling), _fmt(record.pct_of_ceiling, "%"), _fmt(peak)]
        for peer in peers:
            other = by_shape[record.shape].get(peer)
            cells.append(f"{speedup(record, other):.3g}×" if is_rlfuse(record.impl) and other else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_name(device: str, smoke: bool, benchmark: str, pass_name: str) -> str:
    """``<device>-<smoke|full>-<benchmark>-<pass>.png``, the device's name made file-safe."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    return f"{slug}-{'smoke' if smoke else 'full'}-{benchmark}-{pass_name}.png"


def plot_throughput(records: List[Record], title: str, path: Path) -> Optional[Path]:
    """Achieved GB/s (TFLOP/s) against V, one line per implementation, one panel per other dimension,
    the ceiling as a dashed horizontal line. Returns ``path``, or None when nothing has a throughput."""
    records = [r for r in records if r.achieved is not None and r.vocab is not None and r.benchmark in PLOTTED]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = unit_of(records[0].benchmark)
    panels: Dict[str, List[Record]] = defaultdict(list)
    for record in records:
        panels[shape_label(record.shape, without_vocab=True)].append(record)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (label, panel) in zip(axes[0], sorted(panels.items())):
        for impl in sorted({r.impl for r in panel}, key=lambda name: (not is_rlfuse(name), name)):
            points = sorted((r.vocab, r.achieved) for r in panel if r.impl == impl)
            ax.plot(*zip(*points), marker="o", label=impl)
        ceilings = [r.ceiling for r in panel if r.ceiling]
        if ceilings:
            kind = "bare GEMM (best shape)" if unit == "TFLOP/s" else "copy bandwidth"
            ax.axhline(max(ceilings), color="black", linestyle="--",
                       label=f"ceiling: {kind}, {max(ceilings):.4g} {unit}")
        ax.set_xscale("log", base=2)
        vocabs = sorted({r.vocab for r in panel})
        ax.set_xticks(vocabs, [str(v) for v in vocabs], minor=False)
        ax.minorticks_off()
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(f"achieved {unit}")
        ax.set_title(label or "all shapes", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_markdown(results: Results, plots: Dict[Tuple[str, bool, str, str], Path], out_dir: Path) -> str:
    """The report's markdown; ``plots`` maps (device, smoke, benchmark, pass) to a PNG, linked relative to
    ``out_dir`` (the folder of REPORT.md)."""
    lines = ["# Benchmark report", ""]
    if not results.records:
        lines += ["No results yet. Run `pytest bench/ --benchmark-only` (add `--full` on a GPU) or "
                  "`python -m bench.logprobs` / `bench.policy_loss` / `bench.linear` / `bench.rollout`, "
                  "then `python -m bench.report`.", ""]
    else:
        lines += [f"Generated by `python -m bench.report` from {results.files} result file(s). Times are medians. "
                  "Throughput is the bytes (FLOPs for `linear`) each implementation moves (does) over the time. "
                  "The percentage is of the roofline of that implementation's own work where the results record "
                  "it (`bench.work`: the time its FLOPs take at a bare GEMM's rate of the same shape plus its "
                  "bytes at the copy bandwidth, both measured in the same run), else of the fewest bytes at the "
                  "copy bandwidth (older results). Speed-up = peer time / rlfuse time at the same shape "
                  "(the ratio of generated tokens per second for the rollout). Peak memory is above what was "
                  "allocated before (above inputs and gradients for `linear`), n/a on a CPU.", ""]
    for (device, smoke), tables in _groups(results.records):
        lines += [f"## {section_title(device, smoke)}", ""]
        for (benchmark, pass_name), records in tables:
            heading = f"### {benchmark}: {PASS_NAMES.get(pass_name, pass_name)}"
            lines += [heading, "", table_markdown(benchmark, records), ""]
            plot = plots.get((device, smoke, benchmark, pass_name))
            if plot is not None:
                link = Path(os.path.relpath(plot, out_dir)).as_posix()
                lines += [f"![{benchmark} {pass_name} on {device}]({link})", ""]
        lines += [f"- {note}" for note in results.notes.get((device, smoke), [])]
        lines += [f"- Not measured: {error}" for error in results.errors.get((device, smoke), [])]
        if results.notes.get((device, smoke)) or results.errors.get((device, smoke)):
            lines.append("")
    lines += compiled_markdown(results.compiled)
    if results.ignored:
        lines += ["## Ignored files", ""] + [f"- {item}" for item in results.ignored] + [""]
    return "\n".join(lines)


def compiled_markdown(reports: List[Dict]) -> List[str]:
    """A section per ``bench.compiled`` report: registers, spills, shared memory and tensor cores of every
    kernel configuration, compiled ahead of time for sm_80 and sm_90a, not run on them."""
    from bench.compiled import SPILL_BYTES_OUTSIDE_LOOPS, format_table

    lines: List[str] = []
    for report in reports:
        ptxas = ", ".join(f"{arch} {version}" for arch, version in report["ptxas_version"].items())
        failures = report.get("gate_failures", [])
        lines += [f"## Compiled for sm_80 and sm_90a, not run on them (Triton {report['triton_version']}, "
                  f"ptxas {ptxas})", "",
                  "Static figures from `python -m bench.compiled`: every kernel at every launch configuration its "
                  "wrapper picks at real model shapes, compiled ahead of time without a GPU. They say nothing about "
                  "speed. Registers are per thread; spill bytes are stores plus loads. The gate fails on a spill "
                  "inside an innermost loop (where tiles stream) and on more than "
                  f"{SPILL_BYTES_OUTSIDE_LOOPS} B of spill stores outside them.", "",
                  format_table(report["records"]), "",
                  f"Gate: {'passed' if not failures else f'{len(failures)} failure(s)'}.", ""]
    return lines


def build_report(results_dir: Path = Path("bench/results"), out: Path = Path("bench/REPORT.md"),
                 plots_dir: Path = Path("bench/plots")) -> str:
    """Read ``results_dir``, write the plots under ``plots_dir`` and the markdown to ``out``; return the markdown."""
    results = load_results(Path(results_dir))
    plots = {}
    for (device, smoke), tables in _groups(results.records):
        for (benchmark, pass_name), records in tables:
            title = f"{benchmark} {PASS_NAMES.get(pass_name, pass_name)} on {device} ({size_label(device, smoke)})"
            path = plot_throughput(records, title, Path(plots_dir) / plot_name(device, smoke, benchmark, pass_name))
            if path is not None:
                plots[device, smoke, benchmark, pass_name] = path
    markdown = render_markdown(results, plots, Path(out).parent)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(markdown)
    return markdown


@dataclass
class Args:
    """Report options."""

    results_dir: Path = Path("bench/results")
    """Where the result JSON files are (both ``python -m bench.X`` and ``pytest bench/`` ones)."""
    out: Path = Path("bench/REPORT.md")
    """The markdown report."""
    plots_dir: Path = Path("bench/plots")
    """Where the PNG plots go."""


def main(args: Args) -> None:
    """Write the report and say where."""
    build_report(args.results_dir, args.out, args.plots_dir)
    print(f"wrote {args.out} (plots in {args.plots_dir})")


if __name__ == "__main__":
    main(tyro.cli(Args))

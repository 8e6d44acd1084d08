"""``python -m bench.report`` on synthetic results of both formats, and the pytest-benchmark suite's JSON.

Speed is never asserted: the figures below are made up, and the one real run only checks fields.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import logprobs, report
from bench.linear import roofline_flops

REPO = Path(__file__).resolve().parents[1]
CPU, GPU = "cpu-x86_64-2threads", "NVIDIA H100 80GB HBM3"
GPU_BANDWIDTH, CPU_BANDWIDTH, GEMM_TFLOPS = 3000.0, 20.0, 500.0


def script_file(folder, name, device, rows, date="2025-01-01T00:00:00+00:00", **extra):
    """A result file as ``bench.common.write_results`` writes it."""
    payload = {"benchmark": name, "device": device, "smoke": device.startswith("cpu"), "date": date,
               "torch": "2.x", **extra, "rows": rows}
    path = folder / f"{name}-{device.replace(' ', '_')}-{date[:10]}.json"
    path.write_text(json.dumps(payload))
    return path


def kernel_row(impl, n, v, fwd_ms, fwd_bwd_ms):
    fwd_bytes, fwd_bwd_bytes = logprobs.roofline_bytes(n, v, 2)
    return {"impl": impl, "n_tokens": n, "vocab": v, "dtype": "bfloat16", "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": fwd_bwd_bytes,
            "fwd_gbs": fwd_bytes / fwd_ms * 1e3 / 1e9, "fwd_bwd_gbs": fwd_bwd_bytes / fwd_bwd_ms * 1e3 / 1e9,
            "fwd_pct_copy_bw": 0.0, "fwd_bwd_pct_copy_bw": 0.0, "peak_mem_bytes": -1}


def suite_entry(info, seconds):
    """One benchmark of pytest-benchmark's JSON, with the suite's ``extra_info``."""
    return {"group": None, "name": f"test_{info['benchmark']}[{info['impl']}]", "params": {}, "extra_info": info,
            "stats": {"median": seconds, "min": seconds, "max": seconds, "rounds": 3}}


def suite_kernel(impl, n, v, seconds, pass_name="fwd_bwd"):
    num_bytes = logprobs.roofline_bytes(n, v, 2)[pass_name == "fwd_bwd"]
    return suite_entry({
        "benchmark": "logprobs", "impl": impl, "pass": pass_name, "device": GPU, "device_type": "cuda", "smoke": False,
        "shape": {"n_tokens": n, "vocab": v}, "vocab": v, "seconds": seconds, "bytes": num_bytes, "flops": None,
        "achieved_gbs": num_bytes / seconds / 1e9, "copy_bandwidth_gbs": GPU_BANDWIDTH, "ceiling": "copy_bandwidth_gbs",
        "peak_mem_bytes": 3 * 2**20}, seconds)


def suite_rollout(impl, seconds, tokens):
    return suite_entry({
        "benchmark": "rollout", "impl": impl, "pass": "generate", "device": GPU, "device_type": "cuda", "smoke": False,
        "shape": {"model": "smollm2-135m", "prompts": 4, "num_generations": 8, "max_new_tokens": 128, "vocab": 49152},
        "vocab": 49152, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}, seconds)


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    # CPU smoke, bench.logprobs format; the peer that could not run is reported, not tabulated.
    failed = {"impl": "trl", "n_tokens": 64, "vocab": 4096, "error": "ImportError: no trl"}
    script_file(folder, "logprobs", CPU, [kernel_row("rlfuse-triton", 64, 4096, 400.0, 800.0),
                                          kernel_row("torch-eager", 64, 4096, 2.0, 4.0), failed],
                copy_bandwidth_gbs=CPU_BANDWIDTH)
    # GPU, bench.linear format.
    flops_fwd, flops_fb = roofline_flops(8192, 896, 32000)
    linear_rows = [{"impl": impl, "m_tokens": 8192, "hidden": 896, "vocab": 32000, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                    "fwd_tflops": flops_fwd / fwd * 1e3 / 1e12, "fwd_bwd_tflops": flops_fb / fb * 1e3 / 1e12,
                    "peak_extra_mem_bytes": 64 * 2**20}
                   for impl, fwd, fb in (("rlfuse-fused-linear-triton", 1.0, 4.0),
                                         ("materialized+rlfuse-logits", 2.0, 5.0))]
    script_file(folder, "linear", GPU, linear_rows, gemm_tflops={"8192x896x32000": GEMM_TFLOPS})
    # GPU, pytest-benchmark format: logprobs at two vocabulary sizes, and the rollout.
    benchmarks = [suite_kernel("rlfuse-triton", 8192, 32000, 0.5e-3), suite_kernel("torch-eager", 8192, 32000, 2.0e-3),
                  suite_kernel("torch-compile", 8192, 32000, 1.0e-3), suite_kernel("rlfuse-triton", 8192, 128256, 2e-3),
                  suite_kernel("torch-eager", 8192, 128256, 9e-3), suite_rollout("hf-generate", 1.0, 1000),
                  suite_rollout("rlfuse-shared-prefix", 0.5, 1750)]
    (folder / "suite-gpu-full.json").write_text(json.dumps({"machine_info": {}, "commit_info": {},
                                                            "datetime": "2025-01-02T00:00:00+00:00",
                                                            "benchmarks": benchmarks}))
    return folder


def sections(markdown):
    """``{heading: text}`` of the ``## `` sections."""
    parts = markdown.split("\n## ")[1:]
    return {part.splitlines()[0]: part for part in parts}


def table(section, heading):
    """The markdown table under ``### heading`` as a list of ``{column: cell}``."""
    text = section.split(f"### {heading}\n", 1)[1].strip()
    lines = text.split("\n\n", 1)[0].splitlines()  # the table ends at the first blank line
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(rows[0], row)) for row in rows[2:]]


def find(rows, shape, impl):
    (row,) = [row for row in rows if row["shape"] == shape and row["impl"] == impl]
    return row


def number(cell):
    return float(cell.rstrip("×%"))


@pytest.fixture
def built(results_dir, tmp_path):
    out = tmp_path / "report" / "REPORT.md"
    markdown = report.build_report(results_dir, out, tmp_path / "report" / "plots")
    assert out.read_text() == markdown
    return markdown, sections(markdown), tmp_path / "report"


def test_cpu_smoke_and_gpu_results_are_separate_sections(built):
    _, parts, _ = built
    (cpu,) = [text for heading, text in parts.items() if heading.startswith(CPU)]
    (gpu,) = [text for heading, text in parts.items() if heading.startswith(GPU)]
    assert "CPU smoke" in cpu.splitlines()[0] and "not a speed figure" in cpu.splitlines()[0]
    assert "GPU full" in gpu.splitlines()[0]
    assert "N=64 V=4096" in cpu and "N=64 V=4096" not in gpu
    assert "V=32000" in gpu and "V=32000" not in cpu
    assert "### linear" not in cpu and "### rollout" not in cpu
    assert "Not measured: logprobs trl" in cpu and "trl" not in gpu


def test_speedups_against_each_peer(built):
    _, parts, _ = built
    gpu = next(text for heading, text in parts.items() if heading.startswith(GPU))
    rows = table(gpu, "logprobs: forward+backward")
    fast = find(rows, "N=8192 V=32000", "rlfuse-triton")
    assert number(fast["speed-up vs torch-eager"]) == pytest.approx(4.0, rel=1e-3)
    assert number(fast["speed-up vs torch-compile"]) == pytest.approx(2.0, rel=1e-3)
    large = find(rows, "N=8192 V=128256", "rlfuse-triton")
    assert number(large["speed-up vs torch-eager"]) == pytest.approx(4.5, rel=1e-3)
    assert large["speed-up vs torch-compile"] == ""  # no torch-compile at that shape
    assert find(rows, "N=8192 V=32000", "torch-eager")["speed-up vs torch-compile"] == ""  # peers are not compared
    linear = table(gpu, "linear: forward+backward")
    assert number(find(linear, "M=8192 H=896 V=32000", "rlfuse-fused-linear-triton")
                  ["speed-up vs materialized+rlfuse-logits"]) == pytest.approx(1.25, rel=1e-3)
    # The rollout compares generated tokens per second (3500 against 1000), not times (0.5 s against 1 s).
    rollout = table(gpu, "rollout: generate")
    (rlfuse,) = [row for row in rollout if row["impl"] == "rlfuse-shared-prefix"]
    assert number(rlfuse["speed-up vs hf-generate"]) == pytest.approx(3.5, rel=1e-3)


def test_time_and_percent_of_roofline(built):
    _, parts, _ = built
    gpu = next(text for heading, text in parts.items() if heading.startswith(GPU))
    cpu = next(text for heading, text in parts.items() if heading.startswith(CPU))
    row = find(table(gpu, "logprobs: forward+backward"), "N=8192 V=32000", "rlfuse-triton")
    fwd_bwd_bytes = 3 * 8192 * 32000 * 2 + 8192 * 8 + 2 * 8192 * 4 + 2 * 8192 * 4  # logits read twice, written once
    assert number(row["time (ms)"]) == pytest.approx(0.5)
    assert number(row["GB/s"]) == pytest.approx(fwd_bwd_bytes / 0.5e-3 / 1e9, rel=1e-3)
    assert number(row["% of ceiling"]) == pytest.approx(100 * fwd_bwd_bytes / 0.5e-3 / 1e9 / GPU_BANDWIDTH, rel=1e-3)
    assert number(row["peak mem (MiB)"]) == pytest.approx(3.0)
    linear = find(table(gpu, "linear: forward"), "M=8192 H=896 V=32000", "rlfuse-fused-linear-triton")
    assert number(linear["% of ceiling"]) == pytest.approx(100 * 2 * 8192 * 896 * 32000 / 1e-3 / 1e12 / GEMM_TFLOPS,
                                                           rel=1e-3)
    assert "TFLOP/s" in table(gpu, "linear: forward")[0]
    smoke = find(table(cpu, "logprobs: forward"), "N=64 V=4096", "rlfuse-triton")
    assert number(smoke["speed-up vs torch-eager"]) == pytest.approx(2.0 / 400.0, rel=1e-3)
    assert smoke["peak mem (MiB)"] == "n/a"


def test_plots_are_written_per_device(built):
    markdown, _, folder = built
    plots = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert "cpu-x86-64-2threads-smoke-logprobs-fwd_bwd.png" in plots
    assert "nvidia-h100-80gb-hbm3-full-logprobs-fwd_bwd.png" in plots
    assert "nvidia-h100-80gb-hbm3-full-linear-fwd.png" in plots
    assert not any("rollout" in name for name in plots)
    for name in plots:
        assert (folder / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name})" in markdown


def test_newest_run_wins_and_unreadable_files_are_listed(results_dir, tmp_path):
    script_file(results_dir, "logprobs", CPU, [kernel_row("rlfuse-triton", 64, 4096, 123.0, 456.0)],
                date="2025-03-01T00:00:00+00:00", copy_bandwidth_gbs=CPU_BANDWIDTH)
    (results_dir / "notes.json").write_text(json.dumps({"hello": 1}))
    markdown = report.build_report(results_dir, tmp_path / "REPORT.md", tmp_path / "plots")
    cpu = next(text for heading, text in sections(markdown).items() if heading.startswith(CPU))
    assert number(find(table(cpu, "logprobs: forward"), "N=64 V=4096", "rlfuse-triton")["time (ms)"]) == 123.0
    assert "notes.json" in sections(markdown)["Ignored files"]


def test_no_results_yet(tmp_path):
    (tmp_path / "results").mkdir()
    markdown = report.build_report(tmp_path / "results", tmp_path / "REPORT.md", tmp_path / "plots")
    assert "No results yet" in markdown and (tmp_path / "REPORT.md").exists()
    assert not list(tmp_path.glob("plots/*.png"))


def test_suite_json_carries_the_roofline(tmp_path):
    """One smoke benchmark of ``pytest bench/`` in a subprocess: the saved JSON holds the roofline fields."""
    out = tmp_path / "results" / "suite.json"
    out.parent.mkdir()
    node = "bench/test_logprobs.py::test_logprobs[64x4096-rlfuse-triton-fwd]"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", node, "--benchmark-only", f"--benchmark-json={out}",
                           "-p", "no:cacheprovider", "-q"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["benchmarks"]
    info = entry["extra_info"]
    assert info["benchmark"] == "logprobs" and info["impl"] == "rlfuse-triton" and info["pass"] == "fwd"
    assert info["smoke"] is True and info["device"].startswith("cpu") and info["vocab"] == 4096
    assert info["shape"] == {"n_tokens": 64, "vocab": 4096}
    assert info["bytes"] == logprobs.roofline_bytes(64, 4096, 2)[0] + 8 * 64 and info["flops"] is None
    assert info["work_source"] == "formula" and info["roofline_s"] > 0
    assert info["seconds"] == entry["stats"]["median"] > 0
    assert info["ceiling"] == "roofline of its own work" and info["copy_bandwidth_gbs"] > 0
    assert info["achieved_gbs"] == pytest.approx(info["bytes"] / info["seconds"] / 1e9)
    assert info["pct_of_ceiling"] == pytest.approx(100 * info["achieved_gbs"] / info["copy_bandwidth_gbs"])
    assert info["peak_mem_bytes"] == -1
    markdown = report.build_report(out.parent, tmp_path / "REPORT.md", tmp_path / "plots")
    cpu = next(text for heading, text in sections(markdown).items() if "CPU smoke" in heading)
    assert find(table(cpu, "logprobs: forward"), "N=64 V=4096", "rlfuse-triton")["GB/s"] != "n/a"

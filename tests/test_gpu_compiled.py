"""bench.gpu_compiled reads a Triton cache folder and sets each kernel against the compile gate's static
report: here the cache is filled ahead of time by ``bench.compiled`` (no GPU), so every kernel must match its
static record, and a record whose registers differ must not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_compiled import compare

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["rlfuse.kernels.advantages_triton", "rlfuse.kernels.logprobs_triton"]


def _run(args, env):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(cache folder, static report) of two kernel modules compiled for sm_90a, bf16, SmolLM2's shape."""
    folder = tmp_path_factory.mktemp("gpu-compiled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "cache")
    _run(["bench.compiled", "--modules", *MODULES, "--archs", "90", "--dtypes", "bf16", "--shapes",
          "smollm2-135m", "--out", str(folder / "static.json")], env)
    return folder, env


def test_every_cached_kernel_matches_its_static_record(cache):
    folder, env = cache
    static = json.loads((folder / "static.json").read_text())
    _run(["bench.gpu_compiled", str(folder / "cache"), "--static", str(folder / "static.json"), "--out",
          str(folder / "gpu.json")], env)
    report = json.loads((folder / "gpu.json").read_text())
    rows = report["rows"]
    assert len(rows) == len(static["records"]) > 0
    assert {r["kernel"] for r in rows} == {r["kernel"].rsplit(".", 1)[1] for r in static["records"]}
    assert all(r["rlfuse"] and r["in_static_report"] and r["gpu"] == "sm_90a" for r in rows)
    assert report["summary"]["rlfuse_not_in_static_report"] == [] and report["summary"]["gate_failures"] == []
    by_regs = sorted((r["kernel"], r["num_warps"], r["registers"]) for r in rows)
    assert by_regs == sorted((r["kernel"].rsplit(".", 1)[1], r["num_warps"], r["registers"])
                             for r in static["records"])

    # A static report whose registers differ from what was compiled: every kernel is reported missing from it.
    for record in static["records"]:
        record["registers"] += 1
    summary = compare([dict(r) for r in rows], static, {r["kernel"] for r in rows})
    assert summary["rlfuse_in_static_report"] == 0
    assert len(summary["rlfuse_not_in_static_report"]) == len({(r["kernel"], r["num_warps"], r["registers"],
                                                                r["shared_bytes"]) for r in rows})


def test_missing_cache_folder_is_a_clear_error(tmp_path):
    from bench.gpu_compiled import cached_kernels

    with pytest.raises(ValueError, match="cache_dir .* is not a folder"):
        cached_kernels(tmp_path / "absent")

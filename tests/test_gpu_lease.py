"""The GPU lease script, dry-run on the CPU: every step runs at smoke sizes through Triton's interpreter and
leaves its JSON in parts.tgz, so the next lease (which may come in any session) finds it working."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lease_script_dry_run_writes_json_after_every_step(tmp_path, device):
    if device.type != "cpu":
        pytest.skip("the dry run is the CPU rehearsal of the lease")
    out = tmp_path / "lease"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(DRY="1", OUT=str(out), PY=str(Path(os.sys.executable)), BUDGET_S="420")
    proc = subprocess.run(["bash", "bench/gpu_lease.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0 and "] end" in log, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" not in log, log[-3000:]
    with tarfile.open(out / "parts.tgz") as archive:
        names = archive.getnames()
        payloads = {Path(name).name: archive.extractfile(name).read() for name in names
                    if name.endswith(".json") or name.endswith(".xml")}
    for prefix in ("suite-logprobs-", "suite-policy_loss-", "suite-linear-", "linear-sweep-smoke-", "row-sweep-smoke-",
                   "e2e-", "gpu-compiled", "tests.xml"):
        assert any(name.startswith(prefix) for name in payloads), (prefix, names)
    for name, data in payloads.items():
        if name.endswith(".json"):
            payload = json.loads(data)
            rows = payload.get("rows", payload.get("benchmarks"))
            assert rows, name
            assert not any("error" in row for row in rows if isinstance(row, dict)), (name, rows)
    assert b'failures="0"' in payloads["tests.xml"] and b'errors="0"' in payloads["tests.xml"]
    # The kernels compiled into the lease's cache are the committed static report's, register for register.
    compiled = json.loads(payloads["gpu-compiled.json"])
    assert compiled["summary"]["rlfuse_kernels"] > 0 and compiled["summary"]["gate_failures"] == []
    assert compiled["static_report"] and compiled["summary"]["rlfuse_not_in_static_report"] == []

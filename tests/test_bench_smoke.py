"""The benchmarks stay runnable on the CPU (smoke shapes); speed is never asserted here."""

import json

from bench import logprobs


def test_logprobs_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(logprobs, "SMOKE_SHAPES", [(64, 1000)])
    logprobs.main(logprobs.Args(device="cpu", out_dir=str(tmp_path)))
    (path,) = tmp_path.glob("logprobs-*.json")
    payload = json.loads(path.read_text())
    assert payload["smoke"] is True and payload["copy_bandwidth_gbs"] > 0
    (row,) = payload["rows"]
    assert row["vocab"] == 1000 and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert row["fwd_bytes"] == 64 * 1000 * 2 + 64 * 8 + 2 * 64 * 4

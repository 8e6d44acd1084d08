"""The benchmarks stay runnable on the CPU (smoke shapes, Triton interpreter); speed is never asserted here."""

import json

import pytest

from bench import logprobs, policy_loss


def load_rows(folder, prefix):
    (path,) = folder.glob(f"{prefix}-*.json")
    payload = json.loads(path.read_text())
    assert payload["smoke"] is True and payload["copy_bandwidth_gbs"] > 0
    return {row["impl"]: row for row in payload["rows"]}


def test_logprobs_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(logprobs, "SMOKE_SHAPES", [(16, 300)])
    logprobs.main(logprobs.Args(device="cpu", out_dir=str(tmp_path)))
    rows = load_rows(tmp_path, "logprobs")
    assert set(rows) == {"rlfuse-triton", "torch-eager"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["vocab"] == 300
        assert row["fwd_bytes"] == 16 * 300 * 2 + 16 * 8 + 2 * 16 * 4


@pytest.mark.parametrize("algo", ["dapo", "gspo"])
def test_policy_loss_benchmark_smoke(tmp_path, monkeypatch, algo):
    monkeypatch.setattr(policy_loss, "SMOKE_SHAPES", [(2, 8, 300)])
    policy_loss.main(policy_loss.Args(algo=algo, device="cpu", out_dir=str(tmp_path)))
    rows = load_rows(tmp_path, "policy_loss")
    assert set(rows) == {"rlfuse-triton", "torch-eager"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0 and row["fwd_bwd_bytes"] == 2 * 16 * 300 * 2 + 16 * 13

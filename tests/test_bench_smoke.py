"""The benchmarks stay runnable at smoke shapes on the ``device`` fixture's device (on the CPU through Triton's
interpreter); speed is never asserted here."""

import json

import pytest

from bench import logprobs, policy_loss


def load_rows(folder, prefix, device):
    (path,) = folder.glob(f"{prefix}-*.json")
    payload = json.loads(path.read_text())
    assert payload["smoke"] is (device.type != "cuda") and payload["copy_bandwidth_gbs"] > 0
    return {row["impl"]: row for row in payload["rows"]}


def check_impls(rows, expected, device):
    """The CPU runs exactly ``expected``; a GPU adds torch.compile and whichever peers are installed."""
    if device.type == "cuda":
        assert expected | {"torch-compile"} <= set(rows)
    else:
        assert set(rows) == expected


def test_logprobs_benchmark_smoke(tmp_path, monkeypatch, device):
    monkeypatch.setattr(logprobs, "SMOKE_SHAPES", [(16, 300)])
    logprobs.main(logprobs.Args(device=device.type, out_dir=str(tmp_path)))
    rows = load_rows(tmp_path, "logprobs", device)
    check_impls(rows, {"rlfuse-triton", "torch-eager"}, device)
    for row in rows.values():
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["vocab"] == 300
    # Each implementation is charged its own work: rlfuse's by design (one read forward, the row statistics
    # written), torch eager's as its aten ops move it, which is several passes over the logits.
    assert rows["rlfuse-triton"]["fwd_bytes"] == 16 * 300 * 2 + 16 * 8 + 2 * 16 * 4 + 16 * 8
    assert rows["rlfuse-triton"]["fwd_bwd_bytes"] == 3 * 16 * 300 * 2 + 16 * 8 + 4 * 16 * 4 + 16 * 8
    assert rows["torch-eager"]["fwd_work_source"] == "aten ops"
    assert rows["torch-eager"]["fwd_bytes"] > 3 * rows["rlfuse-triton"]["fwd_bytes"]


@pytest.mark.parametrize("algo", ["dapo", "gspo"])
def test_policy_loss_benchmark_smoke(tmp_path, monkeypatch, algo, device):
    monkeypatch.setattr(policy_loss, "SMOKE_SHAPES", [(2, 8, 300)])
    policy_loss.main(policy_loss.Args(algo=algo, device=device.type, out_dir=str(tmp_path)))
    rows = load_rows(tmp_path, "policy_loss", device)
    check_impls(rows, {"rlfuse-triton", "torch-eager"}, device)
    for row in rows.values():
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0
    passes = 2 if algo == "dapo" else 3  # token-local: one kernel; gspo: statistics, then d(logits)
    assert rows["rlfuse-triton"]["fwd_bwd_bytes"] == passes * 16 * 300 * 2 + 16 * 13
    assert rows["rlfuse-triton"]["fwd_bytes"] == 16 * 300 * 2 + 16 * 13
    assert rows["torch-eager"]["fwd_bwd_work_source"] == "aten ops"


def test_linear_benchmark_smoke(tmp_path, monkeypatch, device):
    from bench import linear

    monkeypatch.setattr(linear, "SMOKE_SHAPES", [(32, 32, 200)])
    # The memory check runs in its own process in the next test.
    monkeypatch.setattr(linear, "memory_check", lambda: {"peak_extra_bytes": 0, "fp32_logits_bytes": 0})
    linear.main(linear.Args(device=device.type, out_dir=str(tmp_path)))
    rows = load_rows_plain(tmp_path, "linear")
    check_impls(rows, {"rlfuse-linear-hybrid", "rlfuse-fused-linear-triton", "rlfuse-fused-linear-torch-chunked",
                       "materialized+rlfuse-logits"}, device)
    for row in rows.values():
        assert "error" not in row, row
        assert row["fwd_bwd_tflops"] > 0 and row["fwd_flops"] == 2 * 32 * 32 * 200
    # The backward recomputes the logits in rlfuse's paths (8·M·H·V); the materialized path does not (6·M·H·V)
    # but moves the (M, V) logits six times.
    assert rows["rlfuse-linear-hybrid"]["fwd_bwd_flops"] == 8 * 32 * 32 * 200
    assert rows["materialized+rlfuse-logits"]["fwd_bwd_flops"] == 6 * 32 * 32 * 200
    assert rows["materialized+rlfuse-logits"]["fwd_bwd_bytes"] >= 6 * 32 * 200 * 4


def test_linear_memory_check_stays_far_below_fp32_logits():
    """N = 4096 tokens, V = 131072: fp32 logits would take 2 GiB; the chunked path must not come near."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave the resident set at once
    out = subprocess.run([sys.executable, "-m", "bench.linear", "--memory-check"], capture_output=True, text=True,
                         timeout=600, check=True, env=env)
    check = json.loads(out.stdout.strip().splitlines()[-1])
    assert check["fp32_logits_bytes"] == 4096 * 131072 * 4
    assert 0 < check["peak_extra_bytes"] < check["fp32_logits_bytes"] / 4, check


def load_rows_plain(folder, prefix):
    (path,) = folder.glob(f"{prefix}-*.json")
    return {row["impl"]: row for row in json.loads(path.read_text())["rows"]}


def test_rollout_benchmark_smoke(tmp_path, smollm2_dir, device):
    from bench import rollout

    rollout.main(rollout.Args(model=smollm2_dir, prompts=1, num_generations=2, max_new_tokens=4, repeats=1,
                              device=device.type, out_dir=str(tmp_path)))
    rows = load_rows_plain(tmp_path, "rollout")
    assert set(rows) == {"hf-generate", "rlfuse-shared-prefix"}
    assert all(row["tokens_per_s"] > 0 for row in rows.values())
    assert rows["rlfuse-shared-prefix"]["speedup_vs_hf"] > 0


def test_mixed_precision_benchmark_smoke(tmp_path, smollm2_dir):
    from bench import mixed_precision

    path = mixed_precision.main(mixed_precision.Args(model=smollm2_dir, prompts=1, num_generations=2, max_new_tokens=4,
                                                     repeats=1, out_dir=str(tmp_path), smoke=True))
    payload = json.loads(path.read_text())
    assert payload["smoke"] is True and payload["gemm_gflops"]["bf16"] > 0 and payload["gemm_gflops"]["no"] > 0
    rows = {(row["part"], row["mixed_precision"], row["head"]): row for row in payload["rows"]}
    assert set(rows) == {("rollout", "no", "-"), ("rollout", "bf16", "-"), ("update", "no", "padded"),
                         ("update", "no", "masked"), ("update", "bf16", "padded"), ("update", "bf16", "masked")}
    assert all(row["seconds"] > 0 and row["matmul_gflops"] > 0 and row["peak_rss_gb"] > 0 for row in rows.values())
    kept, padded = payload["batch_tokens"]["kept"], payload["batch_tokens"]["padded"]
    assert 0 < kept <= padded and rows[("update", "no", "masked")]["tokens"] == kept

"""Benchmark ``token_logprobs`` (log-prob + entropy), forward and forward+backward.

Reports, per shape: median time, the fewest bytes an implementation must move (read the logits once,
write the outputs; backward also reads the logits again and writes d(logits)), achieved GB/s and its
share of the copy bandwidth measured in the same run, and peak memory. Run ``python -m bench.logprobs``;
on a machine without a GPU it runs a small smoke shape so that it stays alive in CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import tyro

from bench.common import copy_bandwidth_gbs, median_time_s, peak_memory_bytes, print_table, sync, write_results
from rlfuse.kernels import token_logprobs_reference

FULL_SHAPES = [(n, v) for n in (8192, 32768) for v in (32000, 128256, 151936, 262144)]
SMOKE_SHAPES = [(256, 32000), (256, 49152)]


@dataclass
class Args:
    """Benchmark options."""

    full: bool = False
    """Run the full shapes (N = 8192, 32768 tokens x V = 32000 ... 262144) instead of the smoke shapes."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def bench_shape(n: int, v: int, device: torch.device, dtype: torch.dtype, bandwidth: float) -> dict:
    """Time one (N, V) shape for the torch reference; returns a result row."""
    logits = torch.randn(n, v, device=device, dtype=dtype).mul_(4).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device)
    weights = torch.randn(n, device=device)

    def forward():
        with torch.no_grad():
            return token_logprobs_reference(logits, targets, return_entropy=True)

    def forward_backward():
        out = token_logprobs_reference(logits, targets, return_entropy=True)
        (out.logps * weights + out.entropy * weights).sum().backward()
        logits.grad = None
        sync(device)

    elem = torch.finfo(dtype).bits // 8
    fwd_bytes = n * v * elem + n * 8 + 2 * n * 4  # logits, targets, two float32 outputs
    fwd_bwd_bytes = fwd_bytes + n * v * elem * 2  # backward re-reads the logits and writes d(logits)
    t_fwd = median_time_s(forward, device)
    t_fb = median_time_s(forward_backward, device)
    return {
        "impl": "torch-reference",
        "n_tokens": n,
        "vocab": v,
        "dtype": str(dtype).replace("torch.", ""),
        "fwd_ms": t_fwd * 1e3,
        "fwd_bwd_ms": t_fb * 1e3,
        "fwd_bytes": fwd_bytes,
        "fwd_bwd_bytes": fwd_bwd_bytes,
        "fwd_gbs": fwd_bytes / t_fwd / 1e9,
        "fwd_pct_copy_bw": 100 * fwd_bytes / t_fwd / 1e9 / bandwidth,
        "fwd_bwd_gbs": fwd_bwd_bytes / t_fb / 1e9,
        "fwd_bwd_pct_copy_bw": 100 * fwd_bwd_bytes / t_fb / 1e9 / bandwidth,
        "peak_mem_bytes": peak_memory_bytes(forward_backward, device),
    }


def main(args: Args) -> None:
    """Run the benchmark and write ``bench/results/logprobs-<device>.json``."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    shapes = FULL_SHAPES if args.full else SMOKE_SHAPES
    bandwidth = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    rows = [bench_shape(n, v, device, dtype, bandwidth) for n, v in shapes]
    path = write_results("logprobs", device, rows, {"copy_bandwidth_gbs": bandwidth}, args.out_dir)
    print(f"copy bandwidth {bandwidth:.1f} GB/s on {device}")
    print_table(rows, ["impl", "n_tokens", "vocab", "fwd_ms", "fwd_bwd_ms", "fwd_pct_copy_bw", "fwd_bwd_pct_copy_bw",
                       "peak_mem_bytes"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

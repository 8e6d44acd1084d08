"""Sweep the candidates for log-probs from hidden states and the LM head on a GPU: the hybrid path's row
blocks and vocabulary chunks, the fused Triton path's tiles, and the materialized path they must beat.

Forward (under ``torch.no_grad()``) and forward+backward at the full shapes of the launch table, each with
its time, its percentage of the roofline of its own work (``bench.linear.work``: FLOPs at a bare GEMM's rate
of the same shape, bytes at the copy bandwidth, both measured in the same run) and its peak memory above
inputs and gradients. The configurations in :mod:`rlfuse.kernels.launch` are data: alternatives go in
through ``RLFUSE_LINEAR_IMPL`` and ``RLFUSE_LINEAR_HYBRID_BLOCKS``, or by replacing
``launch.linear_forward_config`` for the fused tiles. Each candidate is first checked against float32
materialized logits at a small shape; one that fails is reported, not timed. What this measures is what
:data:`rlfuse.kernels.launch.LINEAR_IMPLEMENTATION` should be chosen from.

``python -m bench.linear_sweep [--out-dir bench/results] [--time-limit-s 120] [--smoke]``; writes
``linear-sweep-<device>.json`` with one row per (shape, candidate, pass).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import tyro

from bench.common import (device_name, environment, measured_copy_bandwidth, median_time_s, peak_memory_bytes,
                          print_table, write_results)
from bench.linear import gemm_tflops, implementations, linear_impl, make_inputs, work
from rlfuse.kernels import launch

SHAPES = [(8192, 896, 151936), (8192, 4096, 128256), (8192, 896, 128256), (8192, 4096, 151936)]
SMOKE_SHAPES = [(40, 16, 300)]
#: (label, implementation, hybrid blocks "rows=..,columns=.." or fused tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps,
#: stages), or None for the launch table's own choice).
CANDIDATES: List[Tuple[str, str, object]] = [
    ("materialized", "materialized", None),
    ("hybrid", "hybrid", None),
    ("hybrid rows=N columns=2048", "hybrid", "columns=2048"),
    ("hybrid rows=N columns=4096", "hybrid", "columns=4096"),
    ("hybrid rows=2048 columns=4096", "hybrid", "rows=2048,columns=4096"),
    ("hybrid rows=4096 columns=2048", "hybrid", "rows=4096,columns=2048"),
    ("hybrid rows=2048 columns=256", "hybrid", "rows=2048,columns=256"),
    ("fused", "fused", None),
    ("fused 128x128x64 w8 s3", "fused", (128, 128, 64, 8, 3)),
    ("fused 128x256x64 w8 s3", "fused", (128, 256, 64, 8, 3)),
]
SMOKE_CANDIDATES = [("materialized", "materialized", None),
                    ("hybrid rows=16 columns=128", "hybrid", "rows=16,columns=128"), ("fused", "fused", None)]


@dataclass
class Args:
    """Sweep options."""

    out_dir: str = "bench/results"
    """Where the JSON goes."""
    time_limit_s: float = 120.0
    """Stop starting new measurements after this many seconds (the rows so far are written)."""
    repeats: int = 5
    """Timed calls per measurement (the median is reported)."""
    smoke: bool = False
    """A plumbing check on the CPU (Triton's interpreter, tiny shapes): not a speed figure."""


@contextlib.contextmanager
def candidate(impl: str, setting) -> Iterator[None]:
    """Force one candidate inside the block: its implementation and its blocks or tiles."""
    saved = launch.linear_forward_config
    if impl == "fused" and setting is not None:
        m, n, k, warps, stages = setting
        config = launch.LaunchConfig({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        launch.linear_forward_config = lambda *args, **kwargs: config
    blocks = setting if impl == "hybrid" else None
    try:
        with environment(RLFUSE_LINEAR_HYBRID_BLOCKS=blocks), linear_impl(None if impl == "materialized" else impl):
            yield
    finally:
        launch.linear_forward_config = saved


def check(fn, device: torch.device, n: int = 1000, h: int = 896, v: int = 32003) -> Optional[str]:
    """Compare ``fn`` against float32 materialized logits at a small shape; an error message, or None."""
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=torch.bfloat16, generator=gen) / h ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    logps, entropy = fn(hidden, weight, targets)
    (logps.sum() + entropy.sum()).backward()
    log_probs = torch.log_softmax(hidden.detach().float() @ weight.detach().float().T, -1)
    want_logps = log_probs.gather(1, targets[:, None])[:, 0]
    want_entropy = -(log_probs.exp() * log_probs).sum(-1)
    for name, got, want in (("logps", logps, want_logps), ("entropy", entropy, want_entropy)):
        error = (got.float() - want).abs().max().item()
        if not error < 5e-2:
            return f"{name} differs by {error:.3g}"
    if not (torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()):
        return "non-finite gradients"
    return None


def measure(fn, m: int, h: int, v: int, device: torch.device, repeats: int) -> Dict[str, float]:
    """Median seconds of the forward (no grad) and forward+backward, and the peak memory of the latter above
    inputs and gradients (CUDA only)."""
    hidden, weight, targets = make_inputs(m, h, v, device, torch.bfloat16)

    def forward():
        with torch.no_grad():
            fn(hidden, weight, targets)

    def forward_backward():
        logps, entropy = fn(hidden, weight, targets)
        (logps.sum() + entropy.sum()).backward()
        hidden.grad = weight.grad = None

    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    peak = peak_memory_bytes(forward_backward, device)
    return {"fwd": median_time_s(forward, device, warmup=2, repeats=repeats),
            "fwd_bwd": median_time_s(forward_backward, device, warmup=1, repeats=repeats),
            "peak_extra_mem_bytes": peak - grads if peak >= 0 else -1}


def main(args: Args) -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, plan = (SMOKE_SHAPES, SMOKE_CANDIDATES) if args.smoke else (SHAPES, CANDIDATES)
    check_shape = (40, 16, 301) if args.smoke else (1000, 896, 32003)
    start = time.perf_counter()
    bandwidth = measured_copy_bandwidth(device)
    ceilings = {f"{m}x{h}x{v}": gemm_tflops(m, h, v, device, torch.bfloat16) for m, h, v in shapes}
    peers = implementations(device)
    rows: List[Dict] = []
    for label, impl, setting in plan:
        if time.perf_counter() - start > args.time_limit_s:
            break
        name = {"materialized": "materialized+rlfuse-logits", "hybrid": "rlfuse-linear-hybrid",
                "fused": "rlfuse-fused-linear-triton"}[impl]
        fn = peers[name]
        with candidate(impl, setting):
            try:
                problem = check(fn, device, *check_shape)
            except Exception as error:  # a candidate that does not compile or launch is reported
                problem = f"{type(error).__name__}: {error}"[:300]
            if problem:
                rows.append({"candidate": label, "error": problem})
                continue
            for m, h, v in shapes:
                if time.perf_counter() - start > args.time_limit_s:
                    break
                key = f"{m}x{h}x{v}"
                timed = measure(fn, m, h, v, device, args.repeats)
                for pass_name in ("fwd", "fwd_bwd"):
                    done = work(name, pass_name, m, h, v, torch.bfloat16, device)
                    rows.append({"candidate": label, "impl": name, "shape": key, "pass": pass_name,
                                 "ms": timed[pass_name] * 1e3, "flops": done.flops, "bytes": done.bytes,
                                 "pct_roofline": done.fields(timed[pass_name], bandwidth,
                                                             ceilings[key])["pct_of_roofline"],
                                 "peak_extra_mem_bytes": timed["peak_extra_mem_bytes"]})
    meta = {"gemm_tflops": ceilings, "copy_bandwidth_gbs": bandwidth, "dtype": "bfloat16"}
    path = write_results("linear-sweep-smoke" if args.smoke else "linear-sweep", device, rows, meta, args.out_dir,
                         smoke=args.smoke)
    print(f"linear sweep on {device_name(device)}")
    print_table(rows, ["candidate", "shape", "pass", "ms", "pct_roofline", "peak_extra_mem_bytes", "error"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

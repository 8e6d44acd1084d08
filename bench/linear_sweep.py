"""Sweep the fused-linear kernels' launch configurations on a GPU: tiles x vocabulary slices, forward and
forward+backward, against a bare GEMM of the same shape and Cut Cross-Entropy where installed.

The configurations in :mod:`rlfuse.kernels.launch` are data; this script times alternatives to them by
replacing ``launch.linear_forward_config`` (which the backward's d(logits) kernel shares) and
``launch.LINEAR_FORWARD_PROGRAMS_PER_SM`` for the duration of each measurement. Each configuration is first
checked against a float32 materialized reference at a small shape; one that fails is reported, not timed.

``python -m bench.linear_sweep [--out-dir bench/results] [--time-limit-s 120]``: needs a CUDA GPU; writes
``linear-sweep-<device>.json`` with one row per (shape, tiles, programs per SM, pass).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import tyro

from bench.common import achieved_tflops, device_name, median_time_s, print_table, write_results
from bench.linear import gemm_tflops, make_inputs, roofline_flops
from rlfuse.kernels import launch, linear_token_logprobs

SHAPES = [(8192, 4096, 128256), (8192, 896, 151936), (32768, 2048, 151936)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4)]
SMOKE_SHAPES = [(40, 16, 300)]
SMOKE_TILES = [(16, 32, 16, 1, 1)]
PROGRAMS_PER_SM = [0, 2, 4]
"""0: one vocabulary slice per token tile (no split)."""


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


class Patched:
    """Replace the fused-linear forward tiles and the programs-per-SM target while inside the block."""

    def __init__(self, tiles: Tuple[int, ...], per_sm: int):
        self.tiles, self.per_sm = tiles, per_sm

    def __enter__(self):
        self.saved = launch.linear_forward_config, launch.LINEAR_FORWARD_PROGRAMS_PER_SM, launch.linear_forward_splits
        m, n, k, warps, stages = self.tiles
        config = launch.LaunchConfig({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
        launch.linear_forward_config = lambda *args, **kwargs: config
        if self.per_sm == 0:
            launch.linear_forward_splits = lambda *args, **kwargs: 1
        else:
            launch.LINEAR_FORWARD_PROGRAMS_PER_SM = self.per_sm
        return self

    def __exit__(self, *exc):
        launch.linear_forward_config, launch.LINEAR_FORWARD_PROGRAMS_PER_SM, launch.linear_forward_splits = self.saved


def check(device: torch.device, n: int = 1000, h: int = 896, v: int = 32003) -> Optional[str]:
    """Compare against float32 materialized logits at a small shape; an error message, or None."""
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=torch.bfloat16, generator=gen) / h ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    out = linear_token_logprobs(hidden, weight, targets, return_entropy=True)
    (out.logps.sum() + out.entropy.sum()).backward()
    log_probs = torch.log_softmax(hidden.detach().float() @ weight.detach().float().T, -1)
    want_logps = log_probs.gather(1, targets[:, None])[:, 0]
    want_entropy = -(log_probs.exp() * log_probs).sum(-1)
    for name, got, want in (("logps", out.logps, want_logps), ("entropy", out.entropy, want_entropy)):
        error = (got - want).abs().max().item()
        if not error < 2e-2:
            return f"{name} differs by {error:.3g}"
    if not (torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()):
        return "non-finite gradients"
    return None


def time_passes(m: int, h: int, v: int, device: torch.device, repeats: int,
                with_backward: bool = True) -> Dict[str, float]:
    """Median seconds of the forward (no grad) and of forward+backward of linear_token_logprobs."""
    hidden, weight, targets = make_inputs(m, h, v, device, torch.bfloat16)

    def forward():
        with torch.no_grad():
            linear_token_logprobs(hidden, weight, targets, return_entropy=True)

    def forward_backward():
        out = linear_token_logprobs(hidden, weight, targets, return_entropy=True)
        (out.logps.sum() + out.entropy.sum()).backward()
        hidden.grad = weight.grad = None

    times = {"fwd": median_time_s(forward, device, warmup=2, repeats=repeats)}
    if with_backward:
        times["fwd_bwd"] = median_time_s(forward_backward, device, warmup=1, repeats=repeats)
    return times


def main(args: Args) -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, tile_list = (SMOKE_SHAPES, SMOKE_TILES) if args.smoke else (SHAPES, TILES)
    check_shape = (40, 16, 301) if args.smoke else (1000, 896, 32003)
    start = time.perf_counter()
    rows: List[Dict] = []
    ceilings = {f"{m}x{h}x{v}": gemm_tflops(m, h, v, device, torch.bfloat16) for m, h, v in shapes}
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        linear_cross_entropy = None
    if linear_cross_entropy is not None:
        for m, h, v in shapes:
            hidden, weight, targets = make_inputs(m, h, v, device, torch.bfloat16)
            with torch.no_grad():
                seconds = median_time_s(lambda: linear_cross_entropy(hidden, weight, targets), device)
            rows.append({"impl": "cce", "shape": f"{m}x{h}x{v}", "pass": "fwd", "ms": seconds * 1e3,
                         "pct_gemm": 100 * achieved_tflops(roofline_flops(m, h, v)[0], seconds)
                         / ceilings[f"{m}x{h}x{v}"]})
    for tiles in tile_list:
        for per_sm in PROGRAMS_PER_SM:
            if time.perf_counter() - start > args.time_limit_s:
                break
            with Patched(tiles, per_sm):
                try:
                    problem = check(device, *check_shape)
                except Exception as error:  # a configuration that does not compile or launch is reported
                    problem = f"{type(error).__name__}: {error}"[:300]
                if problem:
                    rows.append({"impl": "rlfuse", "tiles": list(tiles), "programs_per_sm": per_sm, "error": problem})
                    continue
                for m, h, v in shapes:
                    if time.perf_counter() - start > args.time_limit_s:
                        break
                    key = f"{m}x{h}x{v}"
                    # The slices change the forward alone: forward+backward at the default target only.
                    times = time_passes(m, h, v, device, args.repeats, with_backward=per_sm == 2)
                    for name, seconds in times.items():
                        index = ("fwd", "fwd_bwd").index(name)
                        rows.append({"impl": "rlfuse", "tiles": list(tiles), "programs_per_sm": per_sm,
                                     "shape": key, "pass": name, "ms": seconds * 1e3,
                                     "tflops": achieved_tflops(roofline_flops(m, h, v)[index], seconds),
                                     "pct_gemm": 100 * achieved_tflops(roofline_flops(m, h, v)[index], seconds)
                                     / ceilings[key]})
    meta = {"gemm_tflops": ceilings, "dtype": "bfloat16", "tiles_fields": "BLOCK_M, BLOCK_N, BLOCK_K, warps, stages"}
    path = write_results("linear-sweep-smoke" if args.smoke else "linear-sweep", device, rows, meta, args.out_dir)
    print(f"linear sweep on {device_name(device)}")
    print_table(rows, ["impl", "tiles", "programs_per_sm", "shape", "pass", "ms", "pct_gemm", "error"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

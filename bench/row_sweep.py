"""Sweep the logits kernels' launch configurations on a GPU, against the copy bandwidth measured in the same run.

The configurations in :mod:`rlfuse.kernels.launch` are data; this script times alternatives through its
overrides (``RLFUSE_ROW_CONFIG`` for the log-prob kernels, ``RLFUSE_TOKEN_LOSS_CONFIG`` for the fused
token-local loss), each first checked against the PyTorch reference at a small shape (a configuration that
fails is reported, not timed):

- log-probs + entropy forward under ``torch.no_grad()`` (one read of the logits) and forward+backward
  (three passes): rows per program, tile width, warps;
- the fused DAPO loss forward+backward (two passes when its rows in flight fit in L2): the same, with the
  grid capped by the L2 cache (the default) or one program per row.

``python -m bench.row_sweep [--out-dir bench/results] [--time-limit-s 120] [--smoke]``; writes
``row-sweep-<device>.json`` with one row per (kernel, configuration, shape, pass).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import tyro

from bench.common import (achieved_gbs, backend, device_name, environment, measured_copy_bandwidth, median_time_s,
                          print_table, write_results)

SHAPES = [(8192, 128256), (8192, 151936)]
SMOKE_SHAPES = [(8, 300)]
#: None: the launch table's own choice. Otherwise ROWS, BLOCK_V and warps (and max_programs for the loss).
ROW_CONFIGS: List[Optional[Dict[str, int]]] = [
    None,
    {"ROWS": 1, "BLOCK_V": 2048, "num_warps": 4},
    {"ROWS": 1, "BLOCK_V": 8192, "num_warps": 16},
    {"ROWS": 2, "BLOCK_V": 2048, "num_warps": 8},
    {"ROWS": 4, "BLOCK_V": 1024, "num_warps": 8},
    {"ROWS": 8, "BLOCK_V": 256, "num_warps": 8},
]
LOSS_CONFIGS: List[Optional[Dict[str, int]]] = [
    None,
    {"ROWS": 1, "BLOCK_V": 8192, "num_warps": 16, "max_programs": 1 << 30},
    {"ROWS": 1, "BLOCK_V": 8192, "num_warps": 16},
    {"ROWS": 1, "BLOCK_V": 4096, "num_warps": 8, "max_programs": 1 << 30},
]
SMOKE_CONFIGS: List[Optional[Dict[str, int]]] = [None, {"ROWS": 1, "BLOCK_V": 128, "num_warps": 1}]


@dataclass
class Args:
    """Sweep options."""

    out_dir: str = "bench/results"
    """Where the JSON goes."""
    time_limit_s: float = 120.0
    """Stop starting new measurements after this many seconds (the rows so far are written)."""
    repeats: int = 10
    """Timed calls per measurement (the median is reported)."""
    smoke: bool = False
    """A plumbing check on the CPU (Triton's interpreter, tiny shapes): not a speed figure."""


def overridden(name: str, config: Optional[Dict[str, int]]):
    """Set ``RLFUSE_<NAME>`` to ``config`` (``KEY=VALUE,...``) inside the block; None leaves the default."""
    value = None if config is None else ",".join(f"{key}={item}" for key, item in config.items())
    return environment(**{f"RLFUSE_{name.upper()}": value})


def _inputs(n: int, v: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, v, device=device, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    return logits, targets


def _loss(logits, targets):
    from rlfuse.algos import get_config, policy_loss_from_logits

    n = targets.numel()
    old = torch.zeros(1, n, device=logits.device)
    advantages = torch.ones(1, device=logits.device)
    mask = torch.ones(1, n, dtype=torch.bool, device=logits.device)
    return policy_loss_from_logits(logits.view(1, n, -1), targets.view(1, n), old, advantages, mask,
                                   config=get_config("dapo"))[0]


def check(kernel: str, device: torch.device, n: int, v: int) -> Optional[str]:
    """Compare one configuration against the PyTorch path at a small shape; an error message, or None."""
    from rlfuse.kernels import token_logprobs

    logits, targets = _inputs(n, v, device, seed=1)
    got, want = [], []
    for name, sink in (("triton", got), ("torch", want)):
        leaf = logits.detach().clone().requires_grad_(True)
        with backend(name):
            if kernel == "logprobs":
                out = token_logprobs(leaf, targets, return_entropy=True)
                (out.logps.sum() + out.entropy.sum()).backward()
                sink += [out.logps, out.entropy, leaf.grad.float()]
            else:
                loss = _loss(leaf, targets)
                loss.backward()
                sink += [loss, leaf.grad.float()]
    for a, b in zip(got, want):
        error = (a.float() - b.float()).abs().max().item()
        if not error < 2e-2:
            return f"differs from the PyTorch path by {error:.3g}"
    return None


def passes(kernel: str, logits, targets):
    """The timed passes of one kernel: name -> (callable, passes over the logits)."""
    from rlfuse.kernels import token_logprobs

    leaf = logits.detach().requires_grad_(True)

    def logprobs_fwd():
        with torch.no_grad(), backend("triton"):
            token_logprobs(leaf, targets, return_entropy=True)

    def logprobs_fwd_bwd():
        with backend("triton"):
            out = token_logprobs(leaf, targets, return_entropy=True)
            (out.logps.sum() + out.entropy.sum()).backward()
        leaf.grad = None

    def loss_fwd_bwd():
        with backend("triton"):
            _loss(leaf, targets).backward()
        leaf.grad = None

    if kernel == "logprobs":
        return {"fwd": (logprobs_fwd, 1), "fwd_bwd": (logprobs_fwd_bwd, 3)}
    return {"fwd_bwd": (loss_fwd_bwd, 2)}


def main(args: Args) -> None:
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    check_shape = (8, 300) if args.smoke else (64, 3001)
    bandwidth = measured_copy_bandwidth(device)
    start = time.perf_counter()
    rows: List[Dict] = []
    plan = [("logprobs", "row_config", c) for c in (SMOKE_CONFIGS if args.smoke else ROW_CONFIGS)]
    plan += [("token_loss", "token_loss_config", c) for c in (SMOKE_CONFIGS if args.smoke else LOSS_CONFIGS)]
    for kernel, setting, config in plan:
        if time.perf_counter() - start > args.time_limit_s:
            break
        label = "default" if config is None else ",".join(f"{k}={v}" for k, v in config.items())
        with overridden(setting, config):
            try:
                problem = check(kernel, device, *check_shape)
            except Exception as error:  # a configuration that does not compile or launch is reported
                problem = f"{type(error).__name__}: {error}"[:300]
            if problem:
                rows.append({"kernel": kernel, "config": label, "error": problem})
                continue
            for n, v in shapes:
                logits, targets = _inputs(n, v, device)
                for pass_name, (fn, count) in passes(kernel, logits, targets).items():
                    if time.perf_counter() - start > args.time_limit_s:
                        break
                    seconds = median_time_s(fn, device, warmup=2, repeats=args.repeats)
                    num_bytes = count * n * v * logits.element_size()
                    rows.append({"kernel": kernel, "config": label, "n_tokens": n, "vocab": v, "pass": pass_name,
                                 "passes": count, "ms": seconds * 1e3, "gbs": achieved_gbs(num_bytes, seconds),
                                 "pct_copy_bw": 100 * achieved_gbs(num_bytes, seconds) / bandwidth})
    meta = {"copy_bandwidth_gbs": bandwidth, "dtype": "bfloat16",
            "bytes": "passes x N x V x 2: the logits read (and d(logits) written) as each pass moves them"}
    path = write_results("row-sweep-smoke" if args.smoke else "row-sweep", device, rows, meta, args.out_dir,
                         smoke=args.smoke)
    print(f"row sweep on {device_name(device)}; copy bandwidth {bandwidth:.1f} GB/s")
    print_table(rows, ["kernel", "config", "n_tokens", "vocab", "pass", "ms", "pct_copy_bw", "error"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

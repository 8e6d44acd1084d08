"""Benchmark ``token_logprobs`` (log-prob + entropy): forward (under ``torch.no_grad()``, as the old-policy
and reference passes run) and forward+backward, against its peers.

Per shape: median time; the bytes each implementation moves (:func:`work`: rlfuse's by its design, one
read forward and one read and one write backward; torch eager's and TRL's as their aten ops move them;
torch.compile's the fewest any implementation must move, a lower bound), achieved GB/s and its share of
the copy bandwidth measured in the same run, and peak memory. Peers, where installed: torch eager (the
reference), torch.compile of it, TRL's ``selective_log_softmax`` + ``entropy_from_logits``, and QuACK's
cross entropy (a logits-row kernel; loss only, no entropy).
``python -m bench.logprobs [--full]``; without a GPU it runs a smoke shape through Triton's interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import tyro

from bench.common import backend, bench_impls, pick_device, report
from bench.work import Work, pass_work
from rlfuse.kernels import token_logprobs, token_logprobs_reference

FULL_SHAPES = [(n, v) for n in (8192, 32768) for v in (32000, 128256, 151936, 262144)]
SMOKE_SHAPES = [(64, 4096)]
IMPLEMENTATIONS = ("rlfuse-triton", "torch-eager", "torch-compile", "trl", "quack-cross-entropy")
"""Every name :func:`implementations` can return; the peers only on a GPU, where installed."""


@dataclass
class Args:
    """Benchmark options."""

    full: bool = False
    """The full shapes (N = 8192, 32768 tokens x V = 32000 ... 262144) instead of the smoke shape."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def implementations(device: torch.device):
    """name -> f(logits, targets) returning (logps, entropy); peers that are not installed are left out."""
    def rlfuse(x, y):
        with backend("triton"):
            return tuple(token_logprobs(x, y, return_entropy=True)[:2])

    impls = {
        "rlfuse-triton": rlfuse,
        "torch-eager": lambda x, y: tuple(token_logprobs_reference(x, y, return_entropy=True)[:2]),
    }
    if device.type == "cuda":
        compiled = torch.compile(token_logprobs_reference)
        impls["torch-compile"] = lambda x, y: tuple(compiled(x, y, return_entropy=True)[:2])
        try:
            from trl.trainer.utils import entropy_from_logits, selective_log_softmax

            impls["trl"] = lambda x, y: (selective_log_softmax(x, y), entropy_from_logits(x))
        except ImportError:
            pass
        try:
            from quack.cross_entropy import cross_entropy

            impls["quack-cross-entropy"] = lambda x, y: (cross_entropy(x, y, reduction="none"),)
        except ImportError:
            pass
    return impls


def roofline_bytes(n: int, v: int, element_size: int):
    """The fewest bytes ``(forward, forward+backward)`` for N tokens x V logits of ``element_size`` bytes.

    Forward reads the logits and int64 targets once and writes two fp32 values per token; backward reads
    the logits and two fp32 upstream gradients per token once more and writes d(logits).
    """
    fwd = n * v * element_size + n * 8 + 2 * n * 4
    return fwd, fwd + 2 * n * v * element_size + 2 * n * 4


def work(impl: str, pass_name: str, n: int, v: int, element_size: int, fn=None) -> Work:
    """The bytes ``impl`` moves in one pass (``fwd`` or ``fwd_bwd``) at N tokens x V logits."""
    index = ("fwd", "fwd_bwd").index(pass_name)
    floor = roofline_bytes(n, v, element_size)[index]
    if impl == "rlfuse-triton":  # + the two row statistics kept for the backward
        return Work(0, floor + 8 * n, "formula", "one read forward; one read and one write of d(logits) backward")
    if impl == "quack-cross-entropy":
        return Work(0, floor, "formula", "loss only: one read forward, one read and one write backward")
    if impl in ("torch-eager", "trl") and fn is not None:
        rows = 4
        logits, targets, _ = make_inputs(rows, v, torch.device("cpu"))
        return pass_work(fn, (logits, targets), 0, pass_name, rows, n)
    return Work(0, floor, "lower bound")


def make_inputs(n: int, v: int, device: torch.device):
    """Seeded ``(logits (N, V) bf16, targets (N,) int64, weights (N,) fp32)``; weights drive the backward."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, v, device=device, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    weights = torch.randn(n, device=device, generator=gen)
    return logits, targets, weights


def main(args: Args) -> None:
    """Run every implementation on every shape; write ``bench/results/logprobs-<device>.json``."""
    device = pick_device(args.device)
    shapes = FULL_SHAPES if args.full and device.type == "cuda" else SMOKE_SHAPES
    rows = []
    for n, v in shapes:
        logits, targets, weights = make_inputs(n, v, device)
        for name, fn in implementations(device).items():
            works = {p: work(name, p, n, v, logits.element_size(), fn) for p in ("fwd", "fwd_bwd")}
            rows.append(bench_impls(name, fn, logits, targets, weights, device, works,
                                    {"n_tokens": n, "vocab": v, "dtype": "bfloat16"}))
    report("logprobs", device, rows, args.out_dir)


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Benchmark the fused policy loss from logits (``policy_loss_from_logits``), forward and forward+backward.

Per shape: median time, the fewest bytes (forward: read the logits once; forward+backward: read them
once and write d(logits) once), achieved GB/s and its share of the copy bandwidth measured in the same
run, and peak memory. Peers, where installed: torch eager (the reference composition), torch.compile of
it, and Liger-Kernel's Triton GRPO loss. ``python -m bench.policy_loss [--full] [--algo dapo]``.
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
from rlfuse.algos import get_config, policy_loss_from_logits

FULL_SHAPES = [(b, 1024, v) for b in (8, 32) for v in (32000, 128256, 151936, 262144)]
SMOKE_SHAPES = [(4, 16, 4096)]
IMPLEMENTATIONS = ("rlfuse-triton", "torch-eager", "torch-compile", "liger-triton-grpo")
"""Every name :func:`implementations` can return; the peers only on a GPU, where installed."""


@dataclass
class Args:
    """Benchmark options."""

    algo: str = "dapo"
    """Which algorithm's loss (its default config)."""
    full: bool = False
    """The full shapes (B x 1024 tokens, B = 8, 32, x V = 32000 ... 262144) instead of the smoke shape."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def implementations(device, config, old_logps, advantages, mask):
    """name -> f(logits, targets) returning (loss,); peers that are not installed are left out."""

    def rlfuse_loss(name):
        def run(logits, targets):
            with backend(name):
                return (policy_loss_from_logits(logits, targets, old_logps, advantages, mask, config=config)[0],)
        return run

    impls = {"rlfuse-triton": rlfuse_loss("triton"), "torch-eager": rlfuse_loss("torch")}
    if device.type == "cuda":
        impls["torch-compile"] = torch.compile(rlfuse_loss("torch"))
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            def liger(logits, targets):  # Liger expects (B, T + 1, V) and drops the last position itself
                padded = torch.cat([logits, logits[:, -1:]], dim=1)
                out = triton_grpo_loss(padded, old_logps, None, targets, advantages, mask.int(), temperature=1.0,
                                       beta=0.0, eps_low=config.epsilon_low, eps_high=config.epsilon_high)
                return (out[0] if isinstance(out, tuple) else out,)

            impls["liger-triton-grpo"] = liger
        except ImportError:
            pass
    return impls


def roofline_bytes(b: int, t: int, v: int, element_size: int):
    """The fewest bytes ``(forward, forward+backward)`` for B x T tokens x V logits of ``element_size`` bytes.

    Forward reads the logits once plus, per token, the int64 target, the fp32 old log-prob and the bool
    mask; forward+backward reads the logits once and writes d(logits) once, with the same per-token reads.
    """
    n = b * t
    small = n * (8 + 4 + 1)
    return n * v * element_size + small, 2 * n * v * element_size + small


def make_inputs(b: int, t: int, v: int, device: torch.device):
    """Seeded ``(logits (B, T, V) bf16, targets (B, T) int64, old_logps (B, T), advantages (B,), mask (B, T) bool)``."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(b, t, v, device=device, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, v, (b, t), device=device, generator=gen)
    old_logps = -torch.rand(b, t, device=device, generator=gen) * 5
    advantages = torch.randn(b, device=device, generator=gen)
    mask = torch.rand(b, t, device=device, generator=gen) > 0.1
    return logits, targets, old_logps, advantages, mask


def main(args: Args) -> None:
    """Run every implementation on every shape; write ``bench/results/policy_loss-<device>.json``."""
    device = pick_device(args.device)
    config = get_config(args.algo)
    shapes = FULL_SHAPES if args.full and device.type == "cuda" else SMOKE_SHAPES
    rows = []
    for b, t, v in shapes:
        logits, targets, old_logps, advantages, mask = make_inputs(b, t, v, device)
        fwd_bytes, fwd_bwd_bytes = roofline_bytes(b, t, v, logits.element_size())
        for name, fn in implementations(device, config, old_logps, advantages, mask).items():
            rows.append(bench_impls(name, fn, logits, targets, advantages, device, fwd_bytes, fwd_bwd_bytes,
                                    {"algo": args.algo, "n_tokens": b * t, "vocab": v, "dtype": "bfloat16"}))
    report("policy_loss", device, rows, args.out_dir)


if __name__ == "__main__":
    main(tyro.cli(Args))

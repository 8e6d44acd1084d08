"""Benchmark the fused policy loss from logits (``policy_loss_from_logits``), forward and forward+backward.

Per shape: median time; the bytes each implementation moves (:func:`work`: rlfuse's token-local kernel
one read forward, one read and one write of d(logits) forward+backward, its second sweep of a row served by
L2; Liger-Kernel's two kernels one read forward and a read and a read and a write with the backward; torch
eager's as its aten ops move them; torch.compile's the fewest, a lower bound), achieved GB/s and its share
of the copy bandwidth measured in the same run, and peak memory. The forward runs under
``torch.no_grad()``. Peers, where installed: torch eager (the reference composition), torch.compile of it,
and Liger-Kernel's Triton GRPO loss, which reads (B, T + 1, V) logits and drops the last position itself:
every implementation gets the same (B, T + 1, V) buffer, rlfuse and torch its ``[:, :-1]`` view.
``python -m bench.policy_loss [--full] [--algo dapo]``.
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
from rlfuse.algos import get_config, policy_loss_from_logits
from rlfuse.algos.fused import passes_over_logits

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
    """name -> f(logits (B, T + 1, V), targets (B, T)) returning (loss,); missing peers are left out."""

    def rlfuse_loss(name):
        def run(logits, targets):
            with backend(name):
                return (policy_loss_from_logits(logits[:, :-1], targets, old_logps, advantages, mask,
                                                config=config)[0],)
        return run

    impls = {"rlfuse-triton": rlfuse_loss("triton"), "torch-eager": rlfuse_loss("torch")}
    if device.type == "cuda":
        impls["torch-compile"] = torch.compile(rlfuse_loss("torch"))
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            def liger(logits, targets):
                out = triton_grpo_loss(logits, old_logps, None, targets, advantages, mask.int(), temperature=1.0,
                                       beta=0.0, eps_low=config.epsilon_low, eps_high=config.epsilon_high,
                                       inplace=False)
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


def work(impl: str, pass_name: str, b: int, t: int, v: int, element_size: int, fn=None, config=None) -> Work:
    """The bytes ``impl`` moves in one pass (``fwd`` or ``fwd_bwd``)."""
    index = ("fwd", "fwd_bwd").index(pass_name)
    floor = roofline_bytes(b, t, v, element_size)[index]
    logits = b * t * v * element_size
    if impl == "rlfuse-triton":
        if index and config is not None and passes_over_logits(config) == 3:  # statistics, then a d(logits) kernel
            return Work(0, floor + logits, "formula", "one read; one read and one write of d(logits)")
        note = "second sweep of each row from L2 (rows in flight capped)" if index else "one read, no d(logits)"
        return Work(0, floor, "formula", note)
    if impl == "liger-triton-grpo":
        return Work(0, floor + (logits if index else 0), "formula",
                    "forward kernel reads the logits; backward kernel reads them and writes d(logits)")
    if impl == "torch-eager" and fn is not None:
        small_b, small_t = 1, 4
        logits_small, targets, old, adv, mask = make_inputs(small_b, small_t, v, torch.device("cpu"))
        small = implementations(torch.device("cpu"), config, old, adv, mask)["torch-eager"]
        return pass_work(small, (logits_small, targets), 0, pass_name, small_b * small_t, b * t)
    return Work(0, floor, "lower bound")


def make_inputs(b: int, t: int, v: int, device: torch.device):
    """Seeded ``(logits (B, T + 1, V) bf16, targets (B, T) int64, old_logps (B, T), advantages (B,),
    mask (B, T) bool)``; the logits' last position predicts nothing."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(b, t + 1, v, device=device, generator=gen) * 4).to(torch.bfloat16)
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
        for name, fn in implementations(device, config, old_logps, advantages, mask).items():
            works = {p: work(name, p, b, t, v, logits.element_size(), fn, config) for p in ("fwd", "fwd_bwd")}
            rows.append(bench_impls(name, fn, logits, targets, advantages, device, works,
                                    {"algo": args.algo, "n_tokens": b * t, "vocab": v, "dtype": "bfloat16"}))
    report("policy_loss", device, rows, args.out_dir)


if __name__ == "__main__":
    main(tyro.cli(Args))

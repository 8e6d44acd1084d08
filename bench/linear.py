"""Benchmark log-probs from hidden states and the LM head (``linear_token_logprobs``), forward (under
``torch.no_grad()``, as the old-policy and reference passes run) and forward+backward, against the peers
that are installed.

Each implementation is charged the work it does (:func:`work`, ``bench.work``): rlfuse's two paths and Cut
Cross-Entropy recompute the logits in the backward (8·M·H·V FLOPs), the materialized path does 6·M·H·V and
moves the (M, V) logits six times, Liger-Kernel forms gradients in its forward (6·M·H·V in either pass).
Its percentage is of the time that work takes at a bare GEMM's rate (same shape) and the copy bandwidth,
both measured in the same run. Peak memory is above inputs and gradients. Peers: materialized logits plus
rlfuse's logits kernel, torch.compile of it, Liger-Kernel's ``LigerFusedLinearGRPOLoss`` and
``LigerFusedLinearCrossEntropyLoss``, Cut Cross-Entropy exact (``filter_eps=None``) and filtered (its
default, which skips gradient blocks: approximate, FLOPs not counted); the cross-entropy peers compute no
entropy.

``python -m bench.linear [--full]``. Without a GPU it runs a smoke shape through Triton's interpreter and
the memory check (``--memory-check``): N = 4096 tokens, V = 131072 must stay far below the 2 GiB that
fp32 logits would take.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import tyro

from bench.common import (achieved_tflops, backend, device_name, environment, measured_copy_bandwidth, median_time_s,
                          peak_memory_bytes, print_table, sync, write_results)
from bench.work import Work
from rlfuse.kernels import linear_token_logprobs, token_logprobs

FULL_SHAPES = [(m, h, v) for m in (8192, 32768) for h in (896, 2048, 4096) for v in (32000, 128256, 151936)]
SMOKE_SHAPES = [(64, 64, 1000)]
IMPLEMENTATIONS = ("rlfuse-linear-hybrid", "rlfuse-fused-linear-triton", "rlfuse-fused-linear-torch-chunked",
                   "materialized+rlfuse-logits", "torch-compile", "liger-fused-linear-grpo", "liger-fused-linear-ce",
                   "cce-exact", "cce-filtered")
"""Every name :func:`implementations` can return; the last five only on a GPU, where installed."""


@dataclass
class Args:
    """Benchmark options."""

    full: bool = False
    """The full shapes (M = 8192, 32768 x H = 896 ... 4096 x V = 32000 ... 151936) instead of the smoke one."""
    memory_check: bool = False
    """Only the CPU memory check (N = 4096, V = 131072), printed as JSON."""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)."""
    out_dir: str = "bench/results"
    """Where the JSON goes."""


def implementations(device: torch.device):
    """name -> f(hidden, weight, targets) returning a tuple of outputs; missing peers are left out."""
    def rlfuse_path(backend_name, impl=None):
        def run(h, w, y):
            with backend(backend_name), linear_impl(impl):
                return tuple(linear_token_logprobs(h, w, y, return_entropy=True)[:2])
        return run

    impls = {
        "rlfuse-linear-hybrid": rlfuse_path("triton", "hybrid"),
        "rlfuse-fused-linear-triton": rlfuse_path("triton", "fused"),
        "rlfuse-fused-linear-torch-chunked": rlfuse_path("torch"),
        "materialized+rlfuse-logits": lambda h, w, y: tuple(token_logprobs(h @ w.T, y, return_entropy=True)[:2]),
    }
    if device.type != "cuda":
        return impls
    reference = torch.compile(lambda h, w, y: tuple(token_logprobs(h @ w.T, y, return_entropy=True)[:2]))
    impls["torch-compile"] = reference
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
        liger_ce = LigerFusedLinearCrossEntropyLoss()

        def liger_loss(h, w, y):
            mask = torch.ones_like(y)
            return (liger(h.view(1, *h.shape), w, y.view(1, -1), mask.view(1, -1), torch.ones(1, device=h.device))[0],)

        impls["liger-fused-linear-grpo"] = liger_loss
        impls["liger-fused-linear-ce"] = lambda h, w, y: (liger_ce(w, h, y),)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cce-exact"] = lambda h, w, y: (linear_cross_entropy(h, w, y, filter_eps=None),)
        impls["cce-filtered"] = lambda h, w, y: (linear_cross_entropy(h, w, y),)
    except ImportError:
        pass
    return impls


def linear_impl(name: Optional[str]):
    """Force ``RLFUSE_LINEAR_IMPL`` (``hybrid`` or ``fused``) for the duration of a call; None leaves it."""
    return environment(RLFUSE_LINEAR_IMPL=name)


def gemm_tflops(m: int, h: int, v: int, device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a bare (M, H) @ (H, V) matmul: the rate the matrix products are judged by."""
    a = torch.randn(m, h, device=device, dtype=dtype)
    b = torch.randn(h, v, device=device, dtype=dtype)
    return achieved_tflops(2 * m * h * v, median_time_s(lambda: a @ b, device))


def roofline_flops(m: int, h: int, v: int):
    """FLOPs ``(forward, forward+backward)`` of the log-probs with the backward recomputing the logits:
    2·M·H·V and 8·M·H·V (what rlfuse's paths do)."""
    return 2 * m * h * v, 8 * m * h * v


def roofline_bytes(m: int, h: int, v: int, element_size: int):
    """The fewest bytes ``(forward, forward+backward)`` when the (M, V) logits never reach memory.

    Forward reads hidden (M, H), weight (V, H) and int64 targets once and writes two fp32 values per
    token; backward reads the same plus two fp32 upstream gradients per token and writes d(hidden), d(weight).
    """
    inputs = (m * h + v * h) * element_size
    fwd = inputs + m * 8 + m * 8
    return fwd, fwd + 2 * inputs + m * 8 + m * 8


def work(impl: str, pass_name: str, m: int, h: int, v: int, dtype: torch.dtype, device: torch.device) -> Work:
    """The FLOPs and bytes ``impl`` performs in one pass (``fwd`` or ``fwd_bwd``), by its design."""
    from rlfuse.kernels import launch
    from rlfuse.kernels.linear_hybrid import traffic_bytes

    s = torch.finfo(dtype).bits // 8
    gemm, logits = 2 * m * h * v, m * v * s
    index = ("fwd", "fwd_bwd").index(pass_name)
    floor = roofline_bytes(m, h, v, s)[index]
    backward = pass_name == "fwd_bwd"
    if impl == "rlfuse-linear-hybrid":
        return Work(gemm * (4 if backward else 1),
                    traffic_bytes(m, h, v, dtype, launch.target_of(device), backward=backward), "formula",
                    "fp32 logits chunks and the d(hidden) accumulator counted in memory (no L2 reuse)")
    if impl in ("rlfuse-fused-linear-triton", "cce-exact"):
        extra = 3 * logits if backward and impl.startswith("rlfuse") else 0  # d(logits) chunks: 1 write, 2 reads
        return Work(gemm * (4 if backward else 1), floor + extra, "formula",
                    "logits recomputed in the backward; tiles re-read through L2 not counted")
    if impl == "cce-filtered":
        return Work(None if backward else gemm, floor, "formula", "skips gradient blocks: FLOPs depend on the data")
    if impl in ("materialized+rlfuse-logits", "torch-compile"):
        return Work(gemm * (3 if backward else 1), floor + (6 if backward else 2) * logits, "formula",
                    "cuBLAS logits: written, read; backward: read, d(logits) written, read by two GEMMs")
    if impl.startswith("liger"):
        return Work(3 * gemm, floor + 4 * m * v * 4, "formula",
                    "gradients formed in the forward per token chunk, even under no_grad; fp32 logits chunks")
    return Work(gemm * (4 if backward else 1), floor, "lower bound")


def make_inputs(m: int, h: int, v: int, device: torch.device, dtype: torch.dtype):
    """Seeded leaves ``(hidden (M, H), weight (V, H))`` in ``dtype`` needing grad, and ``targets (M,)`` int64."""
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(m, h, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) / h ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (m,), device=device, generator=gen)
    return hidden, weight, targets


def linear_passes(fn, hidden, weight, targets, device):
    """The two timed passes of ``fn(hidden, weight, targets)``: ``{"fwd": ..., "fwd_bwd": ...}``.

    ``fwd`` runs under ``no_grad``; ``fwd_bwd`` backpropagates the sum of the outputs and drops the
    gradients. Both wait for the device.
    """
    def forward():
        with torch.no_grad():
            out = fn(hidden, weight, targets)
        sync(device)
        return out

    def forward_backward():
        sum(out.float().sum() for out in fn(hidden, weight, targets)).backward()
        hidden.grad = weight.grad = None
        sync(device)

    return {"fwd": forward, "fwd_bwd": forward_backward}


def bench_shape(name, fn, m, h, v, device, dtype, ceiling) -> dict:
    """One implementation at one shape: a result row (an error is recorded, not raised)."""
    hidden, weight, targets = make_inputs(m, h, v, device, dtype)
    passes = linear_passes(fn, hidden, weight, targets, device)
    row = {"impl": name, "m_tokens": m, "hidden": h, "vocab": v, "dtype": str(dtype).replace("torch.", "")}
    try:
        t_fwd, t_fb = median_time_s(passes["fwd"], device), median_time_s(passes["fwd_bwd"], device)
    except Exception as error:  # a peer that cannot run this shape is reported, not fatal
        row["error"] = f"{type(error).__name__}: {error}"[:300]
        return row
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    row.update({"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                "peak_extra_mem_bytes": peak_memory_bytes(passes["fwd_bwd"], device) - grads_bytes
                if device.type == "cuda" else -1})
    bandwidth = measured_copy_bandwidth(device)
    for pass_name, seconds in (("fwd", t_fwd), ("fwd_bwd", t_fb)):
        done = work(name, pass_name, m, h, v, dtype, device)
        fields = done.fields(seconds, bandwidth, ceiling)
        row.update({f"{pass_name}_flops": done.flops, f"{pass_name}_bytes": done.bytes,
                    f"{pass_name}_tflops": achieved_tflops(done.flops, seconds) if done.flops else None,
                    f"{pass_name}_pct_roofline": fields["pct_of_roofline"], f"{pass_name}_work_source": done.source})
    return row


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_check(n: int = 4096, h: int = 64, v: int = 131072) -> dict:
    """Forward+backward on the CPU path; peak resident memory beyond inputs and gradients, against fp32 logits.

    A thread samples the resident set every half millisecond. Run it with ``MALLOC_MMAP_THRESHOLD_=65536``
    (as the tests do) so that freed buffers go back to the system and the resident set tracks live memory.
    """
    hidden = torch.randn(n, h).requires_grad_(True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    grads_bytes = (hidden.numel() + weight.numel()) * 4
    base, peak, done = _resident_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = linear_token_logprobs(hidden, weight, targets, return_entropy=True)
    (out.logps.sum() + out.entropy.sum()).backward()
    done.set()
    watcher.join()
    return {"n_tokens": n, "hidden": h, "vocab": v, "fp32_logits_bytes": n * v * 4,
            "peak_extra_bytes": max(peak[0], _resident_bytes()) - base - grads_bytes,
            "inputs_and_grads_bytes": 2 * grads_bytes}


def main(args: Args) -> None:
    """Run the benchmark (or only the memory check) and write ``bench/results/linear-<device>.json``."""
    if args.memory_check:
        print(json.dumps(memory_check()))
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = FULL_SHAPES if args.full and device.type == "cuda" else SMOKE_SHAPES
    rows, ceilings = [], {}
    for m, h, v in shapes:
        ceilings[f"{m}x{h}x{v}"] = ceiling = gemm_tflops(m, h, v, device, dtype)
        for name, fn in implementations(device).items():
            rows.append(bench_shape(name, fn, m, h, v, device, dtype, ceiling))
    extra = {"gemm_tflops": ceilings}
    if device.type == "cpu":
        extra["memory_check"] = memory_check()
    path = write_results("linear", device, rows, extra, args.out_dir)
    print(f"linear on {device_name(device)}" + ("" if device.type == "cuda" else
          " (CPU smoke run through the Triton interpreter: not a speed figure)"))
    print_table(rows, ["impl", "m_tokens", "hidden", "vocab", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops",
                       "fwd_bwd_pct_roofline", "peak_extra_mem_bytes", "error"])
    if "memory_check" in extra:
        check = extra["memory_check"]
        print(f"memory check: {check['peak_extra_bytes'] / 2**20:.0f} MiB extra vs "
              f"{check['fp32_logits_bytes'] / 2**20:.0f} MiB of fp32 logits")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args))

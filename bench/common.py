"""Shared benchmark helpers: median timing, the device's measured copy bandwidth, peak memory, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device`` (the GPU model, or the CPU architecture)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls; CUDA is timed with events."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, num_bytes: int) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * src.numel() * 4 / seconds / 1e9


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak allocated device memory during ``fn()`` above what was allocated before (CUDA only; -1 on CPU)."""
    if device.type != "cuda":
        fn()
        return -1
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def write_results(name: str, device: torch.device, rows: List[Dict], extra: Dict, out_dir: str,
                  smoke: Optional[bool] = None) -> Path:
    """Write ``{benchmark, device, smoke, date, torch, rows, ...extra}`` to ``out_dir/<name>-<device>.json``.

    ``smoke`` (default: not on CUDA) marks figures that only check that the code runs, such as kernels
    through Triton's CPU interpreter.
    """
    payload = {
        "benchmark": name,
        "device": device_name(device),
        "smoke": device.type != "cuda" if smoke is None else smoke,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **extra,
        "rows": rows,
    }
    path = Path(out_dir) / f"{name}-{device_name(device).replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: List[Dict], columns: List[str]) -> None:
    """Print ``rows`` as an aligned text table of ``columns``."""
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


_COPY_BANDWIDTH: Dict[str, float] = {}


def pick_device(name) -> torch.device:
    """``name`` as a device, or cuda when available, else cpu."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def measured_copy_bandwidth(device: torch.device) -> float:
    """The device's copy bandwidth in GB/s, measured once per run (1 GiB on a GPU, 64 MiB on a CPU)."""
    key = str(device)
    if key not in _COPY_BANDWIDTH:
        _COPY_BANDWIDTH[key] = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    return _COPY_BANDWIDTH[key]


def achieved_gbs(num_bytes: int, seconds: float) -> float:
    """Achieved bandwidth in GB/s: ``num_bytes`` moved in ``seconds``."""
    return num_bytes / seconds / 1e9


def achieved_tflops(flops: int, seconds: float) -> float:
    """Achieved throughput in TFLOP/s: ``flops`` done in ``seconds``."""
    return flops / seconds / 1e12


def logits_passes(fn, logits, targets, weights, device) -> Dict[str, Callable[[], object]]:
    """The two timed passes of ``fn(logits, targets) -> tuple of outputs``: ``{"fwd": ..., "fwd_bwd": ...}``.

    ``fwd`` runs under ``no_grad``; ``fwd_bwd`` drives the backward with ``weights`` on outputs of its
    shape and ones on the others (a scalar loss), then drops the gradient. Both wait for the device.
    """
    leaf = logits.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            out = fn(leaf, targets)
        sync(device)
        return out

    def forward_backward():
        outs = fn(leaf, targets)
        grads = [weights.to(o.dtype) if o.shape == weights.shape else torch.ones_like(o) for o in outs]
        torch.autograd.backward(list(outs), grads)
        leaf.grad = None
        sync(device)

    return {"fwd": forward, "fwd_bwd": forward_backward}


def bench_impls(name, fn, logits, targets, weights, device, works, fields, repeats=5) -> Dict:
    """Time ``fn(logits, targets) -> tuple of outputs`` forward and forward+backward; one result row.

    The passes are those of :func:`logits_passes`. ``works`` maps ``fwd``/``fwd_bwd`` to the
    :class:`bench.work.Work` the implementation does in that pass: its bytes over the time give the
    achieved GB/s, and its roofline (those bytes at the copy bandwidth measured in the same run) over the
    time the percentage. A failure is recorded in the row, not raised.
    """
    bandwidth = measured_copy_bandwidth(device)
    passes = logits_passes(fn, logits, targets, weights, device)
    row = {"impl": name, **fields}
    try:
        times = {pass_name: median_time_s(passes[pass_name], device, repeats=repeats) for pass_name in passes}
    except Exception as error:  # a peer that cannot run this shape is reported, not fatal
        row["error"] = f"{type(error).__name__}: {error}"[:300]
        return row
    for pass_name, seconds in times.items():
        done = works[pass_name]
        row.update({f"{pass_name}_ms": seconds * 1e3, f"{pass_name}_bytes": done.bytes,
                    f"{pass_name}_gbs": achieved_gbs(done.bytes, seconds),
                    f"{pass_name}_pct_roofline": done.fields(seconds, bandwidth)["pct_of_roofline"],
                    f"{pass_name}_work_source": done.source})
    row["peak_mem_bytes"] = peak_memory_bytes(passes["fwd_bwd"], device)
    return row


def report(name: str, device: torch.device, rows: List[Dict], out_dir: str) -> Path:
    """Write the JSON (with the measured copy bandwidth) and print the table."""
    bandwidth = measured_copy_bandwidth(device)
    path = write_results(name, device, rows, {"copy_bandwidth_gbs": bandwidth}, out_dir)
    print(f"{name} on {device_name(device)}; copy bandwidth {bandwidth:.1f} GB/s"
          + ("" if device.type == "cuda" else " (CPU smoke run through the Triton interpreter: not a speed figure)"))
    print_table(rows, ["impl", "n_tokens", "vocab", "fwd_ms", "fwd_bwd_ms", "fwd_pct_roofline",
                       "fwd_bwd_pct_roofline", "peak_mem_bytes", "error"])
    print(f"wrote {path}")
    return path


@contextlib.contextmanager
def environment(**variables: Optional[str]):
    """Set environment variables for the duration of a call (None leaves one as it is), then restore them."""
    previous = {name: os.environ.get(name) for name in variables}
    for name, value in variables.items():
        if value is not None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def backend(name: str):
    """Force ``RLFUSE_BACKEND`` (``triton`` or ``torch``) for the duration of a call."""
    return environment(RLFUSE_BACKEND=name)

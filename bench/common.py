"""Shared benchmark helpers: median timing, the device's measured copy bandwidth, peak memory, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

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


def write_results(name: str, device: torch.device, rows: List[Dict], extra: Dict, out_dir: str) -> Path:
    """Write ``{benchmark, device, date, torch, rows, ...extra}`` to ``out_dir/<name>-<device>.json``."""
    payload = {
        "benchmark": name,
        "device": device_name(device),
        "smoke": device.type != "cuda",
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

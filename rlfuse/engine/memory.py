"""Peak memory of a training step: CUDA's allocator peak on a GPU, the process's peak resident set on the CPU."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Optional

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's peak statistics, or on Linux the process's resident-set high-water
    mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``). Elsewhere the CPU peak is the process's
    lifetime peak and this does nothing."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or a kernel or sandbox that refuses it: the lifetime peak is reported
        pass


def _hwm_bytes() -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GiB since :func:`reset_peak_memory`: bytes allocated by CUDA tensors on a GPU; the
    resident set (all of the process's memory in RAM, tensors or not) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = _hwm_bytes()
    if peak is None:  # getrusage's ru_maxrss: kB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024
    return peak / 2**30

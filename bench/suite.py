"""The pytest-benchmark side of the benchmarks: time one pass of one implementation with the ``benchmark``
fixture and record the roofline (bytes, FLOPs, % of the measured device ceiling) in ``benchmark.extra_info``.

``bench/conftest.py`` builds one :class:`SuiteRun` per session; ``bench/test_*.py`` call :func:`time_pass`.
The work each implementation does lives beside each benchmark (``work`` in ``bench.logprobs``,
``bench.policy_loss``, ``bench.linear``; ``bench.work`` for the counting) and is shared with the
``python -m bench.X`` scripts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

from bench.common import achieved_gbs, achieved_tflops, device_name, measured_copy_bandwidth, peak_memory_bytes
from bench.work import Work

SMOKE_ROUNDS = (3, 1)
"""(timed rounds, warm-up rounds) at the smoke size: the Triton interpreter takes about a second a call."""
FULL_ROUNDS = (10, 3)
"""(timed rounds, warm-up rounds) at the full size."""


@dataclass(frozen=True)
class SuiteRun:
    """What one ``pytest bench/`` session runs on.

    Attributes:
        device: where the tensors live (cuda when available, else cpu).
        full: ``--full`` was given: the full shapes (kernels need a GPU) and the real SmolLM2 rollout.
    """

    device: torch.device
    full: bool

    @property
    def smoke(self) -> bool:
        """True for the small default shapes (on a CPU they run through Triton's interpreter)."""
        return not self.full

    @property
    def rounds(self) -> int:
        """Timed rounds per benchmark; the median is the reported time."""
        return (FULL_ROUNDS if self.full else SMOKE_ROUNDS)[0]

    @property
    def warmup_rounds(self) -> int:
        """Untimed calls before the timed rounds (Triton compilation, torch.compile, caches)."""
        return (FULL_ROUNDS if self.full else SMOKE_ROUNDS)[1]

    def require_kernel_shapes(self) -> None:
        """Skip a kernel benchmark at ``--full`` without a GPU (the interpreter would take hours)."""
        if self.full and self.device.type != "cuda":
            pytest.skip("--full kernel shapes need a GPU (without --full the suite runs the smoke shapes)")


def results_file_name(device: torch.device, full: bool) -> str:
    """``suite-<device>-<smoke|full>.json``: the file the suite writes under ``bench/results/``."""
    return f"suite-{device_name(device).replace(' ', '_')}-{'full' if full else 'smoke'}.json"


def shape_id(shape) -> str:
    """A test id for a shape tuple, e.g. ``64x4096``."""
    return "x".join(str(dim) for dim in shape)


@functools.lru_cache(maxsize=None)
def gemm_ceiling_tflops(m: int, h: int, v: int, device: str, dtype: torch.dtype) -> float:
    """A bare (M, H) @ (H, V) matmul's measured TFLOP/s, measured once per shape and session."""
    from bench.linear import gemm_tflops

    return gemm_tflops(m, h, v, torch.device(device), dtype)


def roofline_fields(seconds: float, work: Work, copy_bandwidth_gbs: float,
                    gemm_tflops: Optional[float] = None) -> Dict:
    """The roofline of one timed pass, judged by the work its implementation does (``bench.work``).

    Args:
        seconds: the median time of the pass.
        work: the FLOPs and bytes the implementation performs in the pass, and how they were counted.
        copy_bandwidth_gbs: the device's copy bandwidth measured in the same run, GB/s.
        gemm_tflops: a bare GEMM's TFLOP/s on the same shape, for the matrix products' share.

    Returns:
        ``seconds``, ``bytes``, ``flops``, ``achieved_gbs``, ``achieved_tflops`` (None without FLOPs),
        ``copy_bandwidth_gbs``, ``gemm_tflops``, ``work_source``, ``work_note``, ``roofline_s`` (the time the
        work takes at those ceilings), ``ceiling`` (``roofline of its own work``) and ``pct_of_ceiling`` (that
        time over the measured one; None when the FLOPs are unknown).
    """
    fields = work.fields(seconds, copy_bandwidth_gbs, gemm_tflops)
    fields["pct_of_ceiling"] = fields.pop("pct_of_roofline")
    return {"seconds": seconds, "bytes": work.bytes, "flops": work.flops or None,
            "achieved_gbs": achieved_gbs(work.bytes, seconds),
            "achieved_tflops": achieved_tflops(work.flops, seconds) if work.flops else None,
            "copy_bandwidth_gbs": copy_bandwidth_gbs, "gemm_tflops": gemm_tflops,
            "ceiling": "roofline of its own work", **fields}


def time_pass(benchmark, fn: Callable[[], object], run: SuiteRun, *, name: str, impl: str, pass_name: str,
              shape: Dict, setup: Optional[Callable[[], None]] = None, extra: Optional[Dict] = None,
              rounds: Optional[Tuple[int, int]] = None) -> Optional[float]:
    """Time ``fn()`` (which waits for the device) with ``benchmark.pedantic``; describe it in ``extra_info``.

    ``extra_info`` gets ``benchmark``, ``impl``, ``pass``, ``device``, ``device_type``, ``smoke``, ``shape``
    (a dict with ``vocab`` among its keys), ``vocab``, ``extra``, and, unless timing is disabled,
    ``seconds`` (the median) and ``peak_mem_bytes`` (above what was allocated before; -1 on a CPU).
    :func:`record_roofline` adds the roofline.

    The first call is untimed and doubles as a warm-up: a peer that fails there (out of memory, a shape
    it does not support) skips its test; an rlfuse implementation that fails fails it. On a GPU a second
    untimed call measures the peak memory. The timed rounds are the last calls of ``fn``.

    Args:
        name: the benchmark (``logprobs``, ``policy_loss``, ``linear``, ``rollout``).
        pass_name: ``fwd``, ``fwd_bwd`` or ``generate``.
        setup: called untimed before every call (e.g. to seed sampling).
        rounds: (timed rounds, warm-up rounds) instead of ``run.rounds`` and ``run.warmup_rounds``.

    Returns:
        The median time in seconds, or None when timing is disabled (``--benchmark-disable``).
    """
    benchmark.group = f"{name} {pass_name} " + " ".join(f"{key}={value}" for key, value in shape.items())
    benchmark.extra_info.update({
        "benchmark": name, "impl": impl, "pass": pass_name, "device": device_name(run.device),
        "device_type": run.device.type, "smoke": run.smoke, "shape": dict(shape), "vocab": shape.get("vocab"),
        **(extra or {}),
    })
    timed, warmup = rounds or (run.rounds, run.warmup_rounds)
    _first_call(impl, fn, setup)
    peak = peak_memory_bytes(fn, run.device) if run.device.type == "cuda" else -1  # a second, warm call
    benchmark.pedantic(fn, setup=setup, rounds=timed, warmup_rounds=max(warmup - 1, 0), iterations=1)
    if benchmark.stats is None:
        return None
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update({"seconds": seconds, "peak_mem_bytes": peak})
    return seconds


def record_roofline(benchmark, run: SuiteRun, seconds: Optional[float], work: Work,
                    gemm_tflops: Optional[float] = None) -> None:
    """Add :func:`roofline_fields` of a pass timed by :func:`time_pass` to ``benchmark.extra_info``.

    The copy bandwidth is measured once per session on ``run.device``. Nothing is added when timing was
    disabled (``seconds`` is None).
    """
    if seconds is not None:
        benchmark.extra_info.update(roofline_fields(seconds, work, measured_copy_bandwidth(run.device), gemm_tflops))


def _first_call(impl: str, fn: Callable[[], object], setup: Optional[Callable[[], None]]) -> None:
    try:
        if setup is not None:
            setup()
        fn()
        return
    except Exception as error:
        if impl.startswith("rlfuse"):
            raise
        reason = f"{impl} failed: {type(error).__name__}: {error}"[:300]
    # Skipped outside the except block, so that the failed call's tensors (its traceback) are freed first.
    pytest.skip(reason)

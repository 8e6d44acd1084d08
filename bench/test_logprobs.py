"""``token_logprobs`` (log-prob + entropy from logits), forward and forward+backward, against its peers.

Each implementation is judged by the bytes it moves against the copy bandwidth (:func:`bench.logprobs.work`).
"""

import pytest

from bench.common import logits_passes
# bench/conftest.py parametrizes `shape` with this module's SMOKE_SHAPES (FULL_SHAPES under --full).
from bench.logprobs import FULL_SHAPES, SMOKE_SHAPES  # noqa: F401
from bench.logprobs import IMPLEMENTATIONS, implementations, make_inputs, work
from bench.suite import record_roofline, time_pass



@pytest.fixture(scope="module")
def inputs(shape, run):
    """``(logits, targets, weights)`` of one shape, shared by its tests."""
    run.require_kernel_shapes()
    return make_inputs(*shape, run.device)


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_logprobs(benchmark, run, shape, inputs, impl, pass_name):
    fn = implementations(run.device).get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not installed, or runs only on a GPU")
    logits, targets, weights = inputs
    n, v = shape
    passes = logits_passes(fn, logits, targets, weights, run.device)
    seconds = time_pass(benchmark, passes[pass_name], run, name="logprobs", impl=impl, pass_name=pass_name,
                        shape={"n_tokens": n, "vocab": v}, extra={"dtype": "bfloat16"})
    record_roofline(benchmark, run, seconds, work(impl, pass_name, n, v, logits.element_size(), fn))
    if impl.startswith("rlfuse"):
        # Passes over the (N, V) logits in memory: one read forward; the backward reads them and writes d(logits).
        benchmark.extra_info["logits_passes"] = {"fwd": 1, "fwd_bwd": 3}[pass_name]

"""The fused policy loss from logits (``policy_loss_from_logits``, DAPO's default config), forward and
forward+backward, against its peers. Each implementation is judged by the bytes it moves against the copy
bandwidth (:func:`bench.policy_loss.work`).
"""

import pytest

from bench.common import logits_passes
# bench/conftest.py parametrizes `shape` with this module's SMOKE_SHAPES (FULL_SHAPES under --full).
from bench.policy_loss import FULL_SHAPES, SMOKE_SHAPES  # noqa: F401
from bench.policy_loss import IMPLEMENTATIONS, implementations, make_inputs, work
from bench.suite import record_roofline, time_pass
from rlfuse.algos import get_config
from rlfuse.algos.fused import passes_over_logits

ALGO = "dapo"


@pytest.fixture(scope="module")
def inputs(shape, run):
    """``(logits, targets, old_logps, advantages, mask)`` of one shape, shared by its tests."""
    run.require_kernel_shapes()
    return make_inputs(*shape, run.device)


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_policy_loss(benchmark, run, shape, inputs, impl, pass_name):
    logits, targets, old_logps, advantages, mask = inputs
    fn = implementations(run.device, get_config(ALGO), old_logps, advantages, mask).get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not installed, or runs only on a GPU")
    b, t, v = shape
    passes = logits_passes(fn, logits, targets, advantages, run.device)
    seconds = time_pass(benchmark, passes[pass_name], run, name="policy_loss", impl=impl, pass_name=pass_name,
                        shape={"algo": ALGO, "n_tokens": b * t, "vocab": v},
                        extra={"dtype": "bfloat16", "batch": b, "seq_len": t})
    record_roofline(benchmark, run, seconds, work(impl, pass_name, b, t, v, logits.element_size(), fn,
                                                   get_config(ALGO)))
    if impl.startswith("rlfuse"):
        # Passes over the (N, V) logits in memory: the forward alone reads them once; with the backward, a
        # token-local loss reads them and writes d(logits) in one kernel (2), other losses take 3.
        benchmark.extra_info["logits_passes"] = passes_over_logits(get_config(ALGO)) if pass_name == "fwd_bwd" else 1

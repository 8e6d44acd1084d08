"""The benchmark suite: ``pytest bench/ --benchmark-only [--full]``.

Each ``bench/test_*.py`` times every implementation (rlfuse's and the installed peers') with
pytest-benchmark's ``benchmark`` fixture and records the roofline in ``extra_info``. The default is a
smoke size (on a CPU, Triton's interpreter: it checks that everything runs, not how fast); ``--full``
selects the full shapes (a GPU for the kernels) and the real SmolLM2-135M for the rollout.

Unless ``--benchmark-json PATH`` is given, the JSON goes to ``bench/results/suite-<device>-<smoke|full>.json``
(a later run on the same device and size replaces it), where ``python -m bench.report`` reads it.
The root ``pytest`` (``testpaths = ["tests"]``) does not collect this folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never downloads weights or data
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import pick_device  # noqa: E402
from bench.suite import SuiteRun, results_file_name, shape_id  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="full shapes (the kernels need a GPU) and the real SmolLM2-135M rollout, "
                          "instead of the smoke size")


def pytest_configure(config):
    option = config.option
    timing_off = (getattr(option, "benchmark_skip", False) or getattr(option, "benchmark_disable", False)
                  or option.collectonly)
    if hasattr(option, "benchmark_json") and option.benchmark_json is None and not timing_off:
        option.benchmark_json = RESULTS_DIR / results_file_name(pick_device(None), option.full)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)


def pytest_generate_tests(metafunc):
    """Parametrize ``shape`` with the module's ``SMOKE_SHAPES``, or ``FULL_SHAPES`` under ``--full``."""
    if "shape" in metafunc.fixturenames:
        full = metafunc.config.getoption("full")
        shapes = metafunc.module.FULL_SHAPES if full else metafunc.module.SMOKE_SHAPES
        metafunc.parametrize("shape", shapes, ids=shape_id, scope="module")


@pytest.fixture(scope="session")
def run(pytestconfig) -> SuiteRun:
    """The session's device and size."""
    return SuiteRun(device=pick_device(None), full=pytestconfig.getoption("full"))

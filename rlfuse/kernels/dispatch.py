"""Choose between the Triton kernels and the plain-PyTorch references.

CUDA tensors run the Triton kernels, CPU tensors the references. ``RLFUSE_BACKEND=triton`` or ``torch``
forces one path; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (Triton's interpreter), which is
how the tests exercise every kernel without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def backend() -> str:
    """The value of ``RLFUSE_BACKEND`` (``auto`` when unset); raises ``ValueError`` for anything else."""
    value = os.environ.get("RLFUSE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RLFUSE_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel.

    Raises:
        ValueError: ``RLFUSE_BACKEND=triton`` without triton installed, or on CPU tensors without
            ``TRITON_INTERPRET=1``.
    """
    choice = backend()
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise ValueError("RLFUSE_BACKEND=triton but triton is not installed; pip install triton, or unset it")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "RLFUSE_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing rlfuse, or move the tensors to a GPU"
        )
    return True

"""Mixed precision: matmuls in bfloat16 under ``torch.autocast``, weights and optimizer state in float32.

On a CPU with native bf16 dot products (AVX512-BF16 or AMX) a bf16 matmul runs about three times as fast as
an fp32 one; the weights, AdamW's state, the residual stream, the norms and softmaxes stay in float32
(``torch.autocast`` casts only the inputs of matmul-like ops), and the loss head's logits stay float32
(:class:`rlfuse.kernels.linear_logprobs.ChunkedLinearLogprobsFunction` turns autocast off inside).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Literal, Optional

import torch

MixedPrecision = Literal["auto", "no", "bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_autocast_dtype(mode: str, device: torch.device, weight_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The autocast dtype of ``--mixed-precision mode``, or None for none.

    ``auto`` is bf16 on a CPU with native bf16 (:func:`cpu_has_native_bf16`) when the weights are float32,
    and none elsewhere (on a GPU the weights are bf16 already under ``--dtype auto``); ``bf16`` is bf16
    wherever the weights are float32; ``no`` is none. Weights that are not float32 never get autocast: it
    casts only float32 tensors.

    Raises:
        ValueError: a ``mode`` other than auto, no or bf16.
    """
    if mode not in ("auto", "no", "bf16"):
        raise ValueError(f"--mixed-precision must be auto, no or bf16, got {mode!r}")
    if mode == "no" or weight_dtype != torch.float32:
        return None
    if mode == "auto" and not (device.type == "cpu" and cpu_has_native_bf16()):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype=None``."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

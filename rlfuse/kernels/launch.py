"""Launch configurations of every Triton kernel in ``rlfuse.kernels``, as data.

Each wrapper asks one pure function here for its tiles, ``num_warps``, ``num_stages`` and chunking. The
functions take the GPU's compute capability (``80`` for sm_80, ``90`` for sm_90a; ``None`` for Triton's
CPU interpreter), the dtype and the problem sizes (N tokens, H hidden, V vocabulary), and need no GPU, so
``python -m bench.compiled`` can compile every configuration the wrappers can choose for GPUs that are
absent, and the compile gate in the tests checks that none spills registers.

Every configuration below was chosen from that static report (registers, spill bytes, shared memory),
not from timings. One H200 lease (``bench/results/gpu-h200-2026-11-30/``) timed the kernels once; the
vocabulary split of the fused-linear forward came after it and is untimed (``bench.linear_sweep`` times it
against other tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

#: Capabilities the static report compiles for: Ampere (A100) and Hopper (H100/H200, sm_90a).
ARCHS = (80, 90)
#: Bytes of the (N, vocabulary chunk) gradient buffer the fused-linear backward allocates per chunk.
LINEAR_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel launch's compile-time choices.

    Attributes:
        constexprs: tile sizes and other ``tl.constexpr`` values (e.g. ``{"BLOCK_V": 4096}``).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the kernel's loops (1: none).
    """

    constexprs: Dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1

    def launch_kwargs(self) -> Dict[str, int]:
        """Keyword arguments for ``kernel[grid](..., **cfg.launch_kwargs())``."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}


def capability_of(device: torch.device) -> Optional[int]:
    """``10 * major + minor`` of a CUDA device (``90`` for an H100), ``None`` for any other device."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _pow2_at_most(value: int, cap: int) -> int:
    """The smallest power of two >= ``value``, but at most ``cap`` (a power of two)."""
    size = 1
    while size < value and size < cap:
        size *= 2
    return size


def row_config(capability: Optional[int], vocab: int) -> LaunchConfig:
    """One program per row of (N, V) logits, sweeping the vocabulary in ``BLOCK_V`` tiles.

    Used by the log-prob forward and backward and the single-pass token loss. 4096 fp32 values per tile
    over 8 warps is 16 per thread: enough loads in flight to stream at HBM bandwidth without spilling.
    The interpreter's cost grows with the tile, so it gets 1024.
    """
    cap = 1024 if capability is None else 4096
    return LaunchConfig({"BLOCK_V": _pow2_at_most(vocab, cap)}, num_warps=8 if capability else 1)


def linear_forward_config(capability: Optional[int], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """The fused-linear forward: (BLOCK_M tokens) x (BLOCK_N vocabulary) logits tiles over BLOCK_K of H.

    Each tile's fp32 accumulator, its exponentials and the running row statistics stay in registers.
    bf16/fp16 take 128 x 64 tiles (64-wide K slices) over 8 warps; fp32 operands, which are twice the size
    and multiply without tensor cores in IEEE precision, take 64 x 64 tiles with 32-wide K slices. Both
    compile without spills on sm_80 and sm_90a (``python -m bench.compiled``).
    """
    if capability is None:
        return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)
    if dtype == torch.float32:
        return LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3)
    return LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3)


#: Programs per multiprocessor the fused-linear forward aims for when it splits the vocabulary: with fewer
#: token tiles than that, each tile's vocabulary is cut into slices until the grid fills the GPU.
LINEAR_FORWARD_PROGRAMS_PER_SM = 2


def linear_forward_splits(capability: Optional[int], n_rows: int, vocab: int, block_m: int, block_n: int,
                          num_sms: Optional[int]) -> int:
    """Vocabulary slices of the fused-linear forward: one program per (token tile, slice).

    One slice per token tile leaves most of a GPU idle at training sizes (N = 8192 tokens in 128-token tiles
    is 64 programs for 132 multiprocessors on an H100/H200), so the vocabulary is cut until there are
    :data:`LINEAR_FORWARD_PROGRAMS_PER_SM` programs per multiprocessor, at most one slice per BLOCK_N columns.
    The interpreter takes 2 slices where it can, so that the tests cover the merge.
    """
    tiles_n = -(-vocab // block_n)
    if capability is None or not num_sms:
        return max(1, min(2, tiles_n))
    tiles_m = max(1, -(-n_rows // block_m))  # N = 0 launches nothing, but must not divide by 0
    wanted = -(-LINEAR_FORWARD_PROGRAMS_PER_SM * num_sms // tiles_m)
    return max(1, min(wanted, tiles_n))


def linear_combine_config(capability: Optional[int]) -> LaunchConfig:
    """The fused-linear forward's merge of vocabulary slices: BLOCK tokens per program, elementwise."""
    return LaunchConfig({"BLOCK": 64 if capability is None else 256}, num_warps=1 if capability is None else 4)


def multiprocessor_count(device: torch.device) -> Optional[int]:
    """The number of multiprocessors of a CUDA device (132 on an H100/H200), ``None`` for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_dlogits_config(capability: Optional[int], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """The fused-linear backward's d(logits) tiles: recompute a logits tile, write its gradient (no atomics).

    The same tiles as the forward: the logits tile dominates the registers in both.
    """
    return linear_forward_config(capability, dtype, n_rows, hidden, vocab)


def linear_dhidden_config(capability: Optional[int], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """d(hidden) += d(logits chunk) @ W[chunk]: each program owns a (BLOCK_M, BLOCK_K) tile of the output
    and reduces over the chunk's vocabulary in BLOCK_N slices."""
    if capability is None:
        return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)
    if dtype == torch.float32:
        return LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)
    return LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)


def linear_vocab_chunk(capability: Optional[int], dtype: torch.dtype, n_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk of the fused-linear backward.

    The chunk's (N, chunk) gradient buffer, in the input dtype, holds at most :data:`LINEAR_CHUNK_BYTES`
    (a power of two between 256 and 16384 columns; the interpreter takes 64 columns, to keep tests small).
    """
    if capability is None:
        return min(64, vocab)
    element = torch.finfo(dtype).bits // 8
    columns = max(256, LINEAR_CHUNK_BYTES // max(1, n_rows * element))
    size = 256
    while size * 2 <= min(columns, 16384):
        size *= 2
    return size


@dataclass(frozen=True)
class KernelSpec:
    """Everything needed to compile one kernel launch ahead of time (``bench.compiled``).

    Attributes:
        kernel: the ``@triton.jit`` function.
        signature: argument name -> Triton type (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: the value of every ``constexpr`` argument, tiles included.
        config: the launch configuration the wrapper picks.
        multiplies_matrices: the kernel calls ``tl.dot`` (so it must use tensor cores where its operands allow).
    """

    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    config: LaunchConfig
    multiplies_matrices: bool = False


TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


def pointer(dtype: torch.dtype) -> str:
    """The Triton signature type of a pointer to ``dtype`` elements, e.g. ``"*bf16"``."""
    return "*" + TRITON_TYPES[dtype]


def signature_of(kernel, types: Dict[str, str]) -> Dict[str, str]:
    """The kernel's full signature in argument order: ``types`` for runtime arguments, ``constexpr`` else."""
    names = kernel.arg_names
    missing = [n for n in types if n not in names]
    if missing:
        raise ValueError(f"{kernel.fn.__name__} has no arguments {missing}")
    return {n: types.get(n, "constexpr") for n in names}


def advantages_config(capability: Optional[int], num_generations: int) -> LaunchConfig:
    """One program per group of G rewards."""
    return LaunchConfig({"BLOCK_G": _pow2_at_most(num_generations, 1 << 16)}, num_warps=1)

"""Launch configurations of every Triton kernel in ``rlfuse.kernels``, as data.

Each wrapper asks one pure function here for its tiles, ``num_warps``, ``num_stages``, grid bounds and
chunking. The functions take the GPU (a :class:`Target`: compute capability, multiprocessors, L2 bytes;
``None`` for Triton's CPU interpreter), the dtype and the problem sizes (N tokens, H hidden, V vocabulary),
and need no GPU: ``python -m bench.compiled`` runs the real wrappers on meta tensors under
:func:`pretend_target` and compiles every launch they make for GPUs that are absent.

Where a choice is between designs rather than tiles, :data:`LINEAR_IMPLEMENTATION` records it with the
measurement it came from. Every other configuration here was chosen from the static report (registers,
spill bytes, shared memory, blocks per multiprocessor), not from timings; ``bench/gpu_lease.sh`` times them
against alternatives (``bench.row_sweep``, ``bench.linear_sweep``) when a GPU is lent.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch

#: Capabilities the static report compiles for: Ampere (A100) and Hopper (H100/H200, sm_90a).
ARCHS = (80, 90)


@dataclass(frozen=True)
class Target:
    """The GPU a launch is configured for.

    Attributes:
        capability: ``10 * major + minor`` (80 for an A100, 90 for an H100/H200).
        num_sms: streaming multiprocessors.
        l2_bytes: L2 cache size in bytes.
    """

    capability: int
    num_sms: int
    l2_bytes: int


#: The GPUs the static report configures for, as their drivers report them.
TARGETS = {80: Target(80, 108, 40 << 20), 90: Target(90, 132, 50 << 20)}
_PRETEND: contextvars.ContextVar[Optional[Target]] = contextvars.ContextVar("rlfuse_pretend_target", default=None)
_CUDA_TARGETS: Dict[int, Target] = {}


@contextlib.contextmanager
def pretend_target(target: Target) -> Iterator[None]:
    """Configure every launch inside the block for ``target``, whatever device the tensors are on.

    For ahead-of-time compilation: the wrappers run on meta tensors and their launches are captured
    (``bench.compiled``), with the configuration a real launch on ``target`` would get.
    """
    token = _PRETEND.set(target)
    try:
        yield
    finally:
        _PRETEND.reset(token)


def target_of(device: torch.device) -> Optional[Target]:
    """The :class:`Target` of a CUDA device (or the pretended one), ``None`` for the interpreter's CPU tensors."""
    pretended = _PRETEND.get()
    if pretended is not None:
        return pretended
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_TARGETS:
        props = torch.cuda.get_device_properties(index)
        _CUDA_TARGETS[index] = Target(10 * props.major + props.minor, props.multi_processor_count,
                                      int(getattr(props, "L2_cache_size", 0)) or (40 << 20))
    return _CUDA_TARGETS[index]


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel launch's compile-time choices.

    Attributes:
        constexprs: tile sizes and other ``tl.constexpr`` values (e.g. ``{"BLOCK_V": 4096}``).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the kernel's loops (1: none).
        max_programs: an upper bound on the grid (a persistent kernel loops over the rest), or None.
    """

    constexprs: Dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    max_programs: Optional[int] = None

    def launch_kwargs(self) -> Dict[str, int]:
        """Keyword arguments for ``kernel[grid](..., **cfg.launch_kwargs())``."""
        return {**self.constexprs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def programs(self, work_items: int) -> int:
        """Programs to launch for ``work_items`` items of work (row groups, tiles): at most ``max_programs``."""
        if self.max_programs is None:
            return max(1, work_items)
        return max(1, min(work_items, self.max_programs))


def _pow2_at_most(value: int, cap: int) -> int:
    """The smallest power of two >= ``value``, but at most ``cap`` (a power of two)."""
    size = 1
    while size < value and size < cap:
        size *= 2
    return size


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8


def _override(name: str) -> Optional[Dict[str, int]]:
    """``RLFUSE_<NAME>=KEY=VALUE,...``: a sweep's replacement for one configuration (``bench.row_sweep``,
    ``bench.linear_sweep``)."""
    text = os.environ.get(f"RLFUSE_{name.upper()}")
    if not text:
        return None
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise ValueError(f"RLFUSE_{name.upper()} must be KEY=INTEGER pairs joined by commas, such as "
                         f"ROWS=1,BLOCK_V=4096,num_warps=8; got {text!r}") from error


def _with_override(name: str, cfg: LaunchConfig) -> LaunchConfig:
    values = _override(name)
    if values is None:
        return cfg
    constexprs = {**cfg.constexprs, **{k: v for k, v in values.items() if k.isupper()}}
    return LaunchConfig(constexprs, values.get("num_warps", cfg.num_warps), values.get("num_stages", cfg.num_stages),
                        values.get("max_programs", cfg.max_programs))


def row_config(target: Optional[Target], vocab: int) -> LaunchConfig:
    """Log-prob forward and backward over (N, V) logits: ROWS rows per program, BLOCK_V-wide tiles.

    Each program streams its rows' logits once. Within a tile only the running maximum is reduced across
    the program's threads; the sums of the online softmax stay per lane and are reduced once per row, and
    the next tile's load is issued before the current tile is used (two tiles in flight per program). One
    row over 8 warps in 4096-wide tiles is 16 values a thread a tile. The interpreter takes two rows in
    256-wide tiles, so that the tests cover several rows and tiles per program.
    """
    if target is None:
        return _with_override("row_config", LaunchConfig({"ROWS": 2, "BLOCK_V": _pow2_at_most(vocab, 256)},
                                                         num_warps=1))
    return _with_override("row_config", LaunchConfig({"ROWS": 1, "BLOCK_V": _pow2_at_most(vocab, 4096)},
                                                     num_warps=8))


#: Share of the L2 cache the fused loss's rows in flight may fill: its second sweep over a row must find it
#: there, with room left for the gradient it writes and for other traffic.
L2_RESIDENT_FRACTION = 0.5


def token_loss_config(target: Optional[Target], dtype: torch.dtype, vocab: int) -> LaunchConfig:
    """The fused token-local loss: a persistent grid whose rows in flight fit in the L2 cache.

    Each program sweeps a row twice (statistics, then d(logits)); the second sweep reads from L2 only
    while every row in flight fits there, so the grid is capped at ``L2_RESIDENT_FRACTION * L2 / row bytes``
    rows (e.g. 102 rows of 250 KiB, bf16 V = 128256, on a 50 MiB L2) and each program loops over rows.
    One row a program, in 8 warps with 4096-wide tiles (16 values a thread, two tiles in flight): 16 warps
    with 8192-wide tiles would keep twice the loads in flight, but sat at the 128-register cap of 512
    threads and spilled on sm_80 once the second sweep became the log-prob backward's (``bench.row_sweep``
    times it). The interpreter caps the grid at 2 programs, so that the tests cover the loop.
    """
    if target is None:
        return _with_override("token_loss_config", LaunchConfig({"ROWS": 2, "BLOCK_V": _pow2_at_most(vocab, 256)},
                                                                num_warps=1, max_programs=2))
    rows = 1
    row_bytes = max(1, vocab * element_size(dtype))
    rows_in_flight = max(1, int(L2_RESIDENT_FRACTION * target.l2_bytes) // row_bytes)
    return _with_override("token_loss_config",
                          LaunchConfig({"ROWS": rows, "BLOCK_V": _pow2_at_most(vocab, 4096)}, num_warps=8,
                                       max_programs=max(1, rows_in_flight // rows)))


def rows_in_flight(cfg: LaunchConfig, n_rows: int) -> int:
    """Rows of logits a launch of ``cfg`` over ``n_rows`` rows holds in flight: programs x ROWS."""
    rows = cfg.constexprs.get("ROWS", 1)
    return cfg.programs(-(-n_rows // rows)) * rows


# --- Log-probs from hidden states and the LM head -------------------------------------------------------

#: Which implementation computes log-probs from hidden states x LM head on each GPU, and the measurement
#: behind the choice. ``hybrid``: per vocabulary chunk, a cuBLAS GEMM forms fp32 logits and rlfuse's row
#: kernels reduce them (forward) or turn them into d(logits) for two more cuBLAS GEMMs (backward).
#: ``fused``: Triton kernels that multiply and reduce on chip (``linear_logprobs_triton``).
#: On one H200 (2026-11-30, bench/results/gpu-h200-2026-11-30/suite-NVIDIA_H200-full.json, M = 8192,
#: H = 896, V = 151936, bf16), ``fused`` took 19.0 ms forward and 36.9 ms forward+backward, while cuBLAS
#: logits plus rlfuse's logits kernel took 4.39 ms and 12.55 ms: ``hybrid`` is built from those same
#: cuBLAS GEMMs and logits-row kernels. It has not been timed itself; ``bench/gpu_lease.sh`` times it first.
LINEAR_IMPLEMENTATION = {80: "hybrid", 90: "hybrid"}
LINEAR_IMPLEMENTATIONS = ("hybrid", "fused")

#: Extra memory the hybrid path may use, as a share of its inputs plus their gradients (hidden states and
#: LM head, each twice).
LINEAR_EXTRA_MEMORY_FRACTION = 0.10
#: Bounds on the hybrid path's vocabulary columns per chunk (multiples of 128), and the width it keeps
#: while it can by splitting the tokens into row blocks instead.
LINEAR_CHUNK_MIN, LINEAR_CHUNK_TARGET, LINEAR_CHUNK_MAX = 256, 512, 16384


def linear_implementation(target: Optional[Target]) -> str:
    """``hybrid`` or ``fused`` for this GPU (:data:`LINEAR_IMPLEMENTATION`); ``RLFUSE_LINEAR_IMPL`` overrides.

    Raises:
        ValueError: ``RLFUSE_LINEAR_IMPL`` names no implementation.
    """
    forced = os.environ.get("RLFUSE_LINEAR_IMPL", "").strip().lower()
    if forced:
        if forced not in LINEAR_IMPLEMENTATIONS:
            raise ValueError(f"RLFUSE_LINEAR_IMPL must be one of {', '.join(LINEAR_IMPLEMENTATIONS)}, got {forced!r}")
        return forced
    if target is None:
        return "hybrid"
    return LINEAR_IMPLEMENTATION.get(target.capability, "hybrid")


@dataclass(frozen=True)
class HybridBlocks:
    """How the hybrid path splits its work: ``rows`` tokens per row block, ``columns`` vocabulary columns per
    chunk. Each row block walks every chunk; below fp32, d(LM head) is accumulated across row blocks in the
    weight's dtype (one rounding per row block after the first)."""

    rows: int
    columns: int


def linear_hybrid_blocks(target: Optional[Target], dtype: torch.dtype, n_rows: int, hidden: int,
                         vocab: int, backward: bool = True) -> HybridBlocks:
    """Row blocks and vocabulary chunks of the hybrid path's forward (``backward=False``) or backward, from
    its memory budget.

    The budget B is :data:`LINEAR_EXTRA_MEMORY_FRACTION` of inputs plus gradients, 2·(N·H + V·H) elements,
    less 40 bytes a token: the 5 float32 statistics kept for the backward and the four (N,) float32 results.
    The forward holds one fp32 logit per token and column; the backward also one d(logit) in ``dtype``, and
    a row block of R tokens an fp32 (R, H) d(hidden) accumulator (none for fp32, where it is the output).
    The two passes never hold their buffers at once, so each gets the whole budget. R is N when a chunk of
    :data:`LINEAR_CHUNK_TARGET` columns fits beside the accumulator, else the largest multiple of 128 that
    leaves room for one; then C is the rest of the budget over R tokens' bytes per column, rounded down to a
    multiple of 128 within [:data:`LINEAR_CHUNK_MIN`, :data:`LINEAR_CHUNK_MAX`]. Where even that does not
    fit (a tiny LM head against many tokens) the minimum is taken and the budget exceeded, as
    :func:`rlfuse.kernels.linear_hybrid.extra_bytes` reports. At N = 8192, bf16, H = 896, V = 151936: the
    forward takes 1664 columns, the backward 512; at H = 4096, V = 128256 the backward takes 1792. The
    interpreter takes 64 columns and blocks of 32 rows, so that the tests cover several of each.
    """
    forced = _override("linear_hybrid_blocks")  # RLFUSE_LINEAR_HYBRID_BLOCKS=rows=2048,columns=4096 (sweeps)
    if forced:
        return HybridBlocks(rows=max(1, min(forced.get("rows", n_rows), n_rows)),
                            columns=max(1, forced.get("columns", LINEAR_CHUNK_TARGET)))
    if target is None:
        return HybridBlocks(rows=max(1, min(32, n_rows)), columns=max(1, min(64, vocab)))
    element = element_size(dtype)
    budget = LINEAR_EXTRA_MEMORY_FRACTION * 2 * (n_rows * hidden + vocab * hidden) * element - 40 * n_rows
    accumulator_per_row = 4 * hidden if backward and dtype != torch.float32 else 0
    per_column = 4 + element if backward else 4
    per_row = accumulator_per_row + LINEAR_CHUNK_TARGET * per_column
    rows = n_rows if n_rows * per_row <= budget else max(128, int(budget // per_row) // 128 * 128)
    rows = max(1, min(rows, n_rows))
    columns = int((budget - rows * accumulator_per_row) // (rows * per_column)) // 128 * 128
    columns = max(LINEAR_CHUNK_MIN, min(LINEAR_CHUNK_MAX, columns))
    return HybridBlocks(rows=rows, columns=min(columns, -(-vocab // 128) * 128))


def chunk_row_config(target: Optional[Target], columns: int) -> LaunchConfig:
    """The hybrid path's row kernels over an (N, C) fp32 logits chunk: as :func:`row_config`, C wide."""
    if target is None:
        return LaunchConfig({"ROWS": 2, "BLOCK_V": _pow2_at_most(columns, 32)}, num_warps=1)
    return _with_override("chunk_row_config", LaunchConfig({"ROWS": 1, "BLOCK_V": _pow2_at_most(columns, 2048)},
                                                           num_warps=4))


def linear_forward_config(target: Optional[Target], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """The fused-linear forward: (BLOCK_M tokens) x (BLOCK_N vocabulary) logits tiles over BLOCK_K of H.

    Each tile's fp32 accumulator, its exponentials and the running row statistics stay in registers.
    bf16/fp16 take 128 x 64 tiles (64-wide K slices) over 8 warps; fp32 operands, which are twice the size
    and multiply without tensor cores in IEEE precision, take 64 x 64 tiles with 16-wide K slices (32-wide
    ones spilled on sm_90a once compiled with the launch's own specialization). Both compile without spills
    on sm_80 and sm_90a (``python -m bench.compiled``).
    """
    if target is None:
        return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)
    if dtype == torch.float32:
        return LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3)
    return LaunchConfig({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3)


#: Programs per multiprocessor the fused-linear forward aims for when it splits the vocabulary: with fewer
#: token tiles than that, each tile's vocabulary is cut into slices until the grid fills the GPU.
LINEAR_FORWARD_PROGRAMS_PER_SM = 2


def linear_forward_splits(target: Optional[Target], n_rows: int, vocab: int, block_m: int, block_n: int) -> int:
    """Vocabulary slices of the fused-linear forward: one program per (token tile, slice).

    One slice per token tile leaves most of a GPU idle at training sizes (N = 8192 tokens in 128-token tiles
    is 64 programs for 132 multiprocessors on an H100/H200), so the vocabulary is cut until there are
    :data:`LINEAR_FORWARD_PROGRAMS_PER_SM` programs per multiprocessor, at most one slice per BLOCK_N columns.
    The interpreter takes 2 slices where it can, so that the tests cover the merge.
    """
    tiles_n = -(-vocab // block_n)
    if target is None:
        return max(1, min(2, tiles_n))
    tiles_m = max(1, -(-n_rows // block_m))  # N = 0 launches nothing, but must not divide by 0
    wanted = -(-LINEAR_FORWARD_PROGRAMS_PER_SM * target.num_sms // tiles_m)
    return max(1, min(wanted, tiles_n))


def linear_combine_config(target: Optional[Target]) -> LaunchConfig:
    """The fused-linear forward's merge of vocabulary slices: BLOCK tokens per program, elementwise."""
    return LaunchConfig({"BLOCK": 64 if target is None else 256}, num_warps=1 if target is None else 4)


def linear_dlogits_config(target: Optional[Target], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """The fused-linear backward's d(logits) tiles: recompute a logits tile, write its gradient (no atomics).

    The same tiles as the forward: the logits tile dominates the registers in both.
    """
    return linear_forward_config(target, dtype, n_rows, hidden, vocab)


def linear_dhidden_config(target: Optional[Target], dtype: torch.dtype, n_rows: int, hidden: int,
                          vocab: int) -> LaunchConfig:
    """d(hidden) += d(logits chunk) @ W[chunk]: each program owns a (BLOCK_M, BLOCK_K) tile of the output
    and reduces over the chunk's vocabulary in BLOCK_N slices.

    fp32 takes 32-wide output tiles, and bf16/fp16 on sm_80 64-deep slices: with 64-wide fp32 tiles and
    128-deep sm_80 slices, Triton 3.6 (the GPU image's) spilled 4-16 bytes where Triton 3.9 did not. Both
    versions compile every launch of these tiles without spills (``python -m bench.compiled --gate``)."""
    if target is None:
        return LaunchConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)
    if dtype == torch.float32:
        return LaunchConfig({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    depth = 128 if target.capability >= 90 else 64
    return LaunchConfig({"BLOCK_M": 128, "BLOCK_N": depth, "BLOCK_K": 64}, num_warps=8, num_stages=3)


#: Bytes of the (N, vocabulary chunk) gradient buffer the fused-linear backward allocates per chunk.
LINEAR_CHUNK_BYTES = 64 << 20


def linear_vocab_chunk(target: Optional[Target], dtype: torch.dtype, n_rows: int, vocab: int) -> int:
    """Vocabulary columns per chunk of the fused-linear backward.

    The chunk's (N, chunk) gradient buffer, in the input dtype, holds at most :data:`LINEAR_CHUNK_BYTES`
    (a power of two between 256 and 16384 columns; the interpreter takes 64 columns, to keep tests small).
    """
    if target is None:
        return min(64, vocab)
    columns = max(256, LINEAR_CHUNK_BYTES // max(1, n_rows * element_size(dtype)))
    size = 256
    while size * 2 <= min(columns, 16384):
        size *= 2
    return size


def advantages_config(target: Optional[Target], num_generations: int) -> LaunchConfig:
    """One program per group of G rewards."""
    return LaunchConfig({"BLOCK_G": _pow2_at_most(num_generations, 1 << 16)}, num_warps=1)

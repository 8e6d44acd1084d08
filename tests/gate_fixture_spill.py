"""A kernel that spills registers, for the compile gate's own test: its gate must fail on it.

``python -m bench.compiled --modules gate_fixture_spill`` (with ``tests`` on the path) compiles it as it
compiles rlfuse's kernels: through ``aot_launches`` and Triton's binder.
"""

import torch
import triton
import triton.language as tl

from rlfuse.kernels import launch


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    # One warp holds BLOCK values per array, 4 arrays live at once: far beyond 255 registers a thread.
    offs = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
    b = tl.load(x_ptr + N + offs, mask=offs < N, other=0.0)
    c = tl.load(x_ptr + 2 * N + offs, mask=offs < N, other=0.0)
    d = tl.load(x_ptr + 3 * N + offs, mask=offs < N, other=0.0)
    total = tl.cumsum(a * b + c, 0) * tl.cumsum(d * a + b, 0) + tl.cumsum(c * d - a, 0)
    tl.store(out_ptr + offs, total + tl.flip(a * d, 0), mask=offs < N)


def spill(x: torch.Tensor) -> torch.Tensor:
    """Launch the kernel on a (4, N) float32 tensor, configured as a wrapper would (``launch.target_of``)."""
    out = torch.empty(x.shape[1], device=x.device, dtype=torch.float32)
    block = 8192 if launch.target_of(x.device) is not None else 16
    _spilling_kernel[(1,)](x, out, x.shape[1], BLOCK=block, num_warps=1)
    return out


def aot_launches(dtype: torch.dtype, n_rows: int, hidden: int, vocab: int) -> None:
    spill(torch.empty(4, 8192, device="meta"))

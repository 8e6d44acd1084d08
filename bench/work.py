"""The work each benchmarked implementation does, and the roofline of that work.

Every implementation is charged what it actually performs, not what the best one would: the FLOPs of its
matrix products and the bytes it moves outside them, each with how it was counted:

- ``formula``: from the implementation's design (rlfuse's kernels; peers whose kernels were read);
- ``aten ops``: the implementation run under a dispatch mode that charges every aten op the bytes of its
  tensor inputs and outputs and ``2·m·n·k`` per matrix product (on a few rows, scaled per row): an upper
  bound on its traffic, since caches are not modelled;
- ``lower bound``: where neither is possible (a compiler's fused kernels), the fewest bytes the op must
  move, so its percentage is an upper bound;
- FLOPs ``None`` where they depend on the data (Cut Cross-Entropy's filtered backward skips blocks).

A pass's roofline is the time its own work takes at the ceilings measured in the same run,
``flops / gemm rate + bytes / copy bandwidth``, and its percentage is that time over the measured time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: aten ops that move no data (views and metadata).
_FREE_OPS = ("view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "as_strided", "unsqueeze",
             "squeeze", "permute", "alias", "detach", "lift_fresh", "empty", "empty_like", "new_empty", "split",
             "unbind", "set_", "resolve_conj", "resolve_neg", "sym_size", "sym_stride", "is_same_size",
             "_reshape_alias", "reshape", "contiguous")
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


@dataclass(frozen=True)
class Work:
    """What one pass of one implementation performs.

    Attributes:
        flops: matrix-product FLOPs (``None`` when they depend on the data).
        bytes: bytes moved outside matrix products (all bytes, for a memory-bound op).
        source: ``formula``, ``aten ops`` or ``lower bound`` (module docstring).
        note: what the figure covers, in a few words.
    """

    flops: Optional[int]
    bytes: int
    source: str
    note: str = ""

    def roofline_s(self, copy_bandwidth_gbs: float, gemm_tflops: Optional[float] = None) -> Optional[float]:
        """Seconds this work takes at the measured ceilings; None when its FLOPs are unknown."""
        if self.flops is None:
            return None
        matmul = self.flops / (gemm_tflops * 1e12) if self.flops and gemm_tflops else 0.0
        return matmul + self.bytes / (copy_bandwidth_gbs * 1e9)

    def fields(self, seconds: float, copy_bandwidth_gbs: float, gemm_tflops: Optional[float] = None) -> Dict:
        """``extra_info`` entries: the work, its roofline time and the percentage of it reached."""
        roofline = self.roofline_s(copy_bandwidth_gbs, gemm_tflops)
        return {"work_flops": self.flops, "work_bytes": self.bytes, "work_source": self.source,
                "work_note": self.note, "roofline_s": roofline,
                "pct_of_roofline": None if roofline is None else 100 * roofline / seconds}


def _op_name(func) -> str:
    return str(func).split(".")[1] if str(func).startswith("aten.") else str(func)


def _nbytes(tensor: torch.Tensor) -> int:
    return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())


class _AtenWork(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _MATMUL_OPS:
            a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
            self.flops += 2 * a.numel() * b.shape[-1]
        elif name not in _FREE_OPS:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(_nbytes(t) for t in tensors)
        return out


def aten_work(run: Callable[[], object], note: str = "") -> Work:
    """The work of ``run()`` as aten ops do it: FLOPs of its matrix products, and the bytes every other op
    reads and writes (views are free)."""
    with _AtenWork() as counter:
        run()
    return Work(counter.flops, counter.bytes, "aten ops", note)


def pass_work(fn, inputs, grad_index: int, pass_name: str, rows: int, total_rows: int, note: str = "") -> Work:
    """:func:`aten_work` of one benchmark pass of ``fn(*inputs)``, counted on small CPU ``inputs`` of ``rows``
    rows and scaled to ``total_rows``: ``fwd`` under no_grad, ``fwd_bwd`` with the backward of every output
    (ones as gradients). The row ops of the logits benchmarks cost the same per row at any row count, and
    real tensors let the implementation's host-side input checks run."""
    leaf = inputs[grad_index].detach().clone().requires_grad_(pass_name == "fwd_bwd")
    args = list(inputs)
    args[grad_index] = leaf

    def run():
        if pass_name == "fwd":
            with torch.no_grad():
                fn(*args)
            return
        outs = [o for o in fn(*args) if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    counted = aten_work(run)
    scale = total_rows / rows
    return Work(int(counted.flops * scale), int(counted.bytes * scale), "aten ops",
                note or f"counted at {rows} rows on the CPU, scaled per row")

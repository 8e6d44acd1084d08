"""Measuring what the wrappers allocate, save and move, without a GPU.

- :class:`LiveBytes`: every tensor an op creates on new storage, and the peak of the bytes alive at once
  (each storage is followed until it is freed). Under Triton's interpreter the wrappers' buffers are real
  CPU tensors; on meta tensors (with the launches captured by ``bench.launches``) the same code runs at full
  model shapes for free, configured as on a GPU.
- :class:`ElementTraffic`: elements the interpreted kernels load from and store to a given tensor's memory,
  so passes over the logits are counted, not assumed.
- :func:`saved_for_backward`: the tensors autograd keeps for a backward.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Tensors created on new storage inside the block: ``allocations`` (op, bytes, shape, dtype), and
    ``peak``, the most bytes of those alive at one time.

    Outputs that share storage with an input (views, ``out=`` ops) are not allocations; neither are the
    interpreter's ``set_`` calls, which alias storage that already exists.
    """

    def __init__(self):
        super().__init__()
        self.allocations: List[Tuple[str, int, tuple, torch.dtype]] = []
        self.live = 0
        self.peak = 0
        self._seen = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func).startswith("aten.set_"):
            return out
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if any(storage is s for s in inputs) or storage in self._seen:
                continue
            self._seen.add(storage)
            nbytes = storage.nbytes()
            self.allocations.append((str(func), nbytes, tuple(tensor.shape), tensor.dtype))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, nbytes)
        return out


class ElementTraffic:
    """Elements the interpreted kernels load from / store to ``tensor``'s storage, counted per access.

    Patches the interpreter's masked load and store (every ``tl.load``/``tl.store`` goes through them) for
    the duration of a ``with`` block; a masked-off element is not an access.
    """

    def __init__(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        self.lo = storage.data_ptr()
        self.hi = self.lo + storage.nbytes()
        self.loaded = 0
        self.stored = 0

    def _count(self, pointers, mask) -> int:
        pointers = np.asarray(pointers).astype(np.uint64)
        inside = (pointers >= self.lo) & (pointers < self.hi) & np.asarray(mask, dtype=bool)
        return int(inside.sum())

    @contextlib.contextmanager
    def watching(self) -> Iterator["ElementTraffic"]:
        from triton.runtime.interpreter import InterpreterBuilder

        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        traffic = self

        def counted_load(builder, ptrs, mask, other, cache_policy, is_volatile):
            traffic.loaded += traffic._count(ptrs.data, mask.data)
            return load(builder, ptrs, mask, other, cache_policy, is_volatile)

        def counted_store(builder, ptrs, value, mask, cache_policy):
            traffic.stored += traffic._count(ptrs.data, mask.data)
            return store(builder, ptrs, value, mask, cache_policy)

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
        try:
            yield self
        finally:
            InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store


@contextlib.contextmanager
def saved_for_backward() -> Iterator[List[torch.Size]]:
    """The shapes of the tensors autograd saves for a backward inside the block (``save_for_backward`` and
    the saved inputs of built-in ops)."""
    saved: List[torch.Size] = []

    def pack(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved

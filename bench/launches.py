"""The Triton launches a wrapper makes, captured instead of run, and the specialization each would get.

``captured_launches`` runs the real wrappers (on meta tensors: no memory, no GPU) with every launch
configured for a chosen GPU (``rlfuse.kernels.launch.pretend_target``) and records each ``kernel[grid](...)``
call. ``specialize`` then hands the recorded arguments to Triton's own binder, as a launch would: pointer
alignment, divisibility of every integer argument by 16, integers equal to 1 turned into constants. What
``bench.compiled`` compiles is therefore what the wrappers launch. The tests use the same capture to count
the memory the wrappers allocate at full model shapes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from rlfuse.kernels import launch


@dataclass(frozen=True)
class TensorArg:
    """What a launch needs to know of a tensor argument (its element type and address), without keeping the
    tensor alive: the capture must not change what the wrappers' memory looks like."""

    dtype: object
    address: int

    def data_ptr(self) -> int:
        return self.address


def _detached(value):
    import torch

    return TensorArg(value.dtype, value.data_ptr()) if isinstance(value, torch.Tensor) else value


@dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)`` call."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return f"{fn.__module__}.{fn.__name__}"


@contextlib.contextmanager
def captured_launches(target: Optional[launch.Target] = launch.TARGETS[90]) -> Iterator[List[Launch]]:
    """Record every Triton launch inside the block instead of running it, with launches configured for
    ``target``. Yields the list the launches are appended to."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every Triton with an interpreter has it
        pass
    launches: List[Launch] = []

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(self, tuple(grid) if not callable(grid) else grid, tuple(map(_detached, args)),
                               {key: _detached(value) for key, value in kwargs.items()}))

    originals = {cls: cls.run for cls in classes}
    try:
        for cls in classes:
            cls.run = record
        with launch.pretend_target(target):
            yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run


def specialize(captured: Launch, arch: int) -> dict:
    """What Triton's binder makes of a captured launch for ``sm_<arch>``: the compile inputs.

    Returns ``{"signature", "constexprs", "attrs", "options"}``: argument name -> Triton type (``constexpr``
    for compile-time values), constexpr path -> value, argument path -> attributes (``tt.divisibility``),
    and the launch options (``num_warps``, ``num_stages``). Needs a compiled (not interpreted) kernel.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = captured.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*captured.args, **captured.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(captured.kwargs), bound,
                                                              specialization, options)
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs,
            "options": {"num_warps": options.num_warps, "num_stages": options.num_stages}}


def describe(spec: dict, kernel) -> Dict[str, list]:
    """Which runtime arguments the binder marked divisible by 16, which integers it left without that
    mark, and which integers it made the constant 1."""
    names = kernel.arg_names
    declared = {param.name for param in kernel.params if param.is_constexpr}
    divisible = [names[path[0]] for path, attributes in spec["attrs"].items()
                 if any(attribute[0] == "tt.divisibility" for attribute in attributes)]
    ones = [names[path[0]] for path, value in spec["constexprs"].items()
            if names[path[0]] not in declared and value == 1]
    integers = [name for name, kind in spec["signature"].items() if kind in ("i32", "i64", "u32", "u64")]
    return {"divisible_by_16": sorted(divisible), "not_divisible_by_16": sorted(set(integers) - set(divisible)),
            "equal_to_1": sorted(ones)}

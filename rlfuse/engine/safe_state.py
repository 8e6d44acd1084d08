"""Nested state stored as JSON plus safetensors: nothing in it is unpickled, so reading it runs no code.

A structure of ``dict`` (``str`` keys), ``list``, ``int``, ``float``, ``str``, ``bool``, ``None`` and
``torch.Tensor`` is split by :func:`flatten` into a JSON-able structure, each tensor replaced by a placeholder
``{"__tensor__": key}``, and the tensors by key (contiguous CPU clones, for ``safetensors.torch.save_file``,
which refuses tensors sharing storage). :func:`unflatten` puts them back. A tensor object that appears twice
is stored once and comes back as one object in both places. :mod:`rlfuse.engine.checkpoint` writes the two
halves as ``<name>.json`` and ``<name>.safetensors``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

TENSOR = "__tensor__"
_PLAIN = (bool, int, float, str)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def flatten(obj: Any, root: str = "state") -> Tuple[Any, Dict[str, torch.Tensor]]:
    """``(structure, tensors)``: ``obj`` with every tensor replaced by ``{"__tensor__": key}``, and the tensors
    (detached, contiguous CPU clones, so none shares storage) by key: the tensor's path in ``obj`` as a JSON
    pointer (``/replay/items/0/advantages``; ``~`` and ``/`` in a dict key written ``~0`` and ``~1``).

    Raises:
        TypeError: ``obj`` holds anything else (a tuple, a set, a dataclass, a numpy array or scalar, a
            non-``str`` dict key, a sparse tensor, a dict with the reserved key ``"__tensor__"``), naming its
            path, e.g. ``extra_state/replay/items/0/batch`` (``root`` first).
    """
    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[int, str] = {}

    def walk(value, path):
        if value is None or type(value) in _PLAIN:
            return value
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise TypeError(f"{root}{path} is a {value.layout} tensor; only dense tensors can be stored")
            if id(value) not in seen:
                seen[id(value)] = path
                tensors[path] = torch.empty(value.shape, dtype=value.dtype).copy_(value.detach())
            return {TENSOR: seen[id(value)]}
        if type(value) is list:
            return [walk(item, f"{path}/{i}") for i, item in enumerate(value)]
        if type(value) is dict:
            for key in value:
                if type(key) is not str or key == TENSOR:
                    why = "is reserved" if key == TENSOR else "is not a str"
                    raise TypeError(f"{root}{path} has the key {key!r}, which {why}; keys must be str")
            return {key: walk(item, f"{path}/{_escape(key)}") for key, item in value.items()}
        raise TypeError(f"{root}{path} is a {type(value).__qualname__}; only dict (str keys), list, int, float, "
                        "str, bool, None and torch.Tensor can be stored")

    return walk(obj, ""), tensors


def unflatten(structure: Any, tensors: Dict[str, torch.Tensor], root: str = "state") -> Any:
    """What :func:`flatten` took apart: ``structure`` with each placeholder replaced by its tensor.

    Raises:
        ValueError: a placeholder names a tensor ``tensors`` lacks, or ``tensors`` holds one no placeholder
            names, or ``structure`` holds a value JSON does not produce.
    """
    used = set()

    def walk(value, path):
        if value is None or type(value) in _PLAIN:
            return value
        if type(value) is list:
            return [walk(item, f"{path}/{i}") for i, item in enumerate(value)]
        if type(value) is dict:
            if TENSOR in value:
                key = value[TENSOR]
                if len(value) != 1 or type(key) is not str or key not in tensors:
                    raise ValueError(f"{root}{path} is a placeholder {value!r} for no stored tensor")
                used.add(key)
                return tensors[key]
            return {key: walk(item, f"{path}/{_escape(key)}") for key, item in value.items()}
        raise ValueError(f"{root}{path} is a {type(value).__qualname__}, which JSON does not produce")

    out = walk(structure, "")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{root} holds tensors that no placeholder names: {unused[:5]}")
    return out

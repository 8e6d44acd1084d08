"""Atomic checkpoints: weights (safetensors, a loadable HF folder), optimizer, RNG state, step, and the trainer's
other state (the replay buffer).

A checkpoint is written into a temporary folder beside the final one, then renamed into place, so an
interrupted run always keeps its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
EXTRA_STATE_FILE = "extra_state.pt"


def rng_state() -> Dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat_tensors(obj) -> list:
    """Every tensor inside ``obj``: nested dicts, lists, tuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, field.name) for field in dataclasses.fields(obj)]
    if isinstance(obj, (list, tuple)):
        return [tensor for value in obj for tensor in _flat_tensors(value)]
    return []


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (tied weights count once)."""
    seen = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            seen[(tensor.device, tensor.untyped_storage().data_ptr())] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


FILES_MARGIN = 8 * 2**20  # tokenizer, config and RNG files: a few MB for SmolLM2


def checkpoint_bytes(model, optimizer, extra_state: Optional[Dict[str, Any]] = None) -> int:
    """Bytes a checkpoint of ``model``, ``optimizer`` and ``extra_state`` takes on disk (an upper bound).

    The weights ``save_pretrained`` writes (a PEFT model writes only its adapters, the trainable tensors),
    every tensor of the optimizer's state (AdamW: two per trained parameter, once it has stepped), the tensors
    in ``extra_state``, and ``FILES_MARGIN`` for the small files.
    """
    if hasattr(model, "peft_config"):
        weights = [p for p in model.parameters() if p.requires_grad]
    else:
        weights = list(model.state_dict().values())
    optimizer_tensors = [t for per_param in optimizer.state.values() for t in per_param.values()]
    return (_tensor_bytes(weights) + _tensor_bytes(optimizer_tensors) + _tensor_bytes(_flat_tensors(extra_state))
            + FILES_MARGIN)


def check_free_space(output_dir: Path, needed: int) -> None:
    """Raise ``OSError`` (``errno.ENOSPC``) when ``output_dir``'s file system has less than ``needed`` bytes
    free, naming the sizes and the ways out, before anything is written."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"a checkpoint needs {needed / 2**30:.2f} GiB but {output_dir} has "
                                    f"{free / 2**30:.2f} GiB free; free some space, choose another --output-dir, "
                                    "or pass --save-every 0 (no checkpoints)")


def save_checkpoint(output_dir: Path, model, tokenizer, optimizer, state: Dict[str, Any],
                    extra_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``output_dir/checkpoint`` atomically and return its path.

    Contents: ``model.safetensors`` + config and tokenizer files (so ``--model output_dir/checkpoint``
    loads it), ``optimizer.pt``, ``rng_state.pt``, ``trainer_state.json`` (``state``: step and run info) and,
    when given, ``extra_state.pt`` (``extra_state``: picklable objects with CPU tensors, such as the replay
    buffer; read back by :func:`load_extra_state`).

    Raises:
        OSError: ``errno.ENOSPC`` when the disk lacks room for it (checked before writing: the previous
            checkpoint stays as it was), or any error of the write itself (the partial copy is removed, the
            previous checkpoint kept).
    """
    output_dir = Path(output_dir)
    check_free_space(output_dir, checkpoint_bytes(model, optimizer, extra_state))
    final, previous = output_dir / CHECKPOINT, output_dir / f"{CHECKPOINT}.old"
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(rng_state(), staging / "rng_state.pt")
        if extra_state is not None:
            torch.save(extra_state, staging / EXTRA_STATE_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def find_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint in ``output_dir`` (also one left as ``checkpoint.old`` by a crash mid-swap)."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        candidate = Path(output_dir) / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_training_state(checkpoint: Path, optimizer) -> Dict[str, Any]:
    """Restore optimizer and RNG state from ``checkpoint``; return its ``trainer_state.json``."""
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False))
    set_rng_state(torch.load(checkpoint / "rng_state.pt", weights_only=False))
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_extra_state(checkpoint: Path) -> Dict[str, Any]:
    """The ``extra_state`` saved in ``checkpoint`` (an empty dict for a checkpoint written without one)."""
    path = Path(checkpoint) / EXTRA_STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {}

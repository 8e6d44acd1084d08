"""Atomic, verified checkpoints that load without unpickling: weights (safetensors, a loadable HF folder),
optimizer, RNG state, step, and the trainer's other state (the replay buffer).

A checkpoint folder holds::

    model.safetensors, config and tokenizer files   what save_pretrained writes (adapter_* files under LoRA)
    optimizer.pt                                   optimizer.state_dict(): torch.save, read with weights_only=True
    rng_state.json + rng_state.safetensors         Python, NumPy, torch (and CUDA) random states
    extra_state.json + extra_state.safetensors     extra_state (the replay buffer), when given
    trainer_state.json                             the step and run info
    manifest.json                                  written last: bytes and SHA-256 of every other file

Nothing is read with pickle's ability to run code: tensors come from safetensors or ``torch.load(...,
weights_only=True)``, the rest from JSON (:mod:`rlfuse.engine.safe_state`). :func:`verify_checkpoint` checks
the folder against its manifest (torn, changed, added or missing files), and every loader turns a file it
cannot read into :class:`CheckpointError` naming it. A checkpoint is written into a temporary folder beside
the final one, then renamed into place, so an interrupted run always keeps its last complete checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlfuse.engine.safe_state import flatten, unflatten

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_STATE = "rng_state"  # rng_state.json + rng_state.safetensors
EXTRA_STATE = "extra_state"  # extra_state.json + extra_state.safetensors
FORMAT, VERSION = "rlfuse-checkpoint", 2
REQUIRED_FILES = (STATE_FILE, OPTIMIZER_FILE, f"{RNG_STATE}.json", f"{RNG_STATE}.safetensors")
WAY_ON = ("the checkpoint was changed or torn after rlfuse wrote it; resume from an intact copy, or start a new run "
          "(without --resume) from its weights with --model <path> only if you trust them")


class CheckpointError(ValueError):
    """A checkpoint rlfuse will not load: torn, changed, added to, of the old pickled format, or unreadable."""


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


def _rng_to_plain(state: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`rng_state` as JSON values and tensors: NumPy's (624,) uint32 MT19937 key as int64."""
    version, internal, gauss_next = state["python"]
    algorithm, key, pos, has_gauss, cached_gaussian = state["numpy"]
    plain = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
             "numpy": {"algorithm": str(algorithm), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": state["torch"]}
    if "cuda" in state:
        plain["cuda"] = list(state["cuda"])
    return plain


def _rng_from_plain(plain: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`_rng_to_plain`."""
    python, numpy = plain["python"], plain["numpy"]
    state = {"python": (python["version"], tuple(python["state"]), python["gauss_next"]),
             "numpy": (numpy["algorithm"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                       numpy["cached_gaussian"]),
             "torch": plain["torch"]}
    if "cuda" in plain:
        state["cuda"] = plain["cuda"]
    return state


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (tied weights count once)."""
    seen = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            seen[(tensor.device, tensor.untyped_storage().data_ptr())] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _flat_tensors(obj) -> list:
    """Every tensor inside ``obj``: nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [tensor for value in obj for tensor in _flat_tensors(value)]
    return []


FILES_MARGIN = 8 * 2**20  # tokenizer, config, RNG and manifest files: a few MB for SmolLM2


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


def _files(folder: Path) -> Dict[str, Path]:
    """Every entry below ``folder`` but its directories and ``manifest.json``, by relative POSIX path; a link
    (to a file or a folder) counts as a file, and is not followed."""
    found = {}
    for parent, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            path = Path(parent, name)
            found[path.relative_to(folder).as_posix()] = path
    found.pop(MANIFEST_FILE, None)
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: the format, version, and bytes and SHA-256 of every other file below ``folder``."""
    files = {name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for name, path in sorted(_files(folder).items())}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "files": files}, indent=1))


def _write_state(folder: Path, name: str, flat) -> None:
    """``flatten``'s ``(structure, tensors)`` as ``name.json`` and ``name.safetensors``."""
    structure, tensors = flat
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def save_checkpoint(output_dir: Path, model, tokenizer, optimizer, state: Dict[str, Any],
                    extra_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``output_dir/checkpoint`` atomically and return its path.

    Contents: ``model.safetensors`` + config and tokenizer files (so ``--model output_dir/checkpoint`` loads
    it), ``optimizer.pt``, ``rng_state.{json,safetensors}``, ``trainer_state.json`` (``state``: step and run
    info, JSON), when given ``extra_state.{json,safetensors}`` (``extra_state``: nested dict / list / int /
    float / str / bool / None / tensor, such as the replay buffer's state; read back by
    :func:`load_extra_state`), and last ``manifest.json`` (the bytes and SHA-256 of every other file).

    Raises:
        TypeError: ``extra_state`` holds anything else (the message names where), before anything is written.
        OSError: ``errno.ENOSPC`` when the disk lacks room for it (checked before writing: the previous
            checkpoint stays as it was), or any error of the write itself (the partial copy is removed, the
            previous checkpoint kept).
    """
    output_dir = Path(output_dir)
    if extra_state is not None and not isinstance(extra_state, dict):
        raise TypeError(f"extra_state must be a dict, got {type(extra_state).__qualname__}")
    extra = None if extra_state is None else flatten(extra_state, EXTRA_STATE)
    check_free_space(output_dir, checkpoint_bytes(model, optimizer, extra_state))
    final, previous = output_dir / CHECKPOINT, output_dir / f"{CHECKPOINT}.old"
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        _write_state(staging, RNG_STATE, flatten(_rng_to_plain(rng_state()), RNG_STATE))
        if extra is not None:
            _write_state(staging, EXTRA_STATE, extra)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        _write_manifest(staging)
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
    """The newest complete checkpoint in ``output_dir`` (also one left as ``checkpoint.old`` by a crash mid-swap):
    a folder with ``manifest.json``, or with ``trainer_state.json`` (an older, pickled one, which
    :func:`verify_checkpoint` refuses with the way on)."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        candidate = Path(output_dir) / name
        if (candidate / MANIFEST_FILE).is_file() or (candidate / STATE_FILE).is_file():
            return candidate
    return None


def _refuse_legacy(checkpoint: Path) -> None:
    """Raise :class:`CheckpointError` for a checkpoint of the pickled format: no manifest, ``rng_state.pt``."""
    if not (checkpoint / MANIFEST_FILE).is_file() and (checkpoint / "rng_state.pt").is_file():
        raise CheckpointError(
            f"{checkpoint} was written by an older rlfuse (rng_state.pt and no {MANIFEST_FILE}): its optimizer, "
            "RNG and replay state are pickles, which rlfuse no longer loads because unpickling can run any code, so "
            "it cannot be resumed. Its weights (model.safetensors, or the adapter files of a LoRA run, to merge into "
            f"the base model first) are safetensors: start a new run from them with --model {checkpoint} and a new "
            "--output-dir (without --resume); the optimizer moments, RNG state and replay buffer are not carried over")


def _manifest_files(checkpoint: Path) -> Dict[str, Dict[str, Any]]:
    """``manifest.json``'s ``files``, its structure checked."""
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {MANIFEST_FILE}: not a complete rlfuse checkpoint; {WAY_ON}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); {WAY_ON}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or type(manifest.get("files")) is not dict:
        raise CheckpointError(f"{path} is not an rlfuse checkpoint manifest (format {FORMAT!r} with files); {WAY_ON}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has version {manifest.get('version')!r}; this rlfuse reads version {VERSION} "
                              "(resume with the rlfuse that wrote it)")
    files = manifest["files"]
    for name, entry in files.items():
        size, sha = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if (name == MANIFEST_FILE or "\\" in name or any(part in ("", ".", "..") for part in name.split("/"))
                or type(size) is not int or size < 0 or not isinstance(sha, str) or len(sha) != 64
                or set(sha) - set("0123456789abcdef")):
            raise CheckpointError(f"{path} has a malformed entry {name!r}: {entry!r} (a relative path inside the "
                                  f"checkpoint to {{'bytes': int, 'sha256': hex}}); {WAY_ON}")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise CheckpointError(f"{path} does not list {unlisted}, which every rlfuse checkpoint holds; {WAY_ON}")
    return files


def verify_checkpoint(checkpoint: Path) -> None:
    """Check ``checkpoint`` against its ``manifest.json``: every listed file present, a regular file, of its
    size and SHA-256, and no other file (the sizes are checked before any file is hashed).

    Raises:
        CheckpointError: the manifest is missing, unreadable or malformed; a file is missing, truncated or
            extended, changed, a link, or not listed (an untrusted addition); or the checkpoint is of the older
            pickled format (``rng_state.pt`` and no manifest). The message names the folder, the file and the
            way on.
    """
    checkpoint = Path(checkpoint)
    _refuse_legacy(checkpoint)
    listed, present = _manifest_files(checkpoint), _files(checkpoint)
    for name in sorted(listed):
        if name not in present:
            raise CheckpointError(f"{checkpoint}: {name} is missing (the manifest lists it); {WAY_ON}")
        if present[name].is_symlink() or not present[name].is_file():
            raise CheckpointError(f"{checkpoint}: {name} is not a regular file (rlfuse writes no links); {WAY_ON}")
    added = sorted(set(present) - set(listed))
    if added:
        raise CheckpointError(f"{checkpoint}: {', '.join(added)} not listed in the manifest: an untrusted addition "
                              f"that rlfuse did not write; delete it only if you know what it is, else {WAY_ON}")
    for name in sorted(listed):
        size, expected = present[name].stat().st_size, listed[name]["bytes"]
        if size != expected:
            raise CheckpointError(f"{checkpoint}: {name} was truncated or extended: {size} bytes, the manifest says "
                                  f"{expected}; {WAY_ON}")
    for name in sorted(listed):
        if _sha256(present[name]) != listed[name]["sha256"]:
            raise CheckpointError(f"{checkpoint}: {name} changed since it was written (its SHA-256 is not the "
                                  f"manifest's); {WAY_ON}")


UNREADABLE = f"rlfuse loads only JSON, safetensors and weights-only torch files; {WAY_ON}"
MISFIT = ("resume with the model, --lora-rank and options of the run that wrote it, or start a new run (without "
          "--resume) from its weights with --model <path>")


def _read(path: Path, loader: Callable[[Path], Any], failure: str = "cannot be loaded", way_on: str = UNREADABLE):
    """``loader(path)``; any failure becomes :class:`CheckpointError` naming ``path``, ``failure`` and ``way_on``."""
    try:
        return loader(path)
    except Exception as error:
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path} {failure} ({type(error).__name__}: {detail}); {way_on}") from error


def _read_state(checkpoint: Path, name: str) -> Any:
    """What :func:`_write_state` wrote as ``name``."""
    structure = _read(checkpoint / f"{name}.json", lambda path: json.loads(path.read_text()))
    tensors = _read(checkpoint / f"{name}.safetensors", lambda path: load_file(str(path), device="cpu"))
    return _read(checkpoint / f"{name}.json", lambda path: unflatten(structure, tensors, name))


def load_training_state(checkpoint: Path, optimizer, verify: bool = True) -> Dict[str, Any]:
    """Restore optimizer and RNG state from ``checkpoint``; return its ``trainer_state.json``.

    Every file is read before anything is restored. ``verify=False`` skips :func:`verify_checkpoint` (which
    hashes every file) when the caller has just run it; the loaders stay safe either way.

    Raises:
        CheckpointError: as :func:`verify_checkpoint`; or a file cannot be loaded (a pickle that
            ``weights_only`` refuses, a safetensors header error, bad JSON), or the optimizer state does not fit
            ``optimizer``: the message names the file.
    """
    checkpoint = Path(checkpoint)
    _refuse_legacy(checkpoint)
    if verify:
        verify_checkpoint(checkpoint)
    saved = _read(checkpoint / OPTIMIZER_FILE, lambda path: torch.load(path, map_location="cpu", weights_only=True))
    rng = _read_state(checkpoint, RNG_STATE)
    state = _read(checkpoint / STATE_FILE, lambda path: json.loads(path.read_text()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint / STATE_FILE} holds a {type(state).__name__}, not a dict; {WAY_ON}")
    _read(checkpoint / OPTIMIZER_FILE, lambda path: optimizer.load_state_dict(saved), "does not fit this optimizer",
          MISFIT)
    _read(checkpoint / f"{RNG_STATE}.json", lambda path: set_rng_state(_rng_from_plain(rng)), "is not an RNG state")
    return state


def load_extra_state(checkpoint: Path, verify: bool = True) -> Dict[str, Any]:
    """The ``extra_state`` saved in ``checkpoint``, tensors on the CPU (an empty dict for a checkpoint written
    without one). ``verify`` as in :func:`load_training_state`.

    Raises:
        CheckpointError: as :func:`load_training_state`; or only one of the two files is there.
    """
    checkpoint = Path(checkpoint)
    _refuse_legacy(checkpoint)
    if verify:
        verify_checkpoint(checkpoint)
    if not any((checkpoint / f"{EXTRA_STATE}.{ext}").exists() for ext in ("json", "safetensors")):
        return {}
    extra = _read_state(checkpoint, EXTRA_STATE)
    if not isinstance(extra, dict):
        raise CheckpointError(f"{checkpoint / EXTRA_STATE}.json holds a {type(extra).__name__}, not a dict; {WAY_ON}")
    return extra

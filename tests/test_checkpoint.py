"""Checkpoints: atomic, verified against their manifest, loaded without unpickling, and RNG state round-trips."""

import errno
import hashlib
import json
import os
import pickle
import random
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlfuse.engine import checkpoint as ckpt
from rlfuse.engine.checkpoint import CheckpointError


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def save_pretrained(self, folder):
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(folder) / "model.safetensors"))


class TinyTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def make(tmp_path, device):
    model = TinyModel().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.linear(torch.randn(4, 3, device=device)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(tmp_path, device, extra_state=None, step=3):
    model, optimizer = make(tmp_path, device)
    return ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": step}, extra_state), model


def rewrite_manifest(folder):
    """The manifest an attacker who can write the folder computes: every file's bytes and SHA-256."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size,
                                                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"format": "rlfuse-checkpoint", "version": 2, "files": files}))


class Touch:
    """Unpickling it creates ``marker``: what a malicious checkpoint file would do with pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_save_and_load_round_trip(tmp_path, device):
    torch.manual_seed(123)
    path, model = save(tmp_path, device)
    expected = torch.rand(5)
    assert ckpt.find_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng_state.json", "rng_state.safetensors",
        "tokenizer.json", "trainer_state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "rlfuse-checkpoint" and manifest["version"] == 2
    assert manifest["files"]["model.safetensors"] == {
        "bytes": (path / "model.safetensors").stat().st_size,
        "sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()}
    assert len(manifest["files"]) == 6
    ckpt.verify_checkpoint(path)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = ckpt.load_training_state(path, fresh)
    assert state["step"] == 3
    assert torch.equal(torch.rand(5), expected)  # RNG restored to the moment of saving
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    assert fresh.state_dict()["param_groups"] == saved["param_groups"]
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(fresh.state_dict()["state"][index][key].cpu(), value), key
    assert ckpt.load_extra_state(path) == {}  # none given
    assert not list(tmp_path.glob(".checkpoint-*"))  # no staging folder left behind


def draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))


def test_rng_state_round_trips_exactly_through_safe_files(tmp_path, device):
    random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both, which must round-trip too
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    path, model = save(tmp_path, device)
    first = draws()
    ckpt.load_training_state(path, torch.optim.AdamW(model.parameters(), lr=0.1))
    again = draws()
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])
    python = json.loads((path / "rng_state.json").read_text())["python"]  # plain JSON, no pickle
    assert python["version"] == 3 and len(python["state"]) == 625
    memory = ckpt.rng_state()  # the in-memory form keeps working
    first = draws()
    ckpt.set_rng_state(memory)
    again = draws()
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])


def test_extra_state_round_trips_every_supported_value(tmp_path, device):
    base = torch.arange(12.0, device=device).reshape(3, 4)
    shared = torch.tensor([1, 2], dtype=torch.int32)
    extra = {
        "plain": {"int": 7, "big": 2**70, "float": 0.1, "nan": float("nan"), "str": "é/~x", "bool": True,
                  "none": None, "list": [1, [2.5, None], {}], "a/b~c": [], "": "empty key"},
        "tensors": [torch.tensor([True, False]), torch.zeros(0, 5), torch.zeros(2, 0, dtype=torch.bool),
                    torch.tensor(3.5, dtype=torch.float64), torch.ones(2, dtype=torch.bfloat16),
                    torch.arange(6, dtype=torch.uint8), base[:, 1], base.t(), base[1:]],  # views share storage
        "same": [shared, shared],
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    path, _ = save(tmp_path, device, extra)
    assert {"extra_state.json", "extra_state.safetensors"} <= {p.name for p in path.iterdir()}
    loaded = ckpt.load_extra_state(path)
    assert loaded["plain"]["nan"] != loaded["plain"]["nan"]
    loaded["plain"]["nan"] = extra["plain"]["nan"] = 0.0
    assert loaded["plain"] == extra["plain"] and type(loaded["plain"]["list"][1]) is list
    for old, new in zip(extra["tensors"], loaded["tensors"], strict=True):
        assert new.device.type == "cpu" and new.dtype == old.dtype and new.shape == old.shape
        assert torch.equal(new, old.cpu())
    assert loaded["same"][0] is loaded["same"][1] and torch.equal(loaded["same"][0], shared)
    assert not loaded["grad"].requires_grad and torch.equal(loaded["grad"], torch.full((2,), 2.0))
    (tmp_path / "empty").mkdir()
    assert ckpt.load_extra_state(save(tmp_path / "empty", device, {})[0]) == {}


class Point:
    pass


@pytest.mark.parametrize("value, path", [
    ({"a": [1, {"b": Point()}]}, "extra_state/a/1/b is a Point"),
    ({"a": np.zeros(2)}, "extra_state/a is a ndarray"),
    ({"a": {1, 2}}, "extra_state/a is a set"),
    ({"a": (1, 2)}, "extra_state/a is a tuple"),
    ({"a": np.float32(1)}, "extra_state/a is a float32"),
    ({"a": {1: "x"}}, "extra_state/a has the key 1"),
    ({"a": {"__tensor__": "x"}}, "extra_state/a has the key '__tensor__'"),
])
def test_unsupported_extra_state_raises_naming_where_before_writing(tmp_path, device, value, path):
    with pytest.raises(TypeError, match=re.escape(path)):
        save(tmp_path, device, value)
    assert list(tmp_path.iterdir()) == []


def test_malicious_optimizer_pickle_is_refused_and_never_run(tmp_path, device):
    path, model = save(tmp_path, device)
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Touch(tmp_path / "control")))  # the payload works when unpickled
    assert (tmp_path / "control").exists()
    torch.save({"state": {}, "param_groups": Touch(marker)}, path / "optimizer.pt")
    for load in (ckpt.verify_checkpoint, lambda p: ckpt.load_training_state(p, torch.optim.AdamW(model.parameters()))):
        with pytest.raises(CheckpointError, match=r"optimizer\.pt (was truncated or extended|changed since)"):
            load(path)
    rewrite_manifest(path)  # an attacker who rewrites the manifest passes verification, but not the loader
    ckpt.verify_checkpoint(path)
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError, match=r"optimizer\.pt cannot be loaded \(UnpicklingError") as error:
        ckpt.load_training_state(path, fresh)
    assert str(path) in str(error.value) and "--model" in str(error.value)
    assert not marker.exists() and fresh.state_dict()["state"] == {}


@pytest.mark.parametrize("name", ["rng_state.safetensors", "extra_state.safetensors"])
def test_pickle_in_place_of_safetensors_is_refused_and_never_run(tmp_path, device, name):
    path, model = save(tmp_path, device, {"replay": {"x": torch.ones(2)}})
    marker = tmp_path / "pwned"
    (path / name).write_bytes(pickle.dumps(Touch(marker)))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        ckpt.verify_checkpoint(path)
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=re.escape(f"{name} cannot be loaded (SafetensorError")):
        ckpt.load_training_state(path, torch.optim.AdamW(model.parameters()))
        ckpt.load_extra_state(path)  # reached when the pickle is the extra state's
    assert not marker.exists()


def test_torn_changed_added_and_missing_files_are_refused(tmp_path, device):
    path, _ = save(tmp_path, device, {"replay": {"x": torch.ones(3)}})
    weights = path / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-5])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors was truncated or extended: {len(intact) - 5} "
                                              rf"bytes, the manifest says {len(intact)}") as error:
        ckpt.verify_checkpoint(path)
    assert str(path) in str(error.value) and "resume from an intact copy" in str(error.value)
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors changed since it was written"):
        ckpt.verify_checkpoint(path)
    weights.write_bytes(intact)
    ckpt.verify_checkpoint(path)
    (path / "sub").mkdir()
    (path / "sub" / "adapter.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"sub/adapter\.bin not listed in the manifest: an untrusted addition"):
        ckpt.verify_checkpoint(path)
    (path / "sub" / "adapter.bin").unlink()
    (path / "extra_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"extra_state\.safetensors is missing"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("manifest, message", [
    (None, "has no manifest.json"),
    ("{not json", "manifest.json cannot be read"),
    ('{"format": "other", "version": 2, "files": {}}', "is not an rlfuse checkpoint manifest"),
    ('{"format": "rlfuse-checkpoint", "version": 3, "files": {}}', "has version 3"),
    ('{"format": "rlfuse-checkpoint", "version": 2, "files": {"../x": {"bytes": 1, "sha256": "00"}}}',
     "malformed entry '../x'"),
    ('{"format": "rlfuse-checkpoint", "version": 2, "files": {"x": 5}}', "malformed entry 'x'"),
    ('{"format": "rlfuse-checkpoint", "version": 2, "files": {}}', "does not list"),
])
def test_bad_manifest_is_refused(tmp_path, device, manifest, message):
    path, _ = save(tmp_path, device)
    (path / "manifest.json").unlink()
    if manifest is not None:
        (path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("name, content", [
    ("optimizer.pt", b"garbage"),
    ("rng_state.json", b"{"),
    ("rng_state.json", b'{"python": 1}'),  # leaves the stored tensors unnamed
    ("rng_state.json", lambda text: text.replace(b'"version": 3', b'"version": "x"')),  # random.setstate refuses
    ("rng_state.safetensors", lambda data: data[:-3]),  # truncated: a safetensors header error
    ("trainer_state.json", b"[1,"),
    ("extra_state.json", b'{"replay": {"__tensor__": "/nowhere"}}'),
])
def test_loader_failure_names_the_file_even_with_a_matching_manifest(tmp_path, device, name, content):
    path, model = save(tmp_path, device, {"replay": {"x": torch.ones(2)}})
    (path / name).write_bytes(content((path / name).read_bytes()) if callable(content) else content)
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path / name))):
        ckpt.load_training_state(path, torch.optim.AdamW(model.parameters()))
        ckpt.load_extra_state(path)  # reached when the broken file is the extra state's


def test_optimizer_of_another_model_does_not_fit(tmp_path, device):
    path, _ = save(tmp_path, device)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt does not fit this optimizer"):
        ckpt.load_training_state(path, other)


def test_legacy_pickled_checkpoint_is_found_then_refused_with_the_way_on(tmp_path, device):
    model, optimizer = make(tmp_path, device)
    legacy = tmp_path / "checkpoint"
    legacy.mkdir()
    model.save_pretrained(legacy)
    (legacy / "trainer_state.json").write_text('{"step": 5}')
    torch.save(optimizer.state_dict(), legacy / "optimizer.pt")
    torch.save(ckpt.rng_state(), legacy / "rng_state.pt")
    marker = tmp_path / "pwned"
    torch.save({"replay": Touch(marker)}, legacy / "extra_state.pt")
    assert ckpt.find_checkpoint(tmp_path) == legacy
    for load in (ckpt.verify_checkpoint, ckpt.load_extra_state, lambda p: ckpt.load_training_state(p, optimizer)):
        with pytest.raises(CheckpointError, match="older rlfuse") as error:
            load(legacy)
        for hint in (f"--model {legacy}", "new --output-dir", "without --resume", "model.safetensors", "not carried"):
            assert hint in str(error.value), hint
    assert not marker.exists()


def test_no_pickle_loading_in_rlfuse():
    """Every torch.load in the package passes weights_only=True; nothing calls pickle.load(s)."""
    root = Path(ckpt.__file__).parents[1]
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert "weights_only=False" not in text and not re.search(r"pickle\.loads?\(", text), source
        for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            assert "weights_only=True" in call, (source, call)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, device):
    model, optimizer = make(tmp_path, device)
    ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 2})
    found = ckpt.find_checkpoint(tmp_path)
    assert json.loads((found / ckpt.STATE_FILE).read_text())["step"] == 1
    ckpt.verify_checkpoint(found)
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_crash_between_renames_falls_back_to_old(tmp_path, device):
    model, optimizer = make(tmp_path, device)
    path = ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 4})
    path.rename(tmp_path / "checkpoint.old")  # the state after the first of the two renames
    found = ckpt.find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint.old"
    assert ckpt.load_training_state(found, optimizer)["step"] == 4


def test_incomplete_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"")
    assert ckpt.find_checkpoint(tmp_path) is None


class TiedModel(torch.nn.Module):
    """Input and output embeddings sharing one weight, as in SmolLM2: saved once."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight

    def save_pretrained(self, folder):
        from safetensors.torch import save_model

        save_model(self, str(Path(folder) / "model.safetensors"))


def test_checkpoint_bytes_bounds_what_is_written(tmp_path, device):
    model = TiedModel().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    expected_tensors = 50 * 8 * 4 * 3  # the tied weight once, AdamW's two moments once
    assert ckpt.checkpoint_bytes(model, optimizer) == 50 * 8 * 4 + ckpt.FILES_MARGIN  # no moments yet
    model.head(model.embed(torch.tensor([1, 2], device=device))).sum().backward()
    optimizer.step()
    estimate = ckpt.checkpoint_bytes(model, optimizer)
    assert estimate >= expected_tensors + ckpt.FILES_MARGIN  # + AdamW's step counter
    path = ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 1})
    written = sum(f.stat().st_size for f in path.iterdir())
    assert expected_tensors < written <= estimate


def test_full_disk_refuses_before_writing(tmp_path, monkeypatch, device):
    model, optimizer = make(tmp_path, device)
    ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 1})
    needed = ckpt.checkpoint_bytes(model, optimizer)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed - 1))
    with pytest.raises(OSError) as error:
        ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 2})
    assert error.value.errno == errno.ENOSPC
    assert str(tmp_path) in str(error.value) and "--save-every 0" in str(error.value)
    assert json.loads((ckpt.find_checkpoint(tmp_path) / ckpt.STATE_FILE).read_text())["step"] == 1
    assert not list(tmp_path.glob(".checkpoint-*"))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed))
    ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 2})  # exactly enough is enough

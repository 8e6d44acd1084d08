"""Checkpoints are atomic: a failure mid-write keeps the previous one, and RNG state round-trips."""

import errno
import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from rlfuse.engine import checkpoint as ckpt


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def save_pretrained(self, folder):
        torch.save(self.state_dict(), Path(folder) / "weights.pt")


class TinyTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def make(tmp_path, device):
    model = TinyModel().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.linear(torch.randn(4, 3, device=device)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_and_load_round_trip(tmp_path, device):
    model, optimizer = make(tmp_path, device)
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 3})
    expected = torch.rand(5)
    assert ckpt.find_checkpoint(tmp_path) == path
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = ckpt.load_training_state(path, fresh)
    assert state["step"] == 3
    assert torch.equal(torch.rand(5), expected)  # RNG restored to the moment of saving
    old_state = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], old_state)
    assert not list(tmp_path.glob(".checkpoint-*"))  # no staging folder left behind


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
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_crash_between_renames_falls_back_to_old(tmp_path, device):
    model, optimizer = make(tmp_path, device)
    path = ckpt.save_checkpoint(tmp_path, model, TinyTokenizer(), optimizer, {"step": 4})
    path.rename(tmp_path / "checkpoint.old")  # the state after the first of the two renames
    found = ckpt.find_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint.old"
    assert json.loads((found / ckpt.STATE_FILE).read_text())["step"] == 4


def test_incomplete_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
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

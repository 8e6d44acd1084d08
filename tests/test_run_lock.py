"""One run per output folder: a live holder refuses a second run, a dead one's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from rlfuse.engine.run_lock import LOCK_FILE, RunLock, RunLockedError


def write_lock(folder, pid, host=None):
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": "2026-12-03 10:00:00"}))


@pytest.fixture
def live_pid():
    """The pid of another live process on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_pid_and_host_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path).acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    lock.release()  # idempotent


def test_a_live_holder_refuses_a_second_run(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunLockedError, match=f"in use by another rlfuse run \\(pid {live_pid} on"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid  # left alone


def test_a_holder_on_another_host_is_never_taken_over(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid, host="another-host.example")
    with pytest.raises(RunLockedError, match="another-host.example"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("content", ["dead", "garbage"])
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, dead_pid, content):
    if content == "dead":
        write_lock(tmp_path, dead_pid)
    else:
        (tmp_path / LOCK_FILE).write_text("{not json")  # torn by a crash while being written
    lines = []
    lock = RunLock(tmp_path, log=lines.append).acquire()
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over the stale lock" in lines[0]
    if content == "dead":
        assert f"pid {dead_pid}, which is not running" in lines[0]


def test_release_leaves_a_lock_another_process_took(tmp_path, live_pid):
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, live_pid)  # someone deleted ours by hand and started a run
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid


def test_rlfuse_train_refuses_a_folder_in_use(tmp_path, live_pid, capsys):
    from rlfuse.engine.cli import main

    write_lock(tmp_path, live_pid)
    assert main(["train", "--output-dir", str(tmp_path), "--resume"]) == 2
    assert f"in use by another rlfuse run (pid {live_pid}" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid

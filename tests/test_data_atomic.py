"""data/atomic.py: atomic writes (fsync, rename, directory fsync, nothing left on failure) and the
exclusive lock (serializes, says what it waits for, survives a killed holder)."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import data.atomic as atomic
from data.atomic import atomic_open, atomic_write, exclusive_lock, make_temp_dir, remove_temps

REPO = Path(__file__).resolve().parent.parent


def test_atomic_write_replaces_whole_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "meta.json"
    atomic_write(path, "old")
    atomic_write(path, "néw ✓")  # str is written as UTF-8
    assert path.read_bytes() == "néw ✓".encode()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "train.bin"
    path.write_bytes(b"complete")
    with pytest.raises(type(error)), atomic_open(path, "wb") as f:
        f.write(b"half")
        raise error
    assert path.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["train.bin"]


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write(tmp_path / "x", b"data")
    assert synced == ["file", "dir"]


def test_new_files_and_dirs_follow_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", b"x")
        d = make_temp_dir(tmp_path / "built")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644  # tempfile.mkstemp would give 0o600
    assert d.stat().st_mode & 0o777 == 0o755 and d.name.startswith(".built.tmp-")


def test_remove_temps_removes_only_that_files_leftovers(tmp_path):
    (tmp_path / ".data.bin.tmp-dead").write_bytes(b"half")
    (tmp_path / ".data.bin.tmp-dir").mkdir()
    (tmp_path / ".data.bin.tmp-dir" / "x").write_bytes(b"half")
    (tmp_path / ".other.bin.tmp-live").write_bytes(b"someone else's")
    (tmp_path / "data.bin").write_bytes(b"whole")
    removed = remove_temps(tmp_path / "data.bin")
    assert sorted(p.name for p in removed) == [".data.bin.tmp-dead", ".data.bin.tmp-dir"]
    assert sorted(os.listdir(tmp_path)) == [".other.bin.tmp-live", "data.bin"]


def test_lock_serializes_and_logs_what_it_waits_for(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(atomic, "LOCK_POLL_S", 0.02)
    monkeypatch.setattr(atomic, "LOCK_LOG_EVERY_S", 0.1)
    lock = tmp_path / ".thing.lock"
    inside: list[str] = []
    held = threading.Event()

    def holder():
        with exclusive_lock(lock):
            inside.append("holder in")
            held.set()
            time.sleep(0.45)
            inside.append("holder out")

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with caplog.at_level(logging.INFO, logger="data.atomic"):
        with exclusive_lock(lock, waiting_for="the thing", status=lambda: "3.0 MB written so far"):
            inside.append("waiter in")
    t.join()
    assert inside == ["holder in", "holder out", "waiter in"]
    waits = [r.getMessage() for r in caplog.records if "waiting for the thing" in r.getMessage()]
    assert len(waits) >= 3  # at once, then every LOCK_LOG_EVERY_S
    assert "3.0 MB written so far" in waits[0] and str(lock) in waits[0]


def test_lock_timeout_zero_tries_once(tmp_path):
    lock = tmp_path / ".x.lock"
    with exclusive_lock(lock):
        with pytest.raises(TimeoutError, match="locked by another process"):
            with exclusive_lock(lock, timeout_s=0):
                pass
    with exclusive_lock(lock, timeout_s=0):  # free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / ".x.lock"
    code = ("import sys, time; from data.atomic import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError):
            with exclusive_lock(lock, timeout_s=0):
                pass
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert lock.exists()  # the killed holder's file stays, unlocked: the OS dropped its lock
    with exclusive_lock(lock, timeout_s=0):
        pass


def test_write_modes_only(tmp_path):
    with pytest.raises(ValueError, match="writes whole files"):
        with atomic_open(tmp_path / "x", "ab"):
            pass

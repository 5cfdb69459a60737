"""Prepared data that a kill, a full disk or bit rot has damaged: prepare() rebuilds it with a warning
naming the file, readers given the directory stop with one line naming it, a killed
`python -m data.prepare` leaves nothing that the next run trips over, and directories prepared
before meta.json recorded checksums still load."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import names_besides_locks

import data.prepare as prep
from data.config import DataConfig, DataError
from data.loader import BatchLoader
from data.prepare import prepare, read_meta
from data.prepared import check_prepared
from data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = "".join(f"line {i}: a quiet river runs by the old mill {i % 11}\n" for i in range(800))


@pytest.fixture
def cfg(tmp_path) -> DataConfig:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return DataConfig(source="files", path=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_key(path: Path, key: str) -> None:
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


# (file, damage, what the warning and the error say)
DAMAGE = [
    ("meta.json", lambda p: _truncate(p, 20), r"meta\.json is truncated \(Expecting"),
    ("meta.json", lambda p: p.write_text('{"format_version": 1} trailing'), r"meta\.json is not valid JSON"),
    ("meta.json", lambda p: p.write_text(""), r"meta\.json is empty"),
    ("meta.json", lambda p: _drop_key(p, "dtype"), r"meta\.json lacks dtype"),
    ("train.bin", lambda p: _truncate(p, 100), r"train\.bin is truncated: 100 bytes, but meta\.json records \d+ uint16"),
    ("val.bin", lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), r"val\.bin is longer than recorded"),
    ("train.bin", _flip_a_byte, r"train\.bin is corrupt: its sha256 differs"),
    ("val.bin", lambda p: p.unlink(), r"val\.bin is missing"),
    ("tokenizer.json", lambda p: _truncate(p, 10), r"tokenizer\.json is truncated"),
    ("tokenizer.json", _flip_a_byte, r"tokenizer\.json is (corrupt|not valid JSON)"),
]


@pytest.mark.parametrize(("name", "damage", "message"), DAMAGE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DAMAGE)])
def test_damaged_prepared_data_is_rebuilt_with_a_warning_naming_the_file(cfg, name, damage, message):
    out = prepare(cfg, progress=False)
    good = {f: (out / f).read_bytes() for f in ("train.bin", "val.bin", "tokenizer.json")}
    damage(out / name)
    problem = check_prepared(out)
    assert problem is not None and problem.path == out / name
    with pytest.warns(UserWarning, match=rf"prepared data {out}/{message}.*; rebuilding"):
        again = prepare(cfg, progress=False)
    assert again == out and check_prepared(out) is None
    assert {f: (out / f).read_bytes() for f in good} == good
    assert names_besides_locks(out.parent) == [out.name]  # no temporary dir


def test_readers_of_a_damaged_directory_stop_with_one_line_naming_the_file(cfg):
    out = prepare(cfg, progress=False)
    _truncate(out / "meta.json", 20)
    for read in (read_meta, load_tokenizer, lambda d: BatchLoader(d, "train", 2, 8)):
        with pytest.raises(DataError, match=rf"prepared data {out}/meta\.json is truncated .*prepare it again") as info:
            read(out)
        assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="rebuilding"):
        prepare(cfg, progress=False)
    _truncate(out / "tokenizer.json", 5)
    with pytest.raises(DataError, match=rf"{out}/tokenizer\.json is truncated"):
        load_tokenizer(out)
    with pytest.warns(UserWarning, match="rebuilding"):
        prepare(cfg, progress=False)
    _truncate(out / "val.bin", 7)
    with pytest.raises(DataError, match=rf"{out}/val\.bin is truncated: 7 bytes"):
        BatchLoader(out, "val", 2, 8)
    (out / "meta.json").write_text(json.dumps({**read_meta_raw(out), "format_version": 99}))
    with pytest.raises(DataError, match=r"meta\.json is from format 99, this code reads 1"):
        read_meta(out)


def read_meta_raw(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def test_data_prepared_before_checksums_were_recorded_still_loads_without_a_rebuild(cfg, monkeypatch):
    out = prepare(cfg, progress=False)
    meta = read_meta_raw(out)
    for key in ("files", "revision"):  # what this format's earlier meta.json did not have
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    monkeypatch.setattr(prep, "_build", lambda *a: pytest.fail("must not rebuild"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare(cfg, progress=False) == out
    x, _ = BatchLoader(out, "train", 2, 8).next_batch()
    assert load_tokenizer(out).decode(x[0].tolist()) in TEXT
    # Old directories are still checked by size: a cut-short one is rebuilt.
    monkeypatch.undo()
    _truncate(out / "train.bin", 64)
    with pytest.warns(UserWarning, match=r"train\.bin is truncated: 64 bytes"):
        prepare(cfg, progress=False)
    assert "files" in read_meta(out)


def test_leftovers_of_killed_builds_are_removed_unless_that_build_is_alive(cfg, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".files-char-0123456789abcdef.tmp-dead"  # another dataset, its builder killed
    dead.mkdir()
    (dead / ".train.bin.tmp-1234").write_bytes(b"half")
    (cache / ".files-char-0123456789abcdef.lock").touch()  # its lock file, no longer locked (the OS released it)
    live = cache / ".files-char-fedcba9876543210.tmp-live"  # another dataset, being built right now
    live.mkdir()
    from data.atomic import exclusive_lock

    with exclusive_lock(cache / ".files-char-fedcba9876543210.lock"):
        out = prepare(cfg, progress=False)
        assert names_besides_locks(cache) == sorted([out.name, live.name])


def test_a_full_disk_is_one_line_and_leaves_nothing(cfg, tmp_path, monkeypatch):
    def full(docs, tok, path, *args):
        path.with_name(".partial").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prep, "_write_split", full)
    with pytest.raises(DataError, match=r"cannot write prepared data .*train\.bin \(No space left on device\); "
                                        r"free disk space") as info:
        prepare(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert names_besides_locks(tmp_path / "cache") == []


def _cli(cache: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "data.prepare", "data=files", f"data.path={corpus}", f"data.cache_dir={cache}",
            "progress=false"]


def test_killed_prepare_then_rerun_succeeds_and_leaves_no_leftovers(tmp_path):
    corpus = tmp_path / "big.txt"
    line = "".join(chr(0x41 + i % 58) for i in range(79)) + "\n"
    corpus.write_text(line * 300_000, encoding="utf-8")  # 24 MB: encoding takes a moment
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CAUSALGPT_CACHE", None)
    child = subprocess.Popen(_cli(cache, corpus), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(cache.glob(".files-char-*.tmp-*/.train.bin.tmp-*")):  # mid-way through train.bin
            assert child.poll() is None, "prepare finished before it could be killed; use a bigger corpus"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    assert list(cache.glob(".files-char-*.tmp-*"))  # what the kill left behind
    done = subprocess.run(_cli(cache, corpus), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = Path(done.stdout.strip().splitlines()[-1])
    assert names_besides_locks(cache) == [out.name]
    assert read_meta(out)["tokens"]["train"] == int(len(line) * 300_000 * 0.9)
    assert np.fromfile(out / "val.bin", dtype=np.uint16).size == read_meta(out)["tokens"]["val"]
    assert "Traceback" not in done.stderr

    # A meta.json cut short (the issue's `Expecting ':' delimiter`): one warning naming it, rebuilt.
    (out / "meta.json").write_bytes((out / "meta.json").read_bytes()[:20])
    again = subprocess.run(_cli(cache, corpus), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"prepared data {out}/meta.json is truncated (Expecting" in again.stderr
    assert "rebuilding" in again.stderr and "Traceback" not in again.stderr
    assert Path(again.stdout.strip().splitlines()[-1]) == out and check_prepared(out) is None
    shutil.rmtree(cache)

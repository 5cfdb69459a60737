"""Atomic file writes, and the exclusive lock that the builder of a shared file or directory holds.

A file written here is never seen half-written under its final name, after a kill or a power cut:
the bytes go to `.<name>.tmp-<random>` beside it, are fsync'ed, replace the final name, and the
directory is fsync'ed so that the rename is durable. `remove_temps` deletes what a killed writer
left, where no other writer can be running (under `exclusive_lock`). Standard library and filelock
only, so engine/ (checkpoints, exports) uses it without the rest of data/.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO

import filelock

log = logging.getLogger(__name__)

TEMP_INFIX = ".tmp-"
# How often a process waiting for a lock tries it again, and how often it says that it waits.
LOCK_POLL_S = 0.5
LOCK_LOG_EVERY_S = 60.0


def temp_prefix(path: str | os.PathLike) -> str:
    """The name prefix of path's temporary files and directories: `.<name>.tmp-`."""
    return f".{Path(path).name}{TEMP_INFIX}"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that the files created, renamed or removed in it stay so after a crash."""
    if os.name == "nt":  # directories cannot be opened there; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (certain network and FUSE mounts) do not fsync directories
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _new_temp(path: Path, make: Callable[[Path], None]) -> Path:
    # os.open/os.mkdir with a random name instead of tempfile.mkstemp/mkdtemp: those create mode
    # 0600/0700 entries, and a cache shared by a team must keep the umask's permissions.
    while True:
        candidate = path.parent / f"{temp_prefix(path)}{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):  # taken: draw another name
            make(candidate)
            return candidate


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside path (`.<name>.tmp-<random>`) in which to build path whole."""
    return _new_temp(Path(path), lambda p: os.mkdir(p, 0o777))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[bytes]]:
    """Write path (binary) through a temporary file: on success it replaces path (fsync, rename,
    directory fsync); on an error or interrupt it is removed and path stays as it was."""
    if mode != "wb":
        raise ValueError(f"atomic_open writes whole files; mode={mode!r} is not wb")
    path = Path(path)
    tmp = _new_temp(path, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write data (str as UTF-8) to path atomically: the old content or the new, never a mix."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def remove_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that writers of path left beside it; returns them.
    Call it only where no writer of path is running (under its lock), or a live write is lost."""
    path = Path(path)
    removed = sorted(path.parent.glob(f"{temp_prefix(path)}*"))  # none when the directory does not exist
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, waiting_for: str = "another process holding the lock",
                   status: Callable[[], str] | None = None, timeout_s: float | None = None) -> Iterator[None]:
    """Hold `filelock.FileLock(path)` (an OS lock) for the block. A waiter logs what it waits for at
    once and then every LOCK_LOG_EVERY_S; TimeoutError after timeout_s when given (0 tries once). The
    OS releases a dead holder's lock; the file stays (deleting it would let a waiter lock a file no
    one else opens)."""
    lock = filelock.FileLock(path)
    start = time.monotonic()
    wait = 0.0  # the first try does not wait, so that a waiter says at once what it waits for
    while True:
        try:
            held = lock.acquire(timeout=wait, poll_interval=LOCK_POLL_S)  # a context manager that releases
            break
        except filelock.Timeout:
            waited = time.monotonic() - start
            if timeout_s is not None and waited >= timeout_s:
                raise TimeoutError(f"{path} is locked by another process") from None
            detail = f"{status()}, " if status is not None else ""
            log.info("waiting for %s (%swaited %s; lock %s)", waiting_for, detail, timedelta(seconds=round(waited)), path)
            wait = LOCK_LOG_EVERY_S if timeout_s is None else min(LOCK_LOG_EVERY_S, timeout_s - waited)
    with held:
        yield

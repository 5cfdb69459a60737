"""Atomic file writes, and the exclusive lock that the builder of a shared file or directory holds.

A file written here is never seen half-written under its final name, neither after a kill nor
after a power cut: the bytes go to a temporary file beside it (`.<name>.tmp-<random>`, in the same
directory so the rename cannot cross file systems), are flushed and fsync'ed, the temporary file
replaces the final name (os.replace), and the directory is fsync'ed so that the rename itself is
durable. On an error or an interrupt the temporary file is removed; the temporary files of a killed
writer are what `remove_temps` deletes, where no other writer of the same file can be running
(e.g. under `exclusive_lock`).

- atomic_write(path, data)          bytes or str, in one call
- atomic_open(path, mode)           a context manager yielding the file object, for streamed writes
- make_temp_dir(path)               an empty directory beside path, to build a whole directory in
- fsync_dir(path)                   make creations, renames and removals in a directory durable
- remove_temps(path)                delete what killed writers of path left beside it
- exclusive_lock(path, ...)         an flock held for a block, waited for with a log line a minute

Standard library only: data/ uses it for prepared data, tokenizers and downloads, and engine/
(checkpoints, metrics, exports) can use it without importing anything else of data/.
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
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# False where exclusive_lock cannot lock (it then runs its block unlocked).
LOCKS_AVAILABLE = fcntl is not None
TEMP_INFIX = ".tmp-"
# How often a process waiting for a lock tries it again, and how often it says that it waits.
LOCK_POLL_S = 0.5
LOCK_LOG_EVERY_S = 60.0
_WRITE_MODES = ("w", "wb", "wt")


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
    except OSError as e:
        # Some file systems (certain network and FUSE mounts) do not fsync directories at all.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _new_temp(path: Path, make: Callable[[Path], None]) -> Path:
    # os.open/os.mkdir with a random name instead of tempfile.mkstemp/mkdtemp: those create mode
    # 0600/0700 entries, and a cache shared by a team must keep the umask's permissions.
    while True:
        candidate = path.parent / f"{temp_prefix(path)}{secrets.token_hex(4)}"
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside path (`.<name>.tmp-<random>`) in which to build path whole."""
    return _new_temp(Path(path), lambda p: os.mkdir(p, 0o777))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Write path through a temporary file: on success it replaces path (fsync, rename, directory
    fsync); on an error or interrupt it is removed and path stays as it was. kwargs go to open()."""
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_open writes whole files; mode={mode!r} is not one of {', '.join(_WRITE_MODES)}")
    path = Path(path)
    tmp = _new_temp(path, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> None:
    """Write data (str is encoded) to path atomically: the old content or the new, never a mix."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode(encoding) if isinstance(data, str) else data)


def remove_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories that writers of path left beside it; returns them.
    Call it only where no writer of path is running (under its lock), or a live write is lost."""
    path = Path(path)
    removed = sorted(path.parent.glob(f"{temp_prefix(path)}*")) if path.parent.is_dir() else []
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    return removed


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike,
    *,
    waiting_for: str = "another process holding the lock",
    status: Callable[[], str] | None = None,
    timeout_s: float | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on path (created if needed) for the block; the file is deleted on exit.

    While another process holds it, this one tries again every LOCK_POLL_S seconds and logs, at once
    and then every LOCK_LOG_EVERY_S, what it waits for (`waiting for <waiting_for> (<status()>,
    waited N min)`). No collective and no timeout are involved unless timeout_s is given
    (TimeoutError after it; 0 tries once). A killed holder leaves no stale lock: the kernel drops a
    dead process's flock, and the next holder reuses the file and deletes it. Without fcntl (not
    POSIX) or on a file system without locks, the block runs unlocked, with a log line saying so.
    """
    fd = _acquire(Path(path), waiting_for, status, timeout_s)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # a lock file that stays behind is harmless
                os.unlink(path)
            os.close(fd)  # releases the lock


def _acquire(path: Path, waiting_for: str, status: Callable[[], str] | None, timeout_s: float | None) -> int | None:
    """A descriptor of path holding its flock, or None where there are no locks."""
    if fcntl is None:
        log.info("no file locks on this platform; %s is not locked", path)
        return None
    start = time.monotonic()
    next_log = start
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    log.info("the file system of %s has no locks (%s); going on unlocked", path, e.strerror)
                    os.close(fd)
                    return None
                now = time.monotonic()
                if timeout_s is not None and now - start >= timeout_s:
                    raise TimeoutError(f"{path} is locked by another process")
                if now >= next_log:
                    detail = f"{status()}, " if status is not None else ""
                    log.info("waiting for %s (%swaited %s; lock %s)", waiting_for, detail, _duration(now - start), path)
                    next_log = now + LOCK_LOG_EVERY_S
                time.sleep(LOCK_POLL_S)
            # The holder before us deletes the file before releasing it; if it did so after we opened
            # it, we hold a lock on a file no one else will ever open: open the path again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

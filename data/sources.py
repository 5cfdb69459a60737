"""Where raw text comes from: tiny Shakespeare, the Python standard library, local files, HF datasets.

`open_corpus(cfg)` returns a `Corpus` (data/corpus.py) whose identity is computed without reading
everything. Text sources are split by characters as nanoGPT does (the first int(n * (1 -
val_fraction)) train), so val losses on Shakespeare compare with nanoGPT's. The HF source is
data/hf_datasets.py.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import sysconfig
import urllib.request
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

from data.atomic import atomic_write, exclusive_lock, remove_temps
from data.config import DataConfig, DataError, warn_user
from data.corpus import Corpus, resolve_files, take_chars
from data.hf_datasets import hf_corpus

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 15.0


def open_corpus(cfg: DataConfig, cache_root: Path) -> Corpus:
    """The corpus cfg asks for; for shakespeare_char without network, the fallback (with a warning)."""
    match cfg.source:
        case "shakespeare_char":
            return _shakespeare(cfg, cache_root)
        case "python_stdlib":
            return _python_stdlib(cfg)
        case "files":
            return _files(cfg)
        case "hf":
            return hf_corpus(cfg, cache_root)
        case _:  # DataConfig.__post_init__ refuses these already
            raise DataError(f"data.source={cfg.source!r} is not a known source")


# --- text sources: whole text in memory, split by characters ------------------------------------


def _text_corpus(name: str, identity: dict, load: Callable[[], list[str]], cfg: DataConfig, info: dict) -> Corpus:
    @functools.cache  # read once, on first use
    def split_text() -> tuple[list[str], int, int]:  # the texts, their characters, where val starts
        texts = load()
        if not (total := sum(map(len, texts))):
            raise DataError(f"the {name} corpus has no text; give a non-empty input")
        return texts, total, int(total * (1 - cfg.val_fraction))  # nanoGPT: data[: int(n * 0.9)]

    def chars(split: str) -> int:
        _, total, cut = split_text()
        return cut if split == "train" else total - cut

    def docs(split: str) -> Iterator[str]:
        texts, _, cut = split_text()
        pos = 0
        for text in texts:
            lo, pos = pos, pos + len(text)
            if split == "train" and lo < cut and text:
                yield text[: cut - lo]
            elif split == "val" and pos > cut and text:
                yield text[max(cut - lo, 0) :]

    return Corpus(name=name, identity=identity, docs=docs, info=info, chars=chars)


def decode_utf8(data: bytes, where: str, errors: str) -> str:
    """Bytes to text; a bad byte under errors=strict is a DataError naming the file and offset."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 at byte offset {e.start} ({e.reason}); fix the file or set data.errors=replace"
        ) from None


def fetch_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Download url (tests monkeypatch this to simulate being offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _shakespeare(cfg: DataConfig, cache_root: Path) -> Corpus:
    if cfg.path is not None:
        paths = cfg.paths
        if len(paths) != 1:
            raise DataError(f"data.path for shakespeare_char must be one file, got {len(paths)} paths")
        path = Path(paths[0]).expanduser()
        if not path.is_file():
            raise DataError(f"data.path={paths[0]!r}: no such file; point it at a copy of tiny Shakespeare")
        raw = path.read_bytes()
        if (sha := hashlib.sha256(raw).hexdigest()) != SHAKESPEARE_SHA256:  # their choice, but say so
            warn_user(f"{path} is not the canonical tiny Shakespeare (sha256 {sha[:12]}..., expected "
                      f"{SHAKESPEARE_SHA256[:12]}...); using it anyway, but val losses will not compare with nanoGPT's")
        where = str(path)
    else:
        cached = cache_root / "raw" / "tinyshakespeare.txt"
        try:
            raw = _cached_shakespeare(cached)
        except ShakespeareUnavailable as e:
            why = f"tiny Shakespeare is not cached and could not be downloaded ({e})"
            if cfg.fallback is None:
                raise DataError(f"{why}; download it and pass data.path=/path/to/input.txt") from None
            warn_user(f"{why}; using the offline {cfg.fallback} corpus instead. To train on Shakespeare offline, "
                      f"copy {SHAKESPEARE_URL} to this machine and pass data.path=/path/to/input.txt")
            corpus = _python_stdlib(cfg)
            corpus.info.update(requested_source="shakespeare_char", fallback_reason=str(e))
            return corpus
        sha, where = SHAKESPEARE_SHA256, str(cached)
    text = decode_utf8(raw, where, cfg.errors)
    info = {"path": where, "sha256": sha, "chars": len(text)}
    return _text_corpus("shakespeare_char", {"sha256": sha}, lambda: [text], cfg, info)


class ShakespeareUnavailable(Exception):
    """Download failed or gave the wrong bytes (internal: turned into a fallback or a DataError)."""


def _valid_copy(path: Path, say: bool = True) -> bytes | None:
    """The cached copy's bytes when they are tiny Shakespeare's, else None (warning when say)."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256:
        return raw
    if say:
        warn_user(f"the cached copy {path} is truncated or corrupt ({len(raw)} bytes, wrong sha256); downloading it again")
    return None


def _cached_shakespeare(cached: Path) -> bytes:
    """Tiny Shakespeare from the cache, else downloaded into it atomically, one process at a time
    (the others wait on the lock, then find the copy); what a killed download left is removed."""
    if (raw := _valid_copy(cached)) is not None:
        return raw
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(cached.parent / f".{cached.name}.lock", waiting_for=f"another process downloading {cached}"):
            if (raw := _valid_copy(cached, say=False)) is not None:  # downloaded by another process meanwhile
                return raw
            remove_temps(cached)
            log.info("downloading tiny Shakespeare from %s", SHAKESPEARE_URL)
            try:
                raw = fetch_url(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S)
            except OSError as e:  # URLError, timeouts and resets are all OSErrors
                raise ShakespeareUnavailable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
            if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
                raise ShakespeareUnavailable("the download has the wrong sha256 checksum")
            atomic_write(cached, raw)
            return raw
    except OSError as e:
        raise DataError(f"cannot write the tiny Shakespeare copy {e.filename or cached} ({e.strerror}); free disk "
                        "space, or set data.cache_dir to a writable directory") from None


def _python_stdlib(cfg: DataConfig) -> Corpus:
    """pydoc's topic texts, then the standard library's .py files in sorted path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)  # sorted in place: os.walk's order is the fs's
        files += [Path(root) / n for n in sorted(names) if n.endswith(".py")]
    listing = "\n".join(f"{p.relative_to(stdlib)}:{p.stat().st_size}" for p in files)
    identity = {"python": sys.version, "stdlib": str(stdlib), "max_chars": cfg.max_chars,
                "files": hashlib.sha256(listing.encode()).hexdigest()}

    def load() -> list[str]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data; the .py files are enough
            topics = {}
        # A few stdlib files declare other encodings; replacing keeps the corpus offline-safe.
        sources = (p.read_bytes().decode("utf-8", errors="replace") for p in files)
        return list(take_chars(chain((topics[k] for k in sorted(topics)), sources), cfg.max_chars))

    info = {"stdlib": str(stdlib), "python": sys.version.split()[0], "max_chars": cfg.max_chars}
    return _text_corpus("python_stdlib", identity, load, cfg, info)


def _files(cfg: DataConfig) -> Corpus:
    files = resolve_files(cfg.paths)
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity = {"files": stats, "errors": cfg.errors}

    def load() -> list[str]:
        texts = [decode_utf8(p.read_bytes(), str(p), cfg.errors) for p in files]
        if not any(texts):
            raise DataError(f"data.path={cfg.path!r}: all {len(files)} files are empty; give files with text")
        return texts

    info = {"files": len(files), "bytes": sum(s[1] for s in stats), "first": str(files[0])}
    return _text_corpus("files", identity, load, cfg, info)

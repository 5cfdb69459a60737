"""Where raw text comes from: tiny Shakespeare, the Python standard library, local files, HF datasets.

`open_corpus(cfg)` returns a `Corpus`: the source actually used, a JSON-able identity of its content
(what the cache fingerprint hashes, computed without reading everything) and `docs(split)`. Text
sources are split by characters as nanoGPT does, so val losses on Shakespeare compare with its.
HF datasets are split by data.hf_val_split, else the last val_fraction of the documents (streaming:
every round(1/val_fraction)-th one); a hub dataset loads at the commit data/hub.py resolves, never
runs repository code, and `datasets` is imported only when a split is loaded.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import sys
import sysconfig
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from data.atomic import atomic_write, exclusive_lock, remove_temps
from data.config import DataConfig, DataError, first_line, warn_user
from data.hub import dataset_commit

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class Corpus:
    """A source of documents, split into train and val."""

    name: str  # the source actually used (differs from cfg.source after a fallback)
    identity: dict[str, Any]  # JSON-able content identity; the cache fingerprint hashes it
    docs: Callable[[str], Iterator[str]] = field(repr=False)  # split ("train", "val") -> a fresh iterator
    info: dict[str, Any] = field(default_factory=dict)  # recorded in meta.json
    # Characters per split when known up front (text held in memory): a progress bar's total.
    chars: Callable[[str], int | None] = field(default=lambda split: None, repr=False)


def resolve_files(patterns: list[str]) -> list[Path]:
    """Files named by paths, globs or directories (recursively, hidden names skipped), sorted per entry."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.path={pattern!r}: the glob matches no files; check the pattern")
        elif os.path.isdir(expanded):
            matches = sorted(p for p in Path(expanded).rglob("*")
                             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(expanded).parts))
            if not matches:
                raise DataError(f"data.path={pattern!r}: the directory holds no files; add text files to it")
        elif os.path.isfile(expanded):
            if os.path.getsize(expanded) == 0:
                raise DataError(f"data.path={pattern!r}: the file is empty; give a file with text")
            matches = [Path(expanded)]
        else:
            raise DataError(f"data.path={pattern!r}: no such file or directory; check the path")
        found += matches
    return list(dict.fromkeys(p.resolve() for p in found))  # de-duplicated, order kept


def take_chars(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The documents, cut off after max_chars characters in total (None: all of them)."""
    left = max_chars
    for doc in docs:
        if left is not None:
            if left <= 0:
                return
            doc = doc[:left]
            left -= len(doc)
        yield doc


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
        raise DataError(f"{where}: not UTF-8 at byte offset {e.start} ({e.reason}); fix the file or set "
                        "data.errors=replace") from None


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


def _valid_copy(path: Path) -> bytes | None:
    """The cached copy's bytes when they are tiny Shakespeare's, else None."""
    raw = path.read_bytes() if path.is_file() else b""
    return raw if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256 else None


def _cached_shakespeare(cached: Path) -> bytes:
    """Tiny Shakespeare from the cache, else downloaded into it atomically, one process at a time
    (the others wait on the lock, then find the copy); what a killed download left is removed."""
    if (raw := _valid_copy(cached)) is not None:
        return raw
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(cached.parent / f".{cached.name}.lock", waiting_for=f"another process downloading {cached}"):
            if (raw := _valid_copy(cached)) is not None:  # downloaded by another process meanwhile
                return raw
            if cached.is_file():
                warn_user(f"the cached copy {cached} is truncated or corrupt ({cached.stat().st_size} bytes, wrong "
                          "sha256); downloading it again")
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


# --- Hugging Face datasets: hub repositories, local save_to_disk directories and builders ---------


# Builders that ship with `datasets` (data.path gives their files), should its private list move;
# any other name that is not a local directory is a hub repository.
_BUILDERS = ("arrow", "audiofolder", "csv", "imagefolder", "json", "pandas", "parquet", "sql", "text",
             "videofolder", "webdataset", "xml")


def hf_kind(hf_name: str) -> str:
    """local (a save_to_disk or data directory), builder (json, csv, parquet, ...) or hub."""
    if Path(hf_name).expanduser().is_dir():
        return "local"
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged
    except ImportError:  # a private name that may move; the list above is enough to tell
        packaged = _BUILDERS
    return "builder" if hf_name in packaged or hf_name in _BUILDERS else "hub"


def hf_corpus(cfg: DataConfig, cache_root: Path) -> Corpus:
    """data.source=hf: a hub dataset, a local save_to_disk directory, or a builder reading data.path."""
    local = Path(cfg.hf_name).expanduser()
    keys = ("hf_name", "hf_config", "hf_split", "hf_val_split", "text_field", "streaming")
    identity: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    # A hub dataset is identified by name (and commit when pinned); local inputs also by file sizes and times.
    if cfg.path is not None:
        identity["data_files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in resolve_files(cfg.paths)]
    if local.is_dir():
        identity["local"] = sorted((str(p.relative_to(local)), p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in local.rglob("*") if p.is_file())
    info: dict[str, Any] = {"hf_name": cfg.hf_name, "hf_config": cfg.hf_config, "streaming": cfg.streaming}
    # The commit to load: pinned ones are resolved now, since the fingerprint holds them (offline,
    # the name as given); an unpinned hub dataset is resolved when it is first loaded, so a cache
    # hit needs no network, and meta.json still says which commit the tokens came from.
    if cfg.revision is not None:
        kind = hf_kind(cfg.hf_name)
        if kind != "hub":
            what = "a directory on this machine" if kind == "local" else "a builder that reads data.path"
            raise DataError(f"data.revision pins hub datasets, but data.hf_name={cfg.hf_name!r} is a {kind} ({what}); unset it")
        identity["revision"] = info["revision"] = dataset_commit(cfg.hf_name, cfg.revision) or cfg.revision

    @functools.cache
    def load(split: str) -> Any:
        if "revision" not in info:
            info["revision"] = dataset_commit(cfg.hf_name, None) if hf_kind(cfg.hf_name) == "hub" else None
        return _load_hf_split(cfg, split, cache_root, info["revision"])

    def docs(split: str) -> Iterator[str]:
        if cfg.hf_val_split is not None:
            yield from _texts(load(cfg.hf_split if split == "train" else cfg.hf_val_split), cfg)
        elif cfg.streaming:
            k = max(2, round(1 / cfg.val_fraction))
            for i, text in enumerate(_texts(load(cfg.hf_split), cfg)):
                if (i % k == k - 1) == (split == "val"):
                    yield text
        else:
            ds = load(cfg.hf_split)
            n = len(ds)
            n_val = max(1, round(n * cfg.val_fraction))
            if n_val >= n:
                raise DataError(f"dataset {cfg.hf_name!r} has {n} document(s), too few to hold out a val split; "
                                "add documents or name a validation split with data.hf_val_split")
            rows = range(n - n_val) if split == "train" else range(n - n_val, n)
            yield from _texts(ds.select(rows), cfg)

    return Corpus(name="hf", identity=identity, docs=docs, info=info)


def _load_hf_split(cfg: DataConfig, split: str, cache_root: Path, revision: str | None) -> Any:
    import datasets  # lazily: only this source needs it

    local = Path(cfg.hf_name).expanduser()
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{cfg.hf_name} has no split {split!r}; it has {', '.join(ds)} "
                                    "(set data.hf_split / data.hf_val_split)")
                ds = ds[split]
            elif split != cfg.hf_split:
                raise DataError(f"{cfg.hf_name} holds a single split, so it has no {split!r}; unset data.hf_val_split")
            return ds.to_iterable_dataset() if cfg.streaming else ds
        # Never run a repository's code: datasets>=3 refuses loading scripts unless asked, and we
        # say no explicitly (datasets 4+ has no scripts at all and ignores a False here).
        kwargs: dict[str, Any] = {"split": split, "streaming": cfg.streaming, "trust_remote_code": False,
                                  "revision": revision}  # None: the default branch
        if cfg.path is not None:
            kwargs["data_files"] = [str(p) for p in resolve_files(cfg.paths)]
            if not cfg.streaming:
                # Arrow copies of the user's local files go to our cache, not the shared HF cache.
                kwargs["cache_dir"] = str(cache_root / "hf")
        return datasets.load_dataset(cfg.hf_name, cfg.hf_config, **kwargs)
    except DataError:
        raise
    except (OSError, ValueError) as e:  # not found, no network, unknown split or config
        at = f", revision {revision!r}" if revision else ""
        raise DataError(f"could not load dataset {cfg.hf_name!r} (config {cfg.hf_config!r}, split {split!r}{at}): "
                        f"{first_line(e)}; check data.hf_name, data.hf_config and the split names") from e


def _texts(ds: Any, cfg: DataConfig) -> Iterator[str]:
    """The non-empty texts of ds's data.text_field, read in column batches (much faster than one dict
    per example); a missing field, or a connection lost mid-stream, is a one-line DataError."""
    field = cfg.text_field
    if field in (getattr(ds, "column_names", None) or ()):  # None for streams whose features are unknown
        ds = ds.select_columns([field])  # skip decoding the other columns
    try:
        for batch in ds.iter(batch_size=1000):
            if field not in batch:
                raise DataError(f"the dataset has no field {field!r}; its fields are {', '.join(batch)} "
                                "(set data.text_field)")
            for value in batch[field]:
                if value is not None and not isinstance(value, str):
                    raise DataError(f"field {field!r} holds {type(value).__name__}, not text; set data.text_field")
                if value:
                    yield value
    except OSError as e:  # ConnectionError, timeouts, resets: the download stopped part way
        raise DataError(f"reading dataset {cfg.hf_name!r} failed part way ({type(e).__name__}: {first_line(e)}); "
                        "nothing was kept, check the network and run again") from e

"""Hugging Face datasets as a corpus: hub repositories, local save_to_disk directories and builders.

Splits: data.hf_val_split when set, else the last val_fraction of the documents (streaming: every
round(1/val_fraction)-th document). A hub dataset loads at the commit data/hub.py resolves and never
runs repository code. `datasets` is imported only when a split is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.config import DataConfig, DataError, first_line
from data.corpus import Corpus, resolve_files
from data.hub import dataset_commit

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
    revision: dict[str, str | None] = {}
    if cfg.revision is not None:
        kind = hf_kind(cfg.hf_name)
        if kind != "hub":
            what = "a directory on this machine" if kind == "local" else "a builder that reads data.path"
            raise DataError(f"data.revision pins hub datasets, but data.hf_name={cfg.hf_name!r} is a {kind} ({what}); unset it")
        revision["commit"] = dataset_commit(cfg.hf_name, cfg.revision) or cfg.revision
        identity["revision"] = info["revision"] = revision["commit"]

    @functools.cache
    def load(split: str) -> Any:
        if "commit" not in revision:
            revision["commit"] = dataset_commit(cfg.hf_name, None) if hf_kind(cfg.hf_name) == "hub" else None
            info["revision"] = revision["commit"]
        return _load_hf_split(cfg, split, cache_root, revision["commit"])

    def docs(split: str) -> Iterator[str]:
        if cfg.hf_val_split is not None:
            yield from _texts(load(cfg.hf_split if split == "train" else cfg.hf_val_split), cfg.text_field, cfg.hf_name)
        elif cfg.streaming:
            k = max(2, round(1 / cfg.val_fraction))
            for i, text in enumerate(_texts(load(cfg.hf_split), cfg.text_field, cfg.hf_name)):
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
            yield from _texts(ds.select(rows), cfg.text_field, cfg.hf_name)

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
        kwargs: dict[str, Any] = {"split": split, "streaming": cfg.streaming, "trust_remote_code": False}
        if revision is not None:
            kwargs["revision"] = revision
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


def _texts(ds: Any, text_field: str, name: str) -> Iterator[str]:
    """The non-empty texts of ds's text_field, read in column batches (much faster than one dict per
    example); a connection lost mid-stream is a one-line DataError."""
    columns = getattr(ds, "column_names", None)  # None for streams whose features are unknown
    if columns is not None:
        if text_field not in columns:
            raise _no_field(text_field, columns)
        ds = ds.select_columns([text_field])  # skip decoding the other columns
    try:
        for batch in ds.iter(batch_size=1000):
            if text_field not in batch:
                raise _no_field(text_field, batch)
            for value in batch[text_field]:
                if value is not None and not isinstance(value, str):
                    raise DataError(f"field {text_field!r} holds {type(value).__name__}, not text; set data.text_field")
                if value:
                    yield value
    except OSError as e:  # ConnectionError, timeouts, resets: the download stopped part way
        raise DataError(f"reading dataset {name!r} failed part way ({type(e).__name__}: {first_line(e)}); nothing "
                        "was kept, check the network and run again") from e


def _no_field(text_field: str, fields: Any) -> DataError:
    return DataError(f"the dataset has no field {text_field!r}; its fields are {', '.join(fields)} (set data.text_field)")

"""What every source of text returns (`Corpus`), how paths, globs and directories name files, and
character budgets: shared by the local sources (data/sources.py), Hugging Face datasets
(data/hf_datasets.py) and the tokenizer training in data/prepare.py.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.config import DataError


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
            matches = sorted(
                p
                for p in Path(expanded).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(expanded).parts)
            )
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

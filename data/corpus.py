"""What every source of text returns (`Corpus`), and how paths, globs and directories name files.

Shared by the local sources (data/sources.py) and Hugging Face datasets (data/hf_datasets.py).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.config import DataError


@dataclass
class Corpus:
    """A source of documents, split into train and val."""

    name: str  # the source actually used (differs from cfg.source after a fallback)
    identity: dict[str, Any]  # JSON-able content identity; the cache fingerprint hashes it
    docs_fn: Callable[[str], Iterator[str]] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in meta.json
    streaming: bool = False  # documents come from a stream that may not fit in memory
    chars_fn: Callable[[str], int] | None = field(default=None, repr=False)  # characters per split, when known

    def chars(self, split: str) -> int | None:
        """The characters of split's text when the corpus knows them up front (text held in memory),
        else None: the denominator of a progress bar."""
        return self.chars_fn(split) if self.chars_fn is not None else None

    def docs(self, split: str) -> Iterator[str]:
        """A fresh iterator over the documents of split ("train" or "val")."""
        if split not in ("train", "val"):
            raise DataError(f"split {split!r} is not valid; use train or val")
        return self.docs_fn(split)


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

"""The layout of a prepared data directory, and the checks that its files agree with its meta.json.

A prepared directory holds train.bin and val.bin (flat token arrays), tokenizer.json and, written
last, meta.json: each split's token count and dtype, and the size and sha256 of every file (older
directories without `files` are checked by sizes and by parsing). prepare() rebuilds a directory
with a Problem (with a warning); readers raise DataError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.config import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TOKEN_DTYPES = {"uint16": 2, "uint32": 4}  # name -> bytes per token
REQUIRED_KEYS = ("format_version", "fingerprint", "tokenizer", "vocab_size", "dtype", "tokens")
# .bin files up to this size are checked against their sha256 on every cache hit (a few tens of
# milliseconds); larger ones by size only, which is what a kill or a full disk changes.
VERIFY_MAX_BYTES = 1 << 26
REBUILD_HINT = "prepare it again (python -m data.prepare, or train.py, with the same data settings rebuilds it)"


@dataclass(frozen=True)
class Problem:
    """What is wrong with a prepared directory: the file and what was found."""

    path: Path
    what: str

    def __str__(self) -> str:
        return f"{self.path} {self.what}"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def parse_json(path: Path) -> Any:
    """The parsed file, or the Problem with it (missing, unreadable, empty, cut short, not JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Problem(path, "is missing")
    except UnicodeDecodeError as e:
        return Problem(path, f"is corrupt (not UTF-8 at byte offset {e.start})")
    except OSError as e:
        return Problem(path, f"cannot be read ({e.strerror})")
    if not text.strip():
        return Problem(path, "is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # A write cut short (a kill, a full disk) leaves the parser wanting more at the very end,
        # or inside a string that never closes.
        cut = e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated string")
        return Problem(path, f"{'is truncated' if cut else 'is not valid JSON'} ({e})")


def meta_or_problem(directory: Path) -> dict[str, Any] | Problem:
    """meta.json's content when it is whole and of this format, else the Problem."""
    path = directory / META_FILE
    if isinstance(meta := parse_json(path), Problem):
        return meta
    if not isinstance(meta, dict):
        return Problem(path, "is not a JSON object")
    if missing := [k for k in REQUIRED_KEYS if k not in meta]:
        return Problem(path, f"lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        return Problem(path, f"is from format {meta['format_version']}, this code reads {FORMAT_VERSION}")
    tokens = meta["tokens"]
    if not isinstance(tokens, dict) or not all(isinstance(tokens.get(s), int) and tokens[s] >= 0 for s in SPLITS):
        return Problem(path, f"has no token counts for {' and '.join(SPLITS)} ({tokens!r})")
    if meta["dtype"] not in TOKEN_DTYPES:
        return Problem(path, f"names the token dtype {meta['dtype']!r}, not one of {', '.join(TOKEN_DTYPES)}")
    return meta


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory; DataError naming the file when it is missing or unsound."""
    directory = Path(directory)
    if not (directory / META_FILE).exists():
        raise DataError(f"{directory} is not a prepared data directory (no {META_FILE}); run python -m data.prepare")
    if isinstance(meta := meta_or_problem(directory), Problem):
        raise DataError(f"prepared data {meta}; {REBUILD_HINT}")
    return meta


def split_problem(directory: Path, split: str, meta: dict[str, Any], verify_bytes: int = 0) -> Problem | None:
    """None when <split>.bin holds exactly the tokens meta.json records (and, up to verify_bytes
    long, the recorded sha256), else the Problem."""
    path = directory / f"{split}.bin"
    if not path.is_file():
        return Problem(path, "is missing")
    n, itemsize = meta["tokens"][split], TOKEN_DTYPES[meta["dtype"]]
    size = path.stat().st_size
    if size != n * itemsize:
        state = "is truncated" if size < n * itemsize else "is longer than recorded"
        return Problem(path, f"{state}: {size} bytes, but {META_FILE} records {n} {meta['dtype']} tokens "
                             f"({n * itemsize} bytes)")
    recorded = (meta.get("files") or {}).get(path.name, {}).get("sha256")
    if recorded and verify_bytes and size <= verify_bytes and file_sha256(path) != recorded:
        return Problem(path, f"is corrupt: its sha256 differs from the one in {META_FILE}")
    return None


def tokenizer_problem(directory: Path, meta: dict[str, Any]) -> Problem | None:
    """None when tokenizer.json is whole (its sha256 as recorded, or valid JSON), else the Problem."""
    path = directory / TOKENIZER_FILE
    recorded = (meta.get("files") or {}).get(TOKENIZER_FILE, {}).get("sha256")
    if recorded and path.is_file() and file_sha256(path) == recorded:
        return None
    if isinstance(parsed := parse_json(path), Problem):
        return parsed
    return Problem(path, f"is corrupt: its sha256 differs from the one in {META_FILE}") if recorded else None


def check_prepared(directory: str | Path, verify_bytes: int = VERIFY_MAX_BYTES) -> Problem | None:
    """None when directory is a sound prepared directory, else the first Problem found."""
    directory = Path(directory)
    if isinstance(meta := meta_or_problem(directory), Problem):
        return meta
    for split in SPLITS:
        if problem := split_problem(directory, split, meta, verify_bytes):
            return problem
    return tokenizer_problem(directory, meta)

"""DataConfig, the schema of configs/data/*.yaml; DataError, the one error users see; warn_user.

`__post_init__` (which OmegaConf's `to_object` calls) refuses a bad setting before any text is read,
in one line naming the field and the fix. No Hydra here: each entry point registers a root schema
whose `data` field is a DataConfig (cli.register_configs, data/prepare.py), so Hydra refuses typos.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("shakespeare_char", "python_stdlib", "files", "hf")
TOKENIZERS = ("char", "bpe", "pretrained")
DECODE_ERRORS = ("strict", "replace")

DEFAULT_BPE_VOCAB = 4096
# Byte-level BPE starts from the 256 byte symbols plus <|endoftext|>; fewer cannot encode all text.
MIN_BPE_VOCAB = 257
# Token files are uint16 or uint32; ids above 2**32 - 1 have no dtype here.
MAX_VOCAB = 2**32


class DataError(ValueError):
    """A user mistake in data settings or input, with a one-line message saying how to fix it."""


def warn_user(message: str) -> None:
    """A problem the data code works around: logged, and a UserWarning (shown where logging is not
    set up) that points at the caller's caller."""
    logging.getLogger("data").warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class DataConfig:
    # Preset name (informational: the file name under configs/data/).
    name: str = "shakespeare_char"
    # Where text comes from: shakespeare_char | python_stdlib | files | hf.
    source: str = "shakespeare_char"
    # A path, glob or directory (str), or a list of them. files: the input; shakespeare_char: a
    # local copy of tiny Shakespeare; hf: data_files for a builder such as hf_name=json.
    path: Any = None
    # char (sorted characters of the text, as nanoGPT) | bpe (byte-level, trained here) | pretrained.
    tokenizer: str = "char"
    # pretrained only: a tokenizer.json file, a directory holding one, or a hub name (e.g. gpt2). A hub
    # name that cannot be fetched falls back to training a BPE with a warning (an error when pinned).
    tokenizer_path: str | None = None
    # pretrained hub names only: the branch, tag or commit sha to fetch; the commit it resolves to is
    # in meta.json and the cache fingerprint. None: the default branch (its commit is still recorded).
    tokenizer_revision: str | None = None
    # bpe only: target vocabulary size, <|endoftext|> included; 0 means DEFAULT_BPE_VOCAB (4096).
    vocab_size: int = 0
    # char only: an <unk> id (the last) for characters not in the text, instead of a DataError.
    unk: bool = False
    # Bytes of files that are not UTF-8: strict (DataError naming file and offset) or replace (U+FFFD).
    errors: str = "strict"
    # hf only: dataset name on the hub (e.g. roneneldan/TinyStories), a builder used with
    # data.path as data files (json, csv, parquet, text), or a local save_to_disk directory.
    hf_name: str | None = None
    # hf only: the dataset configuration (subset) name, e.g. sample-10BT.
    hf_config: str | None = None
    # hf hub datasets only: the branch, tag or commit sha to load; the commit it resolves to (offline,
    # the name as given) is in meta.json and the cache fingerprint, so a moved tag builds anew. None:
    # the default branch at build time (its commit is recorded; a cached build is reused).
    revision: str | None = None
    # hf only: the split to train on.
    hf_split: str = "train"
    # hf only: a split to validate on; None holds out the last val_fraction of the documents
    # (streaming: every round(1/val_fraction)-th document, since the total is unknown).
    hf_val_split: str | None = None
    # hf only: the column that holds the text.
    text_field: str = "text"
    # hf only: read the dataset as a stream instead of downloading it first.
    streaming: bool = False
    # Token budget over both splits (train gets 1 - val_fraction of it, val the rest); reading
    # stops once it is met. None reads everything. Meant for streaming corpora.
    max_tokens: int | None = None
    # Fraction held out for validation (characters for text sources, as nanoGPT; documents for hf).
    val_fraction: float = 0.1
    # Where prepared data is cached; None means $CAUSALGPT_CACHE, else ~/.cache/causalgpt.
    cache_dir: str | None = None
    # Tokenizer threads: 0 = all cores, 1 = one thread (debugging, benchmarks); others set
    # RAYON_NUM_THREADS, which the library reads only before its first parallel call in a process.
    num_proc: int = 0
    # Source used, with a warning, when shakespeare_char has no data.path, no cached copy and no
    # network; None makes that a DataError.
    fallback: str | None = "python_stdlib"
    # python_stdlib only: keep the first max_chars characters (None = all ~12 M). The default,
    # about twice tiny Shakespeare, keeps the offline fallback as quick to train as the default.
    max_chars: int | None = 2_000_000
    # bpe only: train the BPE on at most this many characters of the training split. None means
    # all of it, or 4 x the train token budget when max_tokens is set (streaming).
    bpe_train_chars: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"data.source={self.source!r} is not a known source; use one of {', '.join(SOURCES)}")
        if self.tokenizer not in TOKENIZERS:
            raise DataError(f"data.tokenizer={self.tokenizer!r} is not a known tokenizer; use one of {', '.join(TOKENIZERS)}")
        if self.errors not in DECODE_ERRORS:
            raise DataError(f"data.errors={self.errors!r} is not valid; use strict or replace")
        if self.fallback not in (None, "python_stdlib"):
            raise DataError(f"data.fallback={self.fallback!r} is not valid; use python_stdlib or null")
        paths = [self.path] if isinstance(self.path, str | os.PathLike) else self.path
        if paths is not None and not (isinstance(paths, list | tuple) and paths
                                      and all(isinstance(p, str | os.PathLike) for p in paths)):
            raise DataError(f"data.path={self.path!r} must be a path string or a non-empty list of them")
        if self.source == "files" and self.path is None:
            raise DataError("data.source=files needs data.path (a file, glob or directory, or a list of them)")
        if self.source == "hf" and not self.hf_name:
            raise DataError("data.source=hf needs data.hf_name (a hub dataset, a builder such as json, or a local dir)")
        if self.streaming and self.source != "hf":
            raise DataError(f"data.streaming=true applies to data.source=hf only, not {self.source!r}")
        if self.tokenizer == "pretrained" and not self.tokenizer_path:
            raise DataError("data.tokenizer=pretrained needs data.tokenizer_path (a tokenizer.json or a hub name)")
        if not 0 <= self.vocab_size < MAX_VOCAB:
            raise DataError(f"data.vocab_size={self.vocab_size} does not fit uint32 token files (at most "
                            f"{MAX_VOCAB - 1}); use a smaller vocabulary")
        if self.tokenizer == "bpe" and 0 < self.vocab_size < MIN_BPE_VOCAB:
            raise DataError(f"data.vocab_size={self.vocab_size} is too small for byte-level BPE; use at least "
                            f"{MIN_BPE_VOCAB} (256 bytes + <|endoftext|>) or 0 for the default {DEFAULT_BPE_VOCAB}")
        uses_val_split = self.source == "hf" and self.hf_val_split is not None
        if not (0 < self.val_fraction < 1 or (uses_val_split and self.val_fraction == 0)):
            raise DataError(f"data.val_fraction={self.val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
        for field_name in ("max_tokens", "max_chars", "bpe_train_chars"):
            value = getattr(self, field_name)
            if value is not None and value <= 0:
                raise DataError(f"data.{field_name}={value} must be positive, or null for no limit")
        if self.num_proc < 0:
            raise DataError(f"data.num_proc={self.num_proc} must be 0 (all cores) or a positive thread count")
        for field_name in ("revision", "tokenizer_revision"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataError(f"data.{field_name}={value!r} must name a branch, tag or commit sha, or be null")
        if self.revision is not None and self.source != "hf":
            raise DataError(f"data.revision pins Hugging Face hub datasets; unset it for data.source={self.source}")
        if self.tokenizer_revision is not None and self.tokenizer != "pretrained":
            raise DataError(f"data.tokenizer_revision pins a hub tokenizer; unset it for data.tokenizer={self.tokenizer}")
        if not self.text_field:
            raise DataError("data.text_field must name the column that holds the text, e.g. text")

    @property
    def paths(self) -> list[str]:
        """data.path as a list of strings (empty when unset)."""
        paths = [self.path] if isinstance(self.path, str | os.PathLike) else self.path or []
        return [os.fspath(p) for p in paths]

    @property
    def bpe_vocab_size(self) -> int:
        """The BPE target vocabulary, with 0 resolved to the default."""
        return self.vocab_size or DEFAULT_BPE_VOCAB

    @property
    def cache_root(self) -> Path:
        """Where prepared data is cached: data.cache_dir, else $CAUSALGPT_CACHE, else ~/.cache/causalgpt."""
        return Path(self.cache_dir or os.environ.get("CAUSALGPT_CACHE") or "~/.cache/causalgpt").expanduser()

"""Text -> token ids -> train.bin / val.bin + meta.json + tokenizer.json, cached by fingerprint.

`prepare(cfg)` returns `<cache root>/<source>-<tokenizer>-<fingerprint>`; the fingerprint hashes the
source's content identity and every setting that changes the ids. Token files are flat uint16 or
uint32 arrays, documents joined by <|endoftext|> when the tokenizer has one.

A build happens in a temporary directory renamed into place when complete, under an OS file lock
(data/atomic.py), so neither a kill nor concurrent runs leave a half-written directory that looks
valid: every rank may call prepare() at once, one builds and the others wait on the lock. A cached
directory whose files disagree with its meta.json (data/prepared.py) is rebuilt with a warning.

`python -m data.prepare data=tinystories data.vocab_size=4096` prints the directory last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic import (
    TEMP_INFIX,
    atomic_open,
    atomic_write,
    exclusive_lock,
    fsync_dir,
    make_temp_dir,
    remove_temps,
    temp_prefix,
)
from data.config import MAX_VOCAB, DataConfig, DataError, warn_user
from data.prepared import FORMAT_VERSION, META_FILE, TOKENIZER_FILE, check_prepared, file_sha256, read_meta
from data.progress import Progress
from data.sources import Corpus, open_corpus, take_chars
from data.tokenizer import CharTokenizer, Tokenizer, TokenizerUnavailable, load_pretrained, train_bpe

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "META_FILE", "prepare", "read_meta", "token_dtype"]
# Cache directory errors that the user fixes by freeing space or choosing another directory.
_CACHE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
# Long documents are cut into pieces of about PIECE_CHARS so that even one big file encodes in
# parallel; an encode_arrays call gets about BATCH_CHARS (every thread busy, memory bounded).
PIECE_CHARS = 1 << 15
BATCH_CHARS = 1 << 23
# A piece may end only after a newline that has non-space characters on both sides: byte-level
# BPE's pre-tokenizer always splits there, so encoding the pieces gives the ids of the whole (for
# pretrained tokenizers with other pre-tokenizers this is very nearly, not provably, the same).
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits in 16 bits, else uint32."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= MAX_VOCAB:
        return np.dtype(np.uint32)
    raise DataError(f"a vocabulary of {vocab_size} tokens does not fit uint32 token files; use at most {MAX_VOCAB}")


def prepare(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Prepare (or find in the cache) the token files cfg describes; returns their directory."""
    cache_root = cfg.cache_root
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache dir {cache_root} ({e.strerror}); set data.cache_dir or CAUSALGPT_CACHE") from e
    corpus = open_corpus(cfg, cache_root)
    plan, pretrained = _tokenizer_plan(cfg)
    fingerprint = _fingerprint(cfg, corpus, plan)
    final = cache_root / f"{corpus.name}-{plan['kind']}-{fingerprint}"
    if check_prepared(final) is None:
        log.info("using cached %s", final)
        return final
    try:
        with exclusive_lock(cache_root / f".{final.name}.lock", waiting_for=f"another process preparing {final}",
                            status=lambda: _written_so_far(final)):
            if (problem := check_prepared(final)) is None:  # another process built it while we waited
                log.info("using %s, prepared by another process", final)
                return final
            if final.exists():
                warn_user(f"prepared data {problem}; rebuilding")
            _remove_leftovers(cache_root, final)
            tmp = make_temp_dir(final)
            try:
                _build(cfg, corpus, plan, pretrained, fingerprint, tmp, progress)
                fsync_dir(tmp)
                os.rename(tmp, final)
                fsync_dir(cache_root)
            finally:
                # On success tmp has been renamed away; otherwise nothing half-written stays behind.
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if e.errno not in _CACHE_ERRNOS:
            raise
        raise DataError(f"cannot write prepared data {e.filename or final} ({e.strerror}); free disk space, or set "
                        "data.cache_dir (or CAUSALGPT_CACHE) to a writable directory with room") from None
    log.info("prepared %s", final)
    return final


def _written_so_far(final: Path) -> str:
    """How far another process's build of final has got (the size of its temporary directory)."""
    total = 0
    for tmp in final.parent.glob(f"{temp_prefix(final)}*"):
        with contextlib.suppress(OSError):  # the build may finish (and its files move) while we count
            total += sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return f"{total / 1e6:.1f} MB written so far"


def _remove_leftovers(cache_root: Path, final: Path) -> None:
    """Under final's lock: remove what killed builds left (of final, and of other datasets whose lock
    is free), and move an unsound final directory out of the way."""
    removed = remove_temps(final)
    for name in sorted({p.name[1:].rsplit(TEMP_INFIX, 1)[0] for p in cache_root.glob(f".*{TEMP_INFIX}*")}):
        # TimeoutError: its lock is held, it is being built right now by another process.
        with contextlib.suppress(TimeoutError), exclusive_lock(cache_root / f".{name}.lock", timeout_s=0):
            removed += remove_temps(cache_root / name)
    for stale in removed:
        log.info("removed %s, left by an interrupted build", stale)
    if final.exists():
        # Renamed first (a temporary name, removed with the leftovers should this be killed), so the
        # final name never points at a half-deleted directory.
        trash = make_temp_dir(final)
        os.rename(final, trash / "old")
        shutil.rmtree(trash)


def _tokenizer_plan(cfg: DataConfig) -> tuple[dict[str, Any], Tokenizer | None]:
    """The tokenizer settings that the fingerprint hashes, and the pretrained tokenizer if any."""
    if cfg.tokenizer == "char":
        return {"kind": "char", "unk": cfg.unk}, None
    if cfg.tokenizer == "pretrained":
        try:
            tok = load_pretrained(cfg.tokenizer_path, revision=cfg.tokenizer_revision)
            plan = {"kind": "pretrained", "sha256": hashlib.sha256(tok.to_json().encode()).hexdigest()}
            if cfg.tokenizer_revision is not None:  # only then, so unpinned fingerprints stay as they were
                plan["revision"] = tok.revision or cfg.tokenizer_revision
            return plan, tok
        except TokenizerUnavailable as e:
            warn_user(f"{e}; training a byte-level BPE with {cfg.bpe_vocab_size} tokens instead")
    return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size, "train_chars": cfg.bpe_train_chars}, None


def _fingerprint(cfg: DataConfig, corpus: Corpus, plan: dict[str, Any]) -> str:
    key = {"format_version": FORMAT_VERSION, "source": corpus.name, "identity": corpus.identity, "tokenizer": plan,
           "val_fraction": cfg.val_fraction, "max_tokens": cfg.max_tokens}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cfg: DataConfig, corpus: Corpus, plan: dict[str, Any], pretrained: Tokenizer | None, fingerprint: str,
           out: Path, progress: bool) -> None:
    # Token budgets: train gets 1 - val_fraction of max_tokens, val the rest (None: no limit).
    train = None if cfg.max_tokens is None else int(cfg.max_tokens * (1 - cfg.val_fraction))
    budgets = {"train": train, "val": None if train is None else cfg.max_tokens - train}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _threads(cfg.num_proc):
        if plan["kind"] == "char":  # the whole text, as nanoGPT's sorted(set(data)); a char is a token
            texts = chain(*(take_chars(corpus.docs(s), budgets[s]) for s in ("train", "val")))
            tok: Tokenizer = CharTokenizer.from_text(texts, unk=cfg.unk)
        elif plan["kind"] == "bpe":
            limit = cfg.bpe_train_chars or (4 * budgets["train"] if budgets["train"] else None)
            log.info("training a byte-level BPE with %d tokens on the training split", plan["vocab_size"])
            pieces = (p for doc in take_chars(corpus.docs("train"), limit) for p in _pieces(doc))
            tok = train_bpe(pieces, plan["vocab_size"], progress=progress)
        else:
            tok = pretrained  # _tokenizer_plan gives it with kind pretrained
        timings["tokenizer"] = time.perf_counter() - t0
        dtype = token_dtype(tok.vocab_size)
        counts, files = {}, {}
        for split in ("train", "val"):
            t1 = time.perf_counter()
            path = out / f"{split}.bin"
            counts[split], sha = _write_split(corpus.docs(split), tok, path, dtype, budgets[split], progress,
                                              corpus.chars(split))
            files[path.name] = {"bytes": counts[split] * dtype.itemsize, "sha256": sha}
            timings[f"encode_{split}"] = time.perf_counter() - t1
    if counts["train"] == 0:
        raise DataError(f"the {corpus.name} corpus gave no training tokens; check the input")
    if counts["val"] == 0:
        raise DataError(f"the val split of the {corpus.name} corpus is empty; raise data.val_fraction, add text, "
                        "or name a validation split with data.hf_val_split")
    atomic_write(out / TOKENIZER_FILE, tok.to_json())
    files[TOKENIZER_FILE] = {"bytes": (out / TOKENIZER_FILE).stat().st_size, "sha256": file_sha256(out / TOKENIZER_FILE)}
    timings["total"] = time.perf_counter() - t0
    meta = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
        "source": corpus.name, "requested_source": cfg.source, "source_info": corpus.info,
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "dtype": dtype.name, "tokens": counts,
        "files": files,  # what data/prepared.py checks the files against: sizes and sha256
        # The hub commits the dataset and the tokenizer came from (None: not from the hub, or the
        # hub could not tell); the requested revisions are in config.
        "revision": {"dataset": corpus.info.get("revision"), "tokenizer": getattr(tok, "revision", None)},
        "config": dataclasses.asdict(cfg),
        "build_seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: its presence is what marks a directory as complete.
    atomic_write(out / META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    rate = (counts["train"] + counts["val"]) / max(timings["total"], 1e-9)
    log.info("%s: %d train + %d val tokens, vocab %d, %.0f tokens/s", corpus.name, counts["train"],
             counts["val"], tok.vocab_size, rate)


@contextlib.contextmanager
def _threads(num_proc: int) -> Iterator[None]:
    """The tokenizers library's threads for the block, os.environ as it was afterwards: 1 turns its
    parallelism off (read at every call); more sizes its thread pool (read when the pool starts, in a
    process's first build) unless RAYON_NUM_THREADS is set already; 0 leaves it all cores."""
    change = {"TOKENIZERS_PARALLELISM": "false"} if num_proc == 1 else {}
    if num_proc > 1 and "RAYON_NUM_THREADS" not in os.environ:
        change = {"RAYON_NUM_THREADS": str(num_proc)}
    before = {key: os.environ.get(key) for key in change}
    os.environ.update(change)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pieces(doc: str) -> Iterator[str]:
    """doc in pieces of about PIECE_CHARS, cut only where the BPE pre-tokenizer splits anyway."""
    start = 0
    while len(doc) - start > PIECE_CHARS and (cut := _SAFE_CUT.search(doc, start + PIECE_CHARS)):
        yield doc[start : cut.end()]
        start = cut.end()
    yield doc[start:]


def _batches(docs: Iterable[str]) -> Iterator[list[tuple[str, bool]]]:
    """Batches of (piece, starts_a_document) holding about BATCH_CHARS characters."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for doc in docs:
        for i, piece in enumerate(_pieces(doc)):
            batch.append((piece, i == 0))
            size += len(piece)
            if size >= BATCH_CHARS or len(batch) >= 4096:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _write_split(docs: Iterable[str], tok: Tokenizer, path: Path, dtype: np.dtype, budget: int | None,
                 progress: bool, n_chars: int | None = None) -> tuple[int, str]:
    """Encode docs into path as a flat dtype array (atomically); returns the token count and the
    sha256 of the bytes, hashed as written. Progress counts tokens against the budget when there is
    one, else characters against n_chars when the corpus knows it."""
    n = 0
    digest = hashlib.sha256()
    by_chars = budget is None and n_chars is not None
    bar = Progress(f"tokenizing {path.stem}", n_chars if by_chars else budget, unit="chars" if by_chars else "tokens",
                   enabled=progress, logger=log)
    with atomic_open(path, "wb") as f, bar:
        for batch in _batches(docs):
            for (piece, starts_doc), ids in zip(batch, tok.encode_arrays([p for p, _ in batch]), strict=True):
                if starts_doc and n and tok.eot_id is not None:  # a separator between documents
                    ids = np.concatenate(([tok.eot_id], ids))
                if budget is not None:
                    ids = ids[: budget - n]
                arr = np.ascontiguousarray(ids, dtype=dtype)
                f.write(arr.data)
                digest.update(arr.data)
                n += len(ids)
                bar.update(len(piece) if by_chars else len(ids))
                if budget is not None and n >= budget:
                    return n, digest.hexdigest()
    return n, digest.hexdigest()


def register_schema() -> None:
    """The root schema of configs/prepare.yaml: data is a DataConfig, so Hydra refuses a typo such as data.pth=x."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="prepare_schema", node={"data": DataConfig, "progress": True})


def main() -> None:
    """`python -m data.prepare <data overrides>`: prepare and print the directory on the last line."""
    import hydra  # lazily: the library above never needs Hydra
    from omegaconf import DictConfig, OmegaConf

    register_schema()

    @hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "configs"), config_name="prepare",
                version_base=None)
    def run(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
        try:
            print(prepare(OmegaConf.to_object(cfg.data), progress=cfg.progress))
        except DataError as e:
            log.error("%s", e)
            sys.exit(1)

    run()


if __name__ == "__main__":
    main()

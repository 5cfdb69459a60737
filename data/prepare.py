"""Text -> token ids -> train.bin / val.bin + meta.json + tokenizer.json, cached by fingerprint.

`prepare(cfg)` returns a directory under the cache root (data.cache_dir, else $CAUSALGPT_CACHE,
else ~/.cache/causalgpt) named `<source>-<tokenizer>-<fingerprint>`. The fingerprint hashes the
source's content identity (Shakespeare: its sha256; files: paths, sizes and mtimes; the stdlib:
Python version and file listing; hf: name, config, splits and any local files) and every setting
that changes the ids, so a second run returns at once and a changed setting builds a new one.

Token files are flat arrays of uint16 (vocabularies up to 65,536 ids) or uint32, documents joined
by <|endoftext|> when the tokenizer has one, readable with np.memmap (see data/loader.py).

A build happens in a temporary directory beside the final one and is renamed into place only when
complete, under an exclusive lock (`.<name>.lock` in the cache root), so an interrupted run or two
concurrent runs never leave a half-written directory that looks valid.

Run it as `python -m data.prepare data=tinystories data.vocab_size=4096`: the last line printed is
the prepared directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.config import MAX_VOCAB, DataConfig, DataError, resolve_cache_dir
from data.sources import Corpus, open_corpus
from data.tokenizer import (
    CharTokenizer,
    Tokenizer,
    TokenizerUnavailable,
    load_pretrained,
    save_tokenizer,
    train_bpe,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
# Long documents are cut into pieces of about this many characters so that a batch of pieces can
# be encoded in parallel even when the corpus is one big file.
PIECE_CHARS = 1 << 15
# Characters per encode_batch call: enough pieces to keep every thread busy, bounded memory.
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


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory; DataError when it is missing or from another format."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared data directory (no {META_FILE}); run python -m data.prepare")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{directory} was prepared in format {meta.get('format_version')}, this code reads {FORMAT_VERSION}; "
            "delete it and prepare again"
        )
    return meta


def prepare(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Prepare (or find in the cache) the token files cfg describes; returns their directory."""
    cache_root = resolve_cache_dir(cfg.cache_dir)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache dir {cache_root} ({e.strerror}); set data.cache_dir or CAUSALGPT_CACHE") from e
    corpus = open_corpus(cfg, cache_root)
    plan, pretrained = _tokenizer_plan(cfg)
    fingerprint = _fingerprint(cfg, corpus, plan)
    final = cache_root / f"{corpus.name}-{plan['kind']}-{fingerprint}"
    if _is_prepared(final):
        log.info("using cached %s", final)
        return final
    with _locked(cache_root / f".{final.name}.lock"):
        if _is_prepared(final):  # another process built it while we waited for the lock
            log.info("using %s, prepared by another process", final)
            return final
        _remove_leftovers(cache_root, final)
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{final.name}.tmp-"))
        try:
            _build(cfg, corpus, plan, pretrained, fingerprint, tmp, progress)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_prepared(final):  # not a lost race: a real error
                    raise
                log.info("%s appeared while building; keeping it and discarding this build", final)
        finally:
            # On success tmp has been renamed away; otherwise nothing half-written stays behind.
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s", final)
    return final


def _is_prepared(directory: Path) -> bool:
    # meta.json is written last, and the directory only gets its final name when complete.
    meta = directory / META_FILE
    if not meta.is_file():
        return False
    return json.loads(meta.read_text(encoding="utf-8")).get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: fall back on the race-safe rename alone
        yield
        return
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing the same data (%s)", lock_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(cache_root: Path, final: Path) -> None:
    # Under the lock no one else builds this dataset, so its temporary dirs are from killed runs;
    # an invalid final dir (no meta.json or an old format) is rebuilt.
    for stale in cache_root.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        log.warning("%s is incomplete or from an older format; rebuilding it", final)
        shutil.rmtree(final)


def _tokenizer_plan(cfg: DataConfig) -> tuple[dict[str, Any], Tokenizer | None]:
    """The tokenizer settings that the fingerprint hashes, and the pretrained tokenizer if any."""
    if cfg.tokenizer == "char":
        return {"kind": "char", "unk": cfg.unk}, None
    if cfg.tokenizer == "pretrained":
        try:
            tok = load_pretrained(cfg.tokenizer_path)
            return {"kind": "pretrained", "sha256": hashlib.sha256(tok.to_json().encode()).hexdigest()}, tok
        except TokenizerUnavailable as e:
            message = f"{e}; training a byte-level BPE with {cfg.bpe_vocab_size} tokens instead"
            log.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
    return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size, "train_chars": cfg.bpe_train_chars}, None


def _fingerprint(cfg: DataConfig, corpus: Corpus, plan: dict[str, Any]) -> str:
    key = {
        "format_version": FORMAT_VERSION,
        "source": corpus.name,
        "identity": corpus.identity,
        "tokenizer": plan,
        "val_fraction": cfg.val_fraction,
        "max_tokens": cfg.max_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _budgets(cfg: DataConfig) -> dict[str, int | None]:
    if cfg.max_tokens is None:
        return {"train": None, "val": None}
    train = int(cfg.max_tokens * (1 - cfg.val_fraction))
    return {"train": train, "val": cfg.max_tokens - train}


def _build(
    cfg: DataConfig,
    corpus: Corpus,
    plan: dict[str, Any],
    pretrained: Tokenizer | None,
    fingerprint: str,
    out: Path,
    progress: bool,
) -> None:
    budgets = _budgets(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _threads(cfg.num_proc):
        if plan["kind"] == "char":
            # The whole text, as nanoGPT's sorted(set(data)); a char is one token, so the budget
            # in characters is exact.
            texts = chain(*(_take(corpus.docs(s), budgets[s]) for s in ("train", "val")))
            tok: Tokenizer = CharTokenizer.from_text(texts, unk=cfg.unk)
        elif plan["kind"] == "bpe":
            limit = cfg.bpe_train_chars or (4 * budgets["train"] if budgets["train"] else None)
            log.info("training a byte-level BPE with %d tokens on the training split", plan["vocab_size"])
            pieces = (p for doc in _take(corpus.docs("train"), limit) for p in _pieces(doc))
            tok = train_bpe(pieces, plan["vocab_size"], progress=progress)
        else:
            assert pretrained is not None  # _tokenizer_plan returns it with kind pretrained
            tok = pretrained
        timings["tokenizer"] = time.perf_counter() - t0
        dtype = token_dtype(tok.vocab_size)
        counts = {}
        for split in ("train", "val"):
            t1 = time.perf_counter()
            counts[split] = _write_split(corpus.docs(split), tok, out / f"{split}.bin", dtype, budgets[split], progress)
            timings[f"encode_{split}"] = time.perf_counter() - t1
    if counts["train"] == 0:
        raise DataError(f"the {corpus.name} corpus gave no training tokens; check the input")
    if counts["val"] == 0:
        raise DataError(
            f"the val split of the {corpus.name} corpus is empty; raise data.val_fraction, add text, "
            "or name a validation split with data.hf_val_split"
        )
    save_tokenizer(tok, out)
    timings["total"] = time.perf_counter() - t0
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": corpus.name,
        "requested_source": cfg.source,
        "source_info": corpus.info,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "tokens": counts,
        "config": dataclasses.asdict(cfg),
        "build_seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: its presence is what marks a directory as complete.
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    rate = (counts["train"] + counts["val"]) / max(timings["total"], 1e-9)
    log.info("%s: %d train + %d val tokens, vocab %d, %.0f tokens/s", corpus.name, counts["train"],
             counts["val"], tok.vocab_size, rate)


@contextlib.contextmanager
def _threads(num_proc: int) -> Iterator[None]:
    """Limit the tokenizers library's threads: 1 turns its parallelism off for this block."""
    if num_proc != 1:
        if num_proc > 1:
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_proc))  # read once, at the pool's start
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the library reads it at every call
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _take(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The documents, cut off after max_chars characters in total (None: all of them)."""
    left = max_chars
    for doc in docs:
        if left is not None:
            if left <= 0:
                return
            doc = doc[:left]
            left -= len(doc)
        yield doc


def _pieces(doc: str) -> Iterator[str]:
    """doc in pieces of about PIECE_CHARS, cut only where the BPE pre-tokenizer splits anyway."""
    start = 0
    while len(doc) - start > PIECE_CHARS:
        cut = _SAFE_CUT.search(doc, start + PIECE_CHARS)
        if cut is None:
            break
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


def _write_split(
    docs: Iterable[str], tok: Tokenizer, path: Path, dtype: np.dtype, budget: int | None, progress: bool
) -> int:
    """Encode docs into path as a flat dtype array; returns the token count."""
    n = n_docs = 0
    bar = tqdm(desc=f"tokenizing {path.stem}", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)
    with open(path, "wb") as f, bar:
        for batch in _batches(docs):
            for (_, starts_doc), ids in zip(batch, tok.encode_arrays([p for p, _ in batch]), strict=True):
                if starts_doc:
                    if n_docs and tok.eot_id is not None:  # a separator between documents
                        ids = np.concatenate(([tok.eot_id], ids))
                    n_docs += 1
                if budget is not None:
                    ids = ids[: budget - n]
                ids.astype(dtype).tofile(f)
                n += len(ids)
                bar.update(len(ids))
                if budget is not None and n >= budget:
                    return n
    return n


def main() -> None:
    """`python -m data.prepare <data overrides>`: prepare and print the directory on the last line."""
    import hydra  # lazily: the library above never needs Hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    # The schema of the data group, so a typo such as data.pth=x is refused before anything runs.
    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)
    config_dir = str(Path(__file__).resolve().parent.parent / "configs")

    @hydra.main(config_path=config_dir, config_name="prepare", version_base=None)
    def run(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
        try:
            data_cfg = OmegaConf.to_object(cfg.data)
            assert isinstance(data_cfg, DataConfig)
            path = prepare(data_cfg, progress=cfg.progress)
        except DataError as e:
            log.error("%s", e)
            sys.exit(1)
        print(path)

    run()


if __name__ == "__main__":
    main()

"""Tokenizers behind one interface: character-level (as nanoGPT) and byte-level BPE (`tokenizers`).

- `CharTokenizer`: the sorted characters of the whole text, as nanoGPT's shakespeare_char, so ids
  match nanoGPT's; encoding is a numpy lookup over code points.
- `HFTokenizer`: a `tokenizers.Tokenizer`: a byte-level BPE trained here (`train_bpe`, kind "bpe")
  or any tokenizer.json by path or hub name ("pretrained", pinned to data.tokenizer_revision).

`token_bytes()` is the denominator of bits per byte; `to_json()` lets each checkpoint carry its
tokenizer; `decode_stream(ids)` yields text per token, never half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.config import DataError
from data.hub import HubUnreachable, download_tokenizer
from data.prepared import REBUILD_HINT, TOKENIZER_FILE, read_meta, tokenizer_problem

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
UNK = "<unk>"
# End-of-document tokens of common pretrained tokenizers, tried in this order.
EOT_TOKENS = (EOT, "<|end_of_text|>", "</s>", "<eos>")
BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a SentencePiece byte-fallback token: one raw byte


class TokenizerUnavailable(DataError):
    """A pretrained tokenizer named by hub name could not be fetched (prepare may fall back to BPE)."""


class Tokenizer:
    """The interface every tokenizer here implements."""

    kind: str  # char | bpe | pretrained
    vocab_size: int
    eot_id: int | None  # the id placed between documents, None when the vocabulary has none

    def encode(self, text: str) -> list[int]:
        return self.encode_arrays([text])[0].tolist()

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts to int64 arrays (prepare's fast path: no Python int lists)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes of text each id stands for, 0 for special tokens
        (<|endoftext|>, <unk>); summed over a text's targets, its UTF-8 length, however cut."""
        raise NotImplementedError

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """The text of ids in non-empty pieces, each as soon as its id arrives; part of a UTF-8
        character waits for the rest (what is held at the end comes last, invalid bytes as U+FFFD),
        so the pieces joined equal decode(ids)."""
        step = self._step_decoder()
        seen: list[int] = []
        emitted = 0
        for i in ids:
            seen.append(int(i))
            if piece := step(seen[-1]):
                emitted += len(piece)
                yield piece
        if rest := self.decode(seen)[emitted:]:
            yield rest

    def _step_decoder(self) -> Callable[[int], str]:
        """id -> the text it completes; here each token alone (a char token is a whole character)."""
        return lambda i: self.decode([i])


class CharTokenizer(Tokenizer):
    """One id per character: ids are positions in the sorted character set (+ <unk> last, if asked)."""

    kind = "char"

    def __init__(self, chars: str, unk: bool = False) -> None:
        if not chars:
            raise DataError("the text is empty, so the char vocabulary is empty; give a non-empty corpus")
        if list(chars) != sorted(set(chars)):
            raise DataError("a char vocabulary must be sorted unique characters; rebuild it with CharTokenizer.from_text")
        self.chars, self.unk = chars, unk
        self.unk_id = len(chars) if unk else None
        self._pieces = [*chars, UNK] if unk else list(chars)  # id -> its text
        self.vocab_size = len(chars) + int(unk)
        self.eot_id = None  # nanoGPT's char vocabulary has no separator token; documents are concatenated
        codepoints = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4")
        # Lookup table code point -> id, -1 for characters outside the vocabulary.
        self._lut = np.full(int(codepoints.max()) + 1, -1, dtype=np.int64)
        self._lut[codepoints] = np.arange(len(chars))

    @classmethod
    def from_text(cls, texts: Iterable[str], unk: bool = False) -> CharTokenizer:
        """The sorted characters of all the texts (nanoGPT: sorted(set(data)) over the whole file)."""
        seen = np.zeros(0x110000, dtype=bool)
        for text in texts:
            # Marking code points in a table is much faster than set(text); 16 M characters at a time.
            for start in range(0, len(text), 1 << 24):
                seen[np.frombuffer(text[start : start + (1 << 24)].encode("utf-32-le", "surrogatepass"), "<u4")] = True
        return cls("".join(map(chr, np.flatnonzero(seen))), unk=unk)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            ids = self._lut[np.minimum(cps, len(self._lut) - 1)]
            bad = (ids < 0) | (cps >= len(self._lut))
            if bad.any():
                if self.unk_id is None:
                    ch = chr(int(cps[np.argmax(bad)]))
                    raise DataError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char vocabulary; remove it "
                                    "from the text, or prepare the data with data.unk=true to map unknown characters "
                                    "to <unk>")
                ids[bad] = self.unk_id
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise DataError(f"token id {bad[0]} is outside the char vocabulary of size {self.vocab_size}")
        return "".join(self._pieces[i] for i in ids)

    def token_bytes(self) -> np.ndarray:
        # <unk> stands for a character that is not in the vocabulary, so for no known number of bytes.
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars] + [0] * int(self.unk),
                        dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars, "unk": self.unk}, ensure_ascii=False)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (byte-level BPE trained here, or any pretrained tokenizer.json)."""

    def __init__(self, tok: _RustTokenizer, kind: str, revision: str | None = None) -> None:
        self.tok, self.kind = tok, kind
        self.revision = revision  # the hub commit a pretrained tokenizer came from, when it did
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = next((i for t in EOT_TOKENS if (i := tok.token_to_id(t)) is not None), None)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch_fast skips offset tracking; the batch is split across the library's threads.
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()

    def token_bytes(self) -> np.ndarray:
        """Byte-level BPE (ours, GPT-2's): each character of a vocabulary entry is one byte of the
        byte-level alphabet, so an entry's length is its bytes, whole characters or not. Other
        tokenizers: a byte-fallback entry (<0xE2>) is one byte; any other entry counts the UTF-8
        bytes that decoding adds after a preceding piece (so a SentencePiece "▁the" is " the",
        a WordPiece "##ing" is "ing"). Special added tokens count 0, other added tokens their text."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        byte_level = _has_byte_level(json.loads(self.tok.to_str()).get("decoder"))
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        for token, i in self.tok.get_vocab(with_added_tokens=False).items():
            if byte_level:
                out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
            elif BYTE_FALLBACK.fullmatch(token):
                out[i] = 1
            elif self.tok.decoder is not None:
                out[i] = len(self.tok.decoder.decode(["x", token]).encode("utf-8")) - 1
            else:
                out[i] = len(token.encode("utf-8"))
        for i, added in self.tok.get_added_tokens_decoder().items():
            out[i] = 0 if added.special else len(added.content.encode("utf-8"))
        return out

    def _step_decoder(self) -> Callable[[int], str]:
        # DecodeStream decodes a short window of ids and gives None while its text ends in half a
        # character (U+FFFD); the window starts at the last clean boundary, so decoders that depend
        # on neighbouring tokens still give the text decode() gives.
        stream = decoders.DecodeStream(skip_special_tokens=False)
        return lambda i: stream.step(self.tok, i) or ""


def _has_byte_level(decoder: dict | None) -> bool:
    """Whether a tokenizer.json decoder (or a Sequence of them) maps the byte-level alphabet to bytes."""
    return bool(decoder) and (decoder.get("type") == "ByteLevel"
                              or any(_has_byte_level(d) for d in decoder.get("decoders", [])))


def train_bpe(texts: Iterator[str], vocab_size: int, *, progress: bool = False) -> HFTokenizer:
    """Train a GPT-2 style byte-level BPE (with <|endoftext|>) on an iterator of texts."""
    tok = _RustTokenizer(models.BPE())
    # add_prefix_space=False keeps encode(a + b) == encode(a) + encode(b) at the line boundaries
    # prepare splits long documents on, so chunked parallel encoding equals encoding the whole.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bpe = HFTokenizer(tok, "bpe")
    if bpe.vocab_size < vocab_size:
        log.info("BPE stopped at %d tokens (asked %d): the text has no more pairs to merge", bpe.vocab_size, vocab_size)
    return bpe


def load_pretrained(name_or_path: str, revision: str | None = None) -> HFTokenizer:
    """A tokenizer.json by file or directory path, else fetched from the hub at revision (kept as
    `.revision`). Unreachable hub: TokenizerUnavailable (prepare falls back to a BPE), or with a
    revision a DataError (a pinned tokenizer is not silently replaced)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.is_file():
        if revision is not None:
            raise DataError(f"data.tokenizer_revision pins hub tokenizers, but {path} is a local file; unset it")
        file, commit, what, fix = path, None, str(path), "point data.tokenizer_path at one"
    # Hub names look like "gpt2" or "org/name"; anything else that does not exist is a wrong path.
    elif path.suffix == ".json" or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise DataError(f"data.tokenizer_path={name_or_path!r}: no such file; give the path of a tokenizer.json")
    else:
        try:
            file, commit = download_tokenizer(name_or_path, revision)
        except HubUnreachable as e:
            where = f"{name_or_path!r}" + (f" at revision {revision!r}" if revision else "")
            error = DataError if revision is not None else TokenizerUnavailable
            raise error(f"could not fetch tokenizer {where} from the hub ({e}); "
                        "give data.tokenizer_path=/path/to/tokenizer.json") from e
        what = f"{file} (tokenizer {name_or_path!r} from the hub)"
        fix = "delete it from the Hugging Face cache and run again"
    try:
        return HFTokenizer(_RustTokenizer.from_file(str(file)), "pretrained", revision=commit)
    except Exception as e:  # the Rust binding raises plain Exception for any parse error
        raise DataError(f"{what} is not a valid tokenizer.json ({e}); {fix}") from e


def tokenizer_from_json(s: str, kind: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output. `kind` labels a `tokenizers` JSON (bpe or
    pretrained); without it, a BPE model is labelled bpe and anything else pretrained."""
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise DataError(f"tokenizer JSON is not valid JSON ({e}); re-save it with the tokenizer's to_json()") from e
    if isinstance(obj, dict) and obj.get("kind") == "char":
        if not isinstance(obj.get("chars"), str):
            raise DataError("char tokenizer JSON has no 'chars' string; re-save it with the tokenizer's to_json()")
        return CharTokenizer(obj["chars"], unk=bool(obj.get("unk", False)))
    try:
        tok = _RustTokenizer.from_str(s)
    except Exception as e:  # the Rust binding raises plain Exception for any parse error
        raise DataError(f"tokenizer JSON is neither a char vocabulary nor a tokenizers file ({e})") from e
    return HFTokenizer(tok, kind or ("bpe" if obj.get("model", {}).get("type") == "BPE" else "pretrained"))


def load_tokenizer(prepared_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared data directory (its tokenizer.json, labelled by meta.json);
    a missing, cut-short or corrupt file is a one-line DataError that names it."""
    prepared_dir = Path(prepared_dir)
    path, meta = prepared_dir / TOKENIZER_FILE, read_meta(prepared_dir)
    if problem := tokenizer_problem(prepared_dir, meta):
        raise DataError(f"prepared data {problem}; {REBUILD_HINT}")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"), kind=meta["tokenizer"])
    except DataError as e:
        raise DataError(f"prepared data {path} is not a valid tokenizer ({e}); {REBUILD_HINT}") from None

"""Tokenizers: round trips, nanoGPT-compatible char ids, JSON round trips, decode_stream, dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from data.config import DataError
from data.prepare import _pieces, token_dtype
from data.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    load_pretrained,
    tokenizer_from_json,
    train_bpe,
)

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "héllo wörld 日本語 🙂 naïve café\n"
) * 40


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(iter([TEXT]), 300)


def test_char_vocab_is_sorted_set_of_whole_text_like_nanogpt():
    tok = CharTokenizer.from_text([TEXT[:100], TEXT[100:]])
    chars = sorted(set(TEXT))  # nanoGPT: chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    assert tok.vocab_size == len(chars)
    assert tok.encode(TEXT) == [stoi[c] for c in TEXT]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eot_id is None and tok.kind == "char"


def test_char_unknown_character_is_an_error_naming_it_or_unk():
    tok = CharTokenizer.from_text(["abc"])
    with pytest.raises(DataError, match=r"'z' \(U\+007A\).*data.unk=true"):
        tok.encode("abz")
    with pytest.raises(DataError, match="U\\+1F642"):
        tok.encode("a🙂")
    unk = CharTokenizer.from_text(["abc"], unk=True)
    assert unk.vocab_size == 4 and unk.unk_id == 3
    assert unk.encode("azb") == [0, 3, 1]
    assert [a.tolist() for a in unk.encode_arrays(["ab", "cz"])] == [[0, 1], [2, 3]]


def test_bpe_round_trip_and_eot(bpe):
    assert bpe.kind == "bpe"
    assert 257 <= bpe.vocab_size <= 300
    assert bpe.eot_id == 0  # the special token comes first
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges happened
    assert bpe.decode(ids) == TEXT
    assert [a.tolist() for a in bpe.encode_arrays(["hear me", "日本語"])] == [bpe.encode("hear me"), bpe.encode("日本語")]
    # Text never seen in training still encodes: every byte is in the alphabet.
    assert bpe.decode(bpe.encode("Ωmega ☃ ok")) == "Ωmega ☃ ok"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_to_json_round_trip(kind, bpe):
    tok = CharTokenizer.from_text([TEXT], unk=True) if kind == "char" else bpe
    again = tokenizer_from_json(tok.to_json())
    assert type(again) is type(tok)
    assert (again.kind, again.vocab_size, again.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    assert again.encode(TEXT) == tok.encode(TEXT)


def test_bad_tokenizer_json_is_a_data_error():
    with pytest.raises(DataError, match="not valid JSON"):
        tokenizer_from_json("{nope")
    with pytest.raises(DataError, match="neither a char vocabulary"):
        tokenizer_from_json('{"kind": "other"}')


def test_pretrained_by_path(tmp_path, bpe):
    (tmp_path / "tokenizer.json").write_text(bpe.to_json(), encoding="utf-8")
    tok = load_pretrained(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.kind == "pretrained" and tok.encode(TEXT) == bpe.encode(TEXT)
    with pytest.raises(DataError, match="no such file"):
        load_pretrained(str(tmp_path / "missing.json"))


def test_decode_stream_never_yields_broken_utf8(bpe):
    text = "héllo wörld 日本語 🙂"
    ids = bpe.encode(text)
    # With so few merges the multi-byte characters span several byte-level tokens.
    assert any("\ufffd" in bpe.decode([i]) for i in ids)
    pieces = list(bpe.decode_stream(ids))
    assert len(pieces) > 3 and all(p and "\ufffd" not in p for p in pieces)
    assert "".join(pieces) == bpe.decode(ids) == text


def test_decode_stream_yields_each_piece_when_its_id_arrives(bpe):
    arrived: list[int] = []

    def ids(seq):
        for i in seq:
            arrived.append(i)
            yield i

    ids_of = bpe.encode("ab 日")
    stream = bpe.decode_stream(ids(ids_of))
    assert next(stream) == bpe.decode(ids_of[:1]) and arrived == ids_of[:1]  # no read-ahead
    char = CharTokenizer.from_text([TEXT])
    assert list(char.decode_stream(char.encode("Speak, 日本"))) == list("Speak, 日本")


def test_decode_stream_holds_half_a_character_then_gives_the_rest_at_the_end(bpe):
    lead = next(i for i in bpe.encode("日") if "\ufffd" in bpe.decode([i]))  # the first byte of 日 alone
    a = bpe.encode("a")
    stream = bpe.decode_stream([*a, lead])
    assert next(stream) == "a"  # then the lead byte is held back ...
    assert list(stream) == [bpe.decode([lead])]  # ... and at the end given as it decodes (U+FFFD)


def test_pieces_encode_like_the_whole_text(bpe, monkeypatch):
    monkeypatch.setattr("data.prepare.PIECE_CHARS", 200)
    pieces = list(_pieces(TEXT))
    assert len(pieces) > 10 and "".join(pieces) == TEXT
    flat = [i for ids in bpe.encode_arrays(pieces) for i in ids.tolist()]
    assert flat == bpe.encode(TEXT)


def test_char_encode_arrays_dtype_and_values():
    tok = CharTokenizer.from_text(["ba"])
    (arr,) = tok.encode_arrays(["abba"])
    assert isinstance(arr, np.ndarray) and arr.tolist() == [0, 1, 1, 0]


def test_token_dtype_choice():
    assert token_dtype(65) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(2**16) == np.uint16  # ids 0..65535 fit
    assert token_dtype(2**16 + 1) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(DataError, match="does not fit uint32"):
        token_dtype(2**32 + 1)

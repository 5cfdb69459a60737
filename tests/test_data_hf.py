"""The hf source on local datasets the tests write (no hub): json files, streaming, save_to_disk."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from data.config import DataConfig, DataError
from data.prepare import prepare, read_meta
from data.tokenizer import load_tokenizer

DOCS = [f"Story {i}: once upon a time a small robot named R{i} found {i % 5} shiny stones." for i in range(60)]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CAUSALGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def jsonl(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    return path


def split_texts(out: Path, split: str) -> list[str]:
    meta = read_meta(out)
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    return load_tokenizer(out).decode(ids).split("<|endoftext|>")


def test_json_dataset_holds_out_last_documents(cache, jsonl):
    cfg = DataConfig(source="hf", hf_name="json", path=str(jsonl), text_field="body", tokenizer="bpe", vocab_size=300)
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    assert meta["source"] == "hf" and meta["tokenizer"] == "bpe"
    assert split_texts(out, "train") == DOCS[:54]  # the last 10 % of documents validate
    assert split_texts(out, "val") == DOCS[54:]
    assert (cache / "hf").is_dir()  # the Arrow copy of local files stays in our cache
    assert prepare(cfg, progress=False) == out


def test_streaming_with_token_budget(cache, jsonl):
    cfg = DataConfig(
        source="hf", hf_name="json", path=str(jsonl), text_field="body", streaming=True,
        tokenizer="char", max_tokens=2000,
    )
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    assert meta["tokens"] == {"train": 1800, "val": 200}
    train = load_tokenizer(out).decode(np.fromfile(out / "train.bin", dtype=meta["dtype"]))
    val = load_tokenizer(out).decode(np.fromfile(out / "val.bin", dtype=meta["dtype"]))
    # Streaming holds out every 10th document (the stream's length is unknown).
    assert train.startswith(DOCS[0] + DOCS[1]) and DOCS[9] not in train
    assert val.startswith(DOCS[9] + DOCS[19])
    # Budget off: everything is read, still split every 10th document.
    full = prepare(DataConfig(source="hf", hf_name="json", path=str(jsonl), text_field="body", streaming=True),
                   progress=False)
    assert read_meta(full)["tokens"]["val"] == sum(len(d) for d in DOCS[9::10])


def test_streaming_bpe(cache, jsonl):
    cfg = DataConfig(source="hf", hf_name="json", path=str(jsonl), text_field="body", streaming=True,
                     tokenizer="bpe", vocab_size=280, max_tokens=1500)
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    assert meta["tokens"]["train"] == 1350 and meta["tokens"]["val"] == 150
    assert split_texts(out, "train")[0] == DOCS[0]


def test_missing_text_field_lists_the_fields(cache, jsonl):
    for streaming in (False, True):
        cfg = DataConfig(source="hf", hf_name="json", path=str(jsonl), streaming=streaming)
        with pytest.raises(DataError, match=r"no field 'text'; its fields are (id, body|body, id)"):
            prepare(cfg, progress=False)


def test_save_to_disk_with_validation_split(cache, tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": DOCS[:50]}),
        "validation": datasets.Dataset.from_dict({"text": DOCS[50:]}),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "saved"), hf_val_split="validation", tokenizer="char")
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    assert meta["tokens"]["val"] == sum(len(d) for d in DOCS[50:])
    with pytest.raises(DataError, match="has no split 'test'; it has train, validation"):
        prepare(DataConfig(source="hf", hf_name=str(tmp_path / "saved"), hf_val_split="test"), progress=False)


def test_empty_validation_split_is_an_error(cache, tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": DOCS}),
        "validation": datasets.Dataset.from_dict({"text": ["", None]}),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="val split .* is empty"):
        prepare(DataConfig(source="hf", hf_name=str(tmp_path / "saved"), hf_val_split="validation"), progress=False)


def test_unknown_split_and_missing_files_are_data_errors(cache, jsonl, tmp_path):
    with pytest.raises(DataError, match="could not load dataset 'json'.*split 'validation'"):
        prepare(DataConfig(source="hf", hf_name="json", path=str(jsonl), text_field="body", hf_val_split="validation"),
                progress=False)
    with pytest.raises(DataError, match="no such file"):
        prepare(DataConfig(source="hf", hf_name="json", path=str(tmp_path / "nope.jsonl")), progress=False)

"""Supply chain: hub datasets and tokenizers pinned by revision (the resolved commit recorded in
meta.json and hashed into the fingerprint), remote code never enabled, failed downloads leave
nothing in the cache. The hub is monkeypatched throughout (no network): datasets come from
`datasets.Dataset.from_dict`, tokenizers from a tokenizer.json the test trains."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import numpy as np
import pytest
from conftest import names_besides_locks
from huggingface_hub.utils import RevisionNotFoundError

from data.config import DataConfig, DataError
from data.prepare import prepare, read_meta
from data.tokenizer import load_tokenizer, train_bpe

SHA_A = "a" * 40
SHA_B = "b" * 40
DOCS = [f"Tale {i}: a fox and a crow met by the well {i % 3} times." for i in range(40)]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CAUSALGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _revision_not_found() -> RevisionNotFoundError:
    # Built without an HTTP response (its constructor wants one, differently across versions).
    err = RevisionNotFoundError.__new__(RevisionNotFoundError)
    Exception.__init__(err, "404 Revision Not Found")
    return err


@pytest.fixture
def hub(monkeypatch) -> SimpleNamespace:
    """A fake hub: dataset_info answers with `state.sha` (or raises `state.error`), load_dataset
    records its keyword arguments and returns DOCS."""
    state = SimpleNamespace(sha=SHA_A, error=None, info_calls=[], loads=[])

    def dataset_info(self, repo_id, *, revision=None, **kwargs):
        state.info_calls.append((repo_id, revision))
        if state.error is not None:
            raise state.error
        return SimpleNamespace(sha=state.sha)

    def load_dataset(path, name=None, **kwargs):
        state.loads.append({"path": path, **kwargs})
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


def hub_cfg(**kwargs) -> DataConfig:
    return DataConfig(source="hf", hf_name="org/tales", tokenizer="char", **kwargs)


def test_pinned_dataset_loads_the_resolved_commit_without_remote_code(cache, hub):
    out = prepare(hub_cfg(revision="v1.0"), progress=False)
    assert hub.info_calls == [("org/tales", "v1.0")]
    assert {(d["revision"], d["trust_remote_code"]) for d in hub.loads} == {(SHA_A, False)}
    meta = read_meta(out)
    assert meta["revision"] == {"dataset": SHA_A, "tokenizer": None}
    assert meta["config"]["revision"] == "v1.0"  # what was asked, next to what it resolved to
    assert load_tokenizer(out).decode(np.fromfile(out / "val.bin", dtype="uint16")) == "".join(DOCS[36:])
    # The tag moves to another commit: another fingerprint, another build.
    hub.sha = SHA_B
    moved = prepare(hub_cfg(revision="v1.0"), progress=False)
    assert moved != out and read_meta(moved)["revision"]["dataset"] == SHA_B


def test_a_commit_sha_needs_no_hub_call_and_matches_its_tag(cache, hub):
    tagged = prepare(hub_cfg(revision="v1.0"), progress=False)  # resolves to SHA_A
    hub.error = OSError("must not ask the hub")
    assert prepare(hub_cfg(revision=SHA_A), progress=False) == tagged
    assert hub.info_calls == [("org/tales", "v1.0")]


def test_unpinned_records_the_commit_but_a_cache_hit_needs_no_network(cache, hub):
    out = prepare(hub_cfg(), progress=False)
    assert read_meta(out)["revision"]["dataset"] == SHA_A
    assert hub.loads[0]["revision"] == SHA_A  # the commit recorded is the commit loaded
    hub.error, hub.sha = OSError("offline"), SHA_B
    calls = len(hub.info_calls)
    assert prepare(hub_cfg(), progress=False) == out  # unpinned: the fingerprint has no commit
    assert len(hub.info_calls) == calls


def test_offline_pin_falls_back_to_the_name_and_unknown_revision_is_one_line(cache, hub):
    hub.error = OSError("offline")
    out = prepare(hub_cfg(revision="v2"), progress=False)
    assert read_meta(out)["revision"]["dataset"] == "v2" and hub.loads[-1]["revision"] == "v2"
    hub.error = _revision_not_found()
    with pytest.raises(DataError, match=r"data\.revision='nope' is not a branch, tag or commit of dataset "
                                        r"'org/tales'") as info:
        prepare(hub_cfg(revision="nope"), progress=False)
    assert "\n" not in str(info.value)


def test_revision_is_refused_for_builders_local_dirs_and_other_sources(cache, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=r"data\.revision pins hub datasets, but data\.hf_name='json' is a builder"):
        prepare(DataConfig(source="hf", hf_name="json", path=str(tmp_path / "d.jsonl"), revision="main"),
                progress=False)
    with pytest.raises(DataError, match="is a local"):
        prepare(DataConfig(source="hf", hf_name=str(tmp_path), revision="main"), progress=False)
    with pytest.raises(DataError, match=r"data\.revision pins Hugging Face hub datasets; unset it"):
        DataConfig(source="files", path="x", revision="main")
    with pytest.raises(DataError, match=r"data\.tokenizer_revision pins a hub tokenizer"):
        DataConfig(tokenizer="bpe", tokenizer_revision="main")
    with pytest.raises(DataError, match=r"data\.revision='' must name a branch"):
        DataConfig(source="hf", hf_name="org/x", revision="")


def test_a_stream_that_breaks_part_way_is_one_line_and_leaves_nothing(cache, monkeypatch):
    def broken_stream(path, name=None, **kwargs):
        def gen():
            yield from ({"text": d} for d in DOCS[:20])
            raise ConnectionResetError(104, "Connection reset by peer")
        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", broken_stream)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: SimpleNamespace(sha=SHA_A))
    with pytest.raises(DataError, match=r"reading dataset 'org/tales' failed part way \(ConnectionResetError") as info:
        prepare(DataConfig(source="hf", hf_name="org/tales", streaming=True), progress=False)
    assert "\n" not in str(info.value)
    assert [name for name in names_besides_locks(cache) if name != "hf"] == []


# --- tokenizers ---------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_hub(tmp_path, monkeypatch) -> SimpleNamespace:
    """hf_hub_download serving a trained tokenizer.json from a cache laid out as the hub's
    (snapshots/<commit>/tokenizer.json), recording the revisions asked for."""
    bpe = train_bpe(iter(DOCS * 5), 300)
    state = SimpleNamespace(sha=SHA_A, asked=[], error=None)

    def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):
        state.asked.append(revision)
        if state.error is not None:
            raise state.error
        path = tmp_path / "hfcache" / "snapshots" / state.sha / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(bpe.to_json(), encoding="utf-8")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


def test_pretrained_tokenizer_pinned_by_revision(cache, tmp_path, tokenizer_hub):
    (tmp_path / "c.txt").write_text("\n".join(DOCS))
    base = dict(source="files", path=str(tmp_path / "c.txt"), tokenizer="pretrained", tokenizer_path="org/tok")
    pinned = prepare(DataConfig(**base, tokenizer_revision="v3"), progress=False)
    assert tokenizer_hub.asked == ["v3"]
    assert read_meta(pinned)["revision"] == {"dataset": None, "tokenizer": SHA_A}
    unpinned = prepare(DataConfig(**base), progress=False)
    assert read_meta(unpinned)["revision"]["tokenizer"] == SHA_A  # recorded even when not pinned
    assert unpinned != pinned  # a pin is part of the fingerprint
    tokenizer_hub.sha = SHA_B  # the tag moved (same file here): a new fingerprint
    assert prepare(DataConfig(**base, tokenizer_revision="v3"), progress=False) != pinned


def test_pinned_tokenizer_that_cannot_be_fetched_is_an_error_not_a_fallback(cache, tmp_path, tokenizer_hub):
    (tmp_path / "c.txt").write_text("\n".join(DOCS))
    base = dict(source="files", path=str(tmp_path / "c.txt"), tokenizer="pretrained", tokenizer_path="org/tok")
    tokenizer_hub.error = OSError("offline")
    with pytest.raises(DataError, match=r"could not fetch tokenizer 'org/tok' at revision 'v3' from the hub \(offline\)"):
        prepare(DataConfig(**base, tokenizer_revision="v3"), progress=False)
    tokenizer_hub.error = _revision_not_found()
    with pytest.raises(DataError, match=r"data\.tokenizer_revision='v9' is not a branch, tag or commit of 'org/tok'"):
        prepare(DataConfig(**base, tokenizer_revision="v9"), progress=False)
    with pytest.raises(DataError, match="pins hub tokenizers, but .* is a local file"):
        prepare(DataConfig(**{**base, "tokenizer_path": str(tmp_path / "c.txt")}, tokenizer_revision="v3"),
                progress=False)


# --- the tiny Shakespeare download --------------------------------------------------------------

SHAKESPEARE = b"Shall I compare thee to a summer's day?\n" * 40


@pytest.fixture
def shakespeare_hub(monkeypatch) -> list[str]:
    fetched: list[str] = []
    monkeypatch.setattr("data.sources.SHAKESPEARE_SHA256", hashlib.sha256(SHAKESPEARE).hexdigest())
    monkeypatch.setattr("data.sources.fetch_url", lambda url, timeout: fetched.append(url) or SHAKESPEARE)
    return fetched


def test_download_that_cannot_be_saved_leaves_no_partial_file(cache, shakespeare_hub, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(DataError, match=r"cannot write the tiny Shakespeare copy .*No space left on device"):
        prepare(DataConfig(), progress=False)
    assert names_besides_locks(cache / "raw") == []


def test_killed_download_leftovers_and_a_cut_short_copy_are_replaced(cache, shakespeare_hub):
    raw = cache / "raw"
    raw.mkdir(parents=True)
    (raw / ".tinyshakespeare.txt.tmp-dead").write_bytes(SHAKESPEARE[:10])  # a killed download
    (raw / "tinyshakespeare.txt").write_bytes(SHAKESPEARE[:100])  # cut short (older, non-atomic write)
    with pytest.warns(UserWarning, match=r"tinyshakespeare\.txt is truncated or corrupt \(100 bytes"):
        out = prepare(DataConfig(), progress=False)
    assert names_besides_locks(raw) == ["tinyshakespeare.txt"]
    assert (raw / "tinyshakespeare.txt").read_bytes() == SHAKESPEARE and len(shakespeare_hub) == 1
    assert read_meta(out)["source"] == "shakespeare_char"

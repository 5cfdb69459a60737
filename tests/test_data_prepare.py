"""prepare(): token files and meta.json, the cache, atomic builds, sources and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import names_besides_locks

import data.prepare as prep
from data.config import DataConfig, DataError
from data.prepare import prepare, read_meta
from data.tokenizer import CharTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = "".join(f"Line {i}: the quick brown fox — naïve café {i % 7}\n" for i in range(600))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CAUSALGPT_CACHE", str(root))
    return root


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tokens(directory: Path, split: str) -> np.ndarray:
    return np.fromfile(directory / f"{split}.bin", dtype=read_meta(directory)["dtype"])


def test_char_files_prepare_meta_and_nanogpt_split(cache, corpus_file):
    out = prepare(DataConfig(source="files", path=str(corpus_file)), progress=False)
    assert out.parent == cache and out.name.startswith("files-char-")
    meta = read_meta(out)
    assert meta["source"] == "files" and meta["tokenizer"] == "char"
    assert meta["vocab_size"] == len(set(TEXT)) and meta["eot_id"] is None
    assert meta["dtype"] == "uint16" and meta["format_version"] == prep.FORMAT_VERSION
    n_train = int(len(TEXT) * 0.9)
    assert meta["tokens"] == {"train": n_train, "val": len(TEXT) - n_train}
    assert meta["fingerprint"] in out.name
    tok = load_tokenizer(out)
    assert tok.decode(tokens(out, "train")) == TEXT[:n_train]
    assert tok.decode(tokens(out, "val")) == TEXT[n_train:]


def test_bpe_prepare_separates_documents_with_eot(cache, tmp_path):
    docs = [TEXT[:8000], TEXT[8000:16000], TEXT[16000:]]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    cfg = DataConfig(source="files", path=str(tmp_path / "doc*.txt"), tokenizer="bpe", vocab_size=300)
    out = prepare(cfg, progress=False)
    meta = read_meta(out)
    tok = load_tokenizer(out)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == tok.vocab_size <= 300
    assert (out / "tokenizer.json").is_file()
    train = tokens(out, "train").tolist()
    assert train.count(tok.eot_id) == 2  # between the three documents, all in the train split
    parts = tok.decode(train).split("<|endoftext|>")
    assert parts[:2] == docs[:2] and docs[2].startswith(parts[2])
    assert meta["tokens"]["train"] == len(train)


def test_cache_hit_does_not_retokenize_and_changes_rebuild(cache, corpus_file, monkeypatch):
    cfg = DataConfig(source="files", path=str(corpus_file))
    first = prepare(cfg, progress=False)
    calls = []
    monkeypatch.setattr(CharTokenizer, "encode_arrays", lambda self, texts: calls.append(1) or 1 / 0)
    monkeypatch.setattr(CharTokenizer, "from_text", classmethod(lambda cls, *a, **k: calls.append(1) or 1 / 0))
    assert prepare(cfg, progress=False) == first
    assert calls == []
    monkeypatch.undo()
    other = prepare(DataConfig(source="files", path=str(corpus_file), val_fraction=0.2), progress=False)
    assert other != first
    corpus_file.write_text(TEXT + "more\n", encoding="utf-8")  # new size and mtime: new content
    assert prepare(cfg, progress=False) not in (first, other)


def test_interrupted_prepare_leaves_nothing_valid_and_retry_works(cache, corpus_file, monkeypatch):
    real = prep._write_split

    def crash_on_val(docs, tok, path, *args):
        if path.stem == "val":
            path.write_bytes(b"\x00\x01partial")
            raise KeyboardInterrupt  # like Ctrl-C in the middle of writing
        return real(docs, tok, path, *args)

    monkeypatch.setattr(prep, "_write_split", crash_on_val)
    cfg = DataConfig(source="files", path=str(corpus_file))
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert names_besides_locks(cache) == []  # no final dir and no temporary dir
    monkeypatch.setattr(prep, "_write_split", real)
    out = prepare(cfg, progress=False)
    assert read_meta(out)["tokens"]["val"] > 0


def test_stale_temporary_dir_is_ignored_and_removed(cache, corpus_file):
    cfg = DataConfig(source="files", path=str(corpus_file))
    out = prepare(cfg, progress=False)
    final_name = out.name
    import shutil

    shutil.rmtree(out)
    stale = cache / f".{final_name}.tmp-killed"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"junk")
    assert prepare(cfg, progress=False).name == final_name
    assert not stale.exists()


def test_concurrent_prepares_build_once(cache, corpus_file, monkeypatch):
    real = prep._build
    builds = []

    def slow_build(*args):
        builds.append(1)
        threading.Event().wait(0.3)  # hold the lock while the other thread arrives
        return real(*args)

    monkeypatch.setattr(prep, "_build", slow_build)
    cfg = DataConfig(source="files", path=str(corpus_file))
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare(cfg, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(builds) == 1
    read_meta(results[0])


@pytest.mark.parametrize(("num_proc", "user_value", "variable", "during"), [
    (3, None, "RAYON_NUM_THREADS", "3"),  # sizes the tokenizers thread pool
    (3, "5", "RAYON_NUM_THREADS", "5"),  # a value the user set wins
    (1, None, "TOKENIZERS_PARALLELISM", "false"),  # one thread: parallelism off
])
def test_thread_settings_hold_during_the_build_and_leave_os_environ_as_it_was(cache, corpus_file, monkeypatch,
                                                                               num_proc, user_value, variable, during):
    for name in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    if user_value is not None:
        monkeypatch.setenv(variable, user_value)
    real, seen = prep._write_split, []

    def record(*args):
        seen.append(os.environ.get(variable))
        return real(*args)

    monkeypatch.setattr(prep, "_write_split", record)
    before = dict(os.environ)
    prepare(DataConfig(source="files", path=str(corpus_file), num_proc=num_proc), progress=False)
    assert seen == [during, during]  # train.bin and val.bin
    assert dict(os.environ) == before


def test_shakespeare_from_user_path_splits_like_nanogpt_and_warns_on_checksum(cache, tmp_path, monkeypatch):
    fake = tmp_path / "input.txt"
    text = "".join(chr(65 + i % 26) + ("\n" if i % 40 == 39 else "") for i in range(1000))
    fake.write_text(text, encoding="utf-8")
    monkeypatch.setattr("data.sources.fetch_url", lambda *a, **k: pytest.fail("must not download"))
    with pytest.warns(UserWarning, match="not the canonical tiny Shakespeare"):
        out = prepare(DataConfig(path=str(fake)), progress=False)
    n = len(text)
    tok = load_tokenizer(out)
    # nanoGPT: train_data = data[:int(n*0.9)], val_data = data[int(n*0.9):], vocab over the whole text.
    assert tok.decode(tokens(out, "train")) == text[: int(n * 0.9)]
    assert tok.decode(tokens(out, "val")) == text[int(n * 0.9) :]
    assert read_meta(out)["source"] == "shakespeare_char"


def test_shakespeare_download_is_verified_and_cached(cache, monkeypatch):
    text = b"To be, or not to be, that is the question:\n" * 50
    monkeypatch.setattr("data.sources.SHAKESPEARE_SHA256", hashlib.sha256(text).hexdigest())
    monkeypatch.setattr("data.sources.fetch_url", lambda url, timeout: text)
    out = prepare(DataConfig(), progress=False)
    assert (cache / "raw" / "tinyshakespeare.txt").read_bytes() == text
    monkeypatch.setattr("data.sources.fetch_url", lambda *a, **k: pytest.fail("must use the cached copy"))
    assert prepare(DataConfig(), progress=False) == out


def test_offline_falls_back_to_python_stdlib_with_a_warning(cache, monkeypatch, caplog):
    def offline(url, timeout):
        assert timeout == 15
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("data.sources.fetch_url", offline)
    with pytest.warns(UserWarning, match=r"could not be downloaded.*python_stdlib.*data\.path="):
        out = prepare(DataConfig(max_chars=20_000), progress=False)
    assert any(r.levelname == "WARNING" and "python_stdlib" in r.message for r in caplog.records)
    meta = read_meta(out)
    assert meta["source"] == "python_stdlib" and meta["requested_source"] == "shakespeare_char"
    assert "no network" in meta["source_info"]["fallback_reason"]
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 20_000
    with pytest.raises(DataError, match="could not be downloaded"):
        prepare(DataConfig(fallback=None), progress=False)


def test_checksum_mismatch_on_download_falls_back(cache, monkeypatch):
    monkeypatch.setattr("data.sources.fetch_url", lambda url, timeout: b"not shakespeare")
    with pytest.warns(UserWarning, match="wrong sha256"):
        out = prepare(DataConfig(max_chars=5_000), progress=False)
    assert read_meta(out)["source"] == "python_stdlib"


def test_python_stdlib_is_deterministic(cache):
    a = prepare(DataConfig(source="python_stdlib", max_chars=30_000), progress=False)
    b = prepare(DataConfig(source="python_stdlib", max_chars=30_000, cache_dir=str(cache / "other")), progress=False)
    assert a.name == b.name
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()


def test_cache_dir_config_overrides_environment(cache, corpus_file, tmp_path):
    out = prepare(DataConfig(source="files", path=str(corpus_file), cache_dir=str(tmp_path / "mine")), progress=False)
    assert out.parent == tmp_path / "mine"


def test_bad_byte_names_file_and_offset_unless_replace(cache, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\nwor\xffld\n" * 20)
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8 at byte offset 9 .*data\.errors=replace"):
        prepare(DataConfig(source="files", path=str(bad)), progress=False)
    out = prepare(DataConfig(source="files", path=str(bad), errors="replace"), progress=False)
    assert "\ufffd" in load_tokenizer(out).decode(tokens(out, "train"))


def test_input_errors_are_one_line_data_errors(cache, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "emptydir").mkdir()
    cases = [
        (dict(source="files", path=str(tmp_path / "missing.txt")), "no such file or directory"),
        (dict(source="files", path=str(empty)), "the file is empty"),
        (dict(source="files", path=str(tmp_path / "*.nothing")), "matches no files"),
        (dict(source="files", path=str(tmp_path / "emptydir")), "holds no files"),
        (dict(path=str(tmp_path / "missing.txt")), "no such file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as info:
            prepare(DataConfig(**kwargs), progress=False)
        assert "\n" not in str(info.value)


def test_tiny_corpus_gives_an_empty_val_split_error(cache, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefgh")
    with pytest.raises(DataError, match="val split .* is empty; raise data.val_fraction"):
        prepare(DataConfig(source="files", path=str(tiny), val_fraction=1e-18), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(source="nope"), "not a known source; use one of shakespeare_char, python_stdlib, files, hf"),
        (dict(tokenizer="wordpiece"), "not a known tokenizer; use one of char, bpe, pretrained"),
        (dict(errors="ignore"), "use strict or replace"),
        (dict(source="files"), "needs data.path"),
        (dict(source="hf"), "needs data.hf_name"),
        (dict(tokenizer="pretrained"), "needs data.tokenizer_path"),
        (dict(tokenizer="bpe", vocab_size=100), "too small for byte-level BPE"),
        (dict(vocab_size=2**32 + 5), "does not fit uint32"),
        (dict(val_fraction=0.0), "val_fraction"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(max_tokens=0), "data.max_tokens=0 must be positive"),
        (dict(streaming=True), "streaming=true applies to data.source=hf only"),
        (dict(path=3), "must be a path string"),
        (dict(fallback="files"), "use python_stdlib or null"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_read_meta_of_a_non_prepared_dir(tmp_path):
    with pytest.raises(DataError, match="not a prepared data directory"):
        read_meta(tmp_path)


def test_cli_prints_directory_last_and_refuses_typos(tmp_path, corpus_file):
    base = [sys.executable, "-m", "data.prepare", "data=files", f"data.path={corpus_file}",
            f"data.cache_dir={tmp_path / 'c'}", "progress=false"]
    done = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    out = Path(done.stdout.strip().splitlines()[-1])
    assert read_meta(out)["source"] == "files"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
    typo = subprocess.run(base + ["data.pth=x"], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(REPO)})
    assert typo.returncode != 0 and "pth" in typo.stderr
    bad = subprocess.run(base[:4] + ["data.path=/no/such/file"], cwd=tmp_path, capture_output=True, text=True,
                         env={**_env(), "PYTHONPATH": str(REPO)})
    assert bad.returncode == 1 and "no such file or directory" in bad.stderr
    assert json.loads((out / "meta.json").read_text())["tokens"]["train"] > 0


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "CAUSALGPT_CACHE"}


def test_pretrained_tokenizer_by_path_and_hub_fallback_to_bpe(cache, corpus_file, tmp_path, monkeypatch):
    bpe_dir = prepare(DataConfig(source="files", path=str(corpus_file), tokenizer="bpe", vocab_size=300),
                      progress=False)
    cfg = DataConfig(source="files", path=str(corpus_file), tokenizer="pretrained",
                     tokenizer_path=str(bpe_dir / "tokenizer.json"))
    out = prepare(cfg, progress=False)
    assert read_meta(out)["tokenizer"] == "pretrained"
    assert (out / "train.bin").read_bytes() == (bpe_dir / "train.bin").read_bytes()

    def offline(repo_id, filename, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    cfg = DataConfig(source="files", path=str(corpus_file), tokenizer="pretrained", tokenizer_path="gpt2",
                     vocab_size=300)
    with pytest.warns(UserWarning, match="could not fetch tokenizer 'gpt2'.*training a byte-level BPE with 300"):
        fallback = prepare(cfg, progress=False)
    assert read_meta(fallback)["tokenizer"] == "bpe" and fallback.name.startswith("files-bpe-")


def test_every_data_preset_composes_with_the_schema():
    import hydra
    from omegaconf import OmegaConf

    from data.prepare import register_schema
    register_schema()
    presets = sorted(p.stem for p in (REPO / "configs" / "data").glob("*.yaml"))
    assert {"shakespeare_char", "python_stdlib", "files", "hf", "tinystories", "fineweb_edu"} <= set(presets)
    with hydra.initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        for name in presets:
            cfg = hydra.compose(config_name="prepare", overrides=[f"data={name}"])
            if name in ("files", "hf"):  # these need a path / a dataset name from the user
                with pytest.raises(DataError, match="needs data"):
                    OmegaConf.to_object(cfg.data)
            else:
                data_cfg = OmegaConf.to_object(cfg.data)
                assert isinstance(data_cfg, DataConfig) and data_cfg.name == name
        assert OmegaConf.to_object(hydra.compose(config_name="prepare")).get("data").source == "shakespeare_char"
        from hydra.errors import ConfigCompositionException

        with pytest.raises(ConfigCompositionException, match="pth"):
            hydra.compose(config_name="prepare", overrides=["data.pth=x"])

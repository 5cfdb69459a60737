"""Our pickle-free export (model.safetensors + config.json + tokenizer.json) and load_pretrained's
dispatch over checkpoints, run directories, exports and the paths that are none of these."""

import json

import pytest
import torch
from conftest import names_besides_locks

from data.tokenizer import CharTokenizer, tokenizer_from_json
from engine.checkpoint import CheckpointError, save_checkpoint
from engine.formats.pretrained import (
    from_pretrained,
    load_pretrained,
    prepare_out_dir,
    save_export,
    write_dir,
)
from model import GPT, ModelConfig

TEXT = "To be, or not to be, that is the question:\n"


def checkpoint(tmp_path, **overrides) -> tuple[GPT, dict]:
    torch.manual_seed(0)
    tok = CharTokenizer.from_text([TEXT])
    cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16), **overrides})
    model = GPT(cfg).eval()
    ckpt = {"model": model.state_dict(), "model_config": cfg.to_dict(), "tokenizer": tok.to_json(),
            "config": {"run": "test"}, "step": 7}
    save_checkpoint(tmp_path / "run" / "last.pt", ckpt)
    return model, ckpt


@pytest.mark.parametrize("overrides", [
    {},  # the tiny default: post-LN, learned positions, tied
    {"norm": "pre", "pos": "rope", "tie_weights": False, "activation": "gelu_tanh"},
    {"pos": "sinusoidal", "bias": False}])
def test_export_round_trip_gives_the_same_model_and_tokenizer(tmp_path, monkeypatch, overrides):
    model, ckpt = checkpoint(tmp_path, **overrides)
    files = save_export(load_pretrained(tmp_path / "run"), tmp_path / "export")
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["format"] == "causalgpt" and config["model_config"] == ckpt["model_config"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_pretrained(tmp_path / "export")
    assert loaded["source"] == "export" and loaded["tokenizer"] == ckpt["tokenizer"]
    assert loaded["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
    again = from_pretrained(tmp_path / "export")
    assert (again.lm_head.weight is again.wte.weight) == model.config.tie_weights
    assert not again.training
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])
    assert tokenizer_from_json(again.tokenizer_json).decode(CharTokenizer.from_text([TEXT]).encode(TEXT)) == TEXT


def test_load_pretrained_reads_checkpoint_files_and_run_dirs(tmp_path):
    _, ckpt = checkpoint(tmp_path)
    for path in (tmp_path / "run", tmp_path / "run" / "last.pt"):
        loaded = load_pretrained(path)
        assert loaded["source"] == "checkpoint" and loaded["step"] == 7 and loaded["tokenizer"] == ckpt["tokenizer"]


def test_from_pretrained_overrides_change_how_it_runs_not_its_weights(tmp_path):
    model, _ = checkpoint(tmp_path)
    explicit = from_pretrained(tmp_path / "run", attn="explicit", dropout=0.1)
    assert explicit.config.attn == "explicit" and explicit.config.dropout == 0.1
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (explicit.eval()(idx)[0] - model(idx)[0]).abs().max() < 1e-5


def test_paths_that_are_nothing_we_load_say_what_would_be(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; pass a checkpoint"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in directory .*Hugging Face GPT-2 directory"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        load_pretrained(tmp_path / "llama")


def test_export_of_another_format_version_or_without_weights_is_refused(tmp_path):
    _, ckpt = checkpoint(tmp_path)
    save_export(ckpt, tmp_path / "export")
    (tmp_path / "export" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    (tmp_path / "export" / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_pretrained(tmp_path / "export")


def test_out_dir_rules_and_a_failed_write_leaves_it_untouched(tmp_path):
    out = tmp_path / "out"
    assert prepare_out_dir(out, overwrite=False) == out
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty.*overwrite=true"):
        prepare_out_dir(out, overwrite=False)
    prepare_out_dir(out, overwrite=True)

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")
    with pytest.raises(CheckpointError, match=f"cannot write {out}: disk full; {out} is unchanged"):
        write_dir(out, broken)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert names_besides_locks(tmp_path) == ["out"]  # no temporary directory left behind
    assert write_dir(out, lambda tmp: (tmp / "config.json").write_text("{}")) == ["config.json", "keep.txt"]

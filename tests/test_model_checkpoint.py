"""Checkpoints: atomic writes, safe (weights_only) reads, clear errors naming the file."""

import pytest
import torch

from engine.formats.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from engine.parallel import unwrap_model
from model import GPT, ModelConfig


def tiny(pos="learned"):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16, pos=pos))


def payload(model, **extra):
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), **extra}


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_round_trip_rebuilds_the_same_model(tmp_path, pos):
    model = tiny(pos)
    save_checkpoint(tmp_path / "last.pt", payload(model, step=7, tokenizer='{"kind": "char"}'))
    ckpt = load_checkpoint(tmp_path)  # a run directory resolves to its checkpoint
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["step"] == 7
    again = model_from_checkpoint(ckpt)
    assert again.lm_head.weight is again.wte.weight
    idx = torch.randint(0, 23, (2, 8))
    assert torch.equal(model(idx)[0], again(idx)[0])


def test_run_directory_prefers_best_then_last_then_checkpoints_folder(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", payload(model))
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(tmp_path / "last.pt", payload(model))
    save_checkpoint(tmp_path / "best.pt", payload(model))
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    path = save_checkpoint(tmp_path / "last.pt", payload(model, step=1))

    def explode(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, payload(model, step=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_corrupt_missing_and_foreign_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt.*corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path / "..")
    torch.save({"model": {}, "model_config": {}, "format_version": 999}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a causalgpt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class Evil:
    """Any class: unpickling it could run code, so weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {}, "model_config": {}, "format_version": FORMAT_VERSION, "x": Evil()},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_unwrap_removes_the_compile_wrapper():
    model = tiny()
    assert unwrap_model(torch.compile(model)) is model


def test_overrides_change_how_the_model_runs_not_its_weights(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "m.pt", payload(model))
    leaky = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), causal=False, attn="explicit")
    assert not leaky.config.causal
    assert torch.equal(leaky.wte.weight, model.wte.weight)

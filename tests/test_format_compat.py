"""Files written before this round still load: a checkpoint saved by the trainer of commit d98ea3f
(format_version 1, 1 layer, 16 wide, context 8, trained 4 steps on the line below) loads, rebuilds
its model, and resumes through train.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import compose_train

import train
from engine.checkpoint import load_checkpoint, model_from_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "format1_last.pt"
LINE = "hello world, this is some text for the old format.\n"  # its corpus: this line, 300 times


def test_an_old_checkpoint_loads_and_rebuilds_its_model():
    ckpt = load_checkpoint(FIXTURE)
    assert ckpt["format_version"] == 1 and ckpt["step"] == 4
    model = model_from_checkpoint(ckpt).eval()
    idx = torch.zeros(1, 8, dtype=torch.long)
    logits, _ = model(idx)
    assert logits.shape == (1, 8, ckpt["model_config"]["vocab_size"]) and torch.isfinite(logits).all()


def test_an_old_checkpoint_resumes(tiny_overrides, tmp_path):
    corpus = tmp_path / "old.txt"
    corpus.write_text(LINE * 300, encoding="utf-8")
    run = tmp_path / "old_run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "last.pt")
    keep = [o for o in tiny_overrides if not o.startswith(("data.path=", "out_dir="))]
    cfg = compose_train([*keep, f"data.path={corpus}", f"out_dir={run}", "resume=auto", "max_iters=6",
                         "eval_interval=6", "model.block_size=8", "model.n_embd=16"])
    result = train.train(cfg)
    assert result["step"] == 6
    assert load_checkpoint(run / "last.pt")["step"] == 6

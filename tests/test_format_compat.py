"""Files written before this round still load: a checkpoint saved by the trainer of commit d98ea3f
(format_version 1, 1 layer, 16 wide, context 8, trained 4 steps on the line below) loads, rebuilds
its model, and resumes through train.py; one saved by the trainer of commit 28c4707 (Muon + AdamW,
dropout, two accumulation micro-steps, step 4 of 6) resumes to the very weights that trainer reached."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import compose_train

import train
from engine.checkpoint import load_checkpoint, model_from_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "format1_last.pt"
MUON_FIXTURE = Path(__file__).parent / "fixtures" / "format1_muon_step4.pt"
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


def test_a_muon_checkpoint_of_the_previous_trainer_resumes_bit_identically(tmp_path):
    corpus = tmp_path / "old.txt"
    corpus.write_text(LINE * 300, encoding="utf-8")
    run = tmp_path / "old_run"
    run.mkdir()
    shutil.copy(MUON_FIXTURE, run / "last.pt")
    # The settings the fixture was trained with (commit 28c4707, `python train.py ... max_iters=6`).
    cfg = compose_train([
        "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8", "batch_size=4",
        "data=files", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "logger=none",
        "device=cpu", "eval_interval=4", "eval_iters=2", "log_interval=2", "sample_tokens=0",
        "final_eval_iters=0", "threads=1", "optim=muon", "model.dropout=0.1", "gradient_accumulation_steps=2",
        "optim.warmup_iters=2", "ckpt_interval=4", "keep_last=2", "max_iters=6", f"out_dir={run}", "resume=auto"])
    assert train.train(cfg)["step"] == 6
    weights = torch.load(run / "last.pt", weights_only=True)["model"]
    # Sums in float64 of the float32 weights at step 6. That trainer's own uninterrupted run had
    # 0.24471375590655953 and 94.66083073638553, which this resume reproduces exactly with that
    # commit's engine/optim.py. Two changes of the math since move steps 4-5: the schedule reaches
    # min_lr on the last step that runs, and Muon orthogonalises W_q, W_k and W_v apart.
    assert weights["wte.weight"].double().sum().item() == 0.2425747798042721
    assert sum(v.double().abs().sum().item() for v in weights.values()) == 93.2288851201219

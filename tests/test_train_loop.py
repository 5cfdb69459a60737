"""The training loop end to end on CPU: the real configs composed with small overrides, a few steps
into tmp_path. Loss goes down; checkpoints hold what sample.py and resume need and load with
weights_only=True; metrics.jsonl and the loss PNG appear; NaN steps are skipped then stop the run;
fp16 with a GradScaler runs; fine-tuning starts from a checkpoint's weights."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_train

import train
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.state import TrainingError
from model import GPT

PAYLOAD_KEYS = {"format_version", "model", "model_config", "tokenizer", "config", "step", "tokens_seen",
                "best_val", "optimizer", "scaler", "loader_state", "rng", "wandb_run_id", "data"}


@pytest.fixture
def trained(tiny_overrides, tmp_path, caplog):
    """A 40-step run (lr 1e-2, short warmup) whose outputs several tests inspect."""
    caplog.set_level(logging.INFO, logger="train")
    cfg = compose_train([*tiny_overrides, "max_iters=40", "optim.lr=1e-2", "optim.warmup_iters=4",
                         "final_eval_iters=4"])
    return cfg, train.train(cfg)


def test_loss_goes_down_and_outputs_appear(trained, caplog):
    cfg, result = trained
    # Not a terminal (pytest): no progress bar, a plain line every log_interval instead.
    progress = [r.getMessage() for r in caplog.get_records("setup") if "ms/step" in r.getMessage()]
    assert len(progress) == 8 and progress[-1].startswith("step 40/40: loss ")
    run = Path(result["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    # A 27-character vocabulary starts near ln(27) = 3.3; 40 steps on this corpus reach well below.
    assert evals[0]["val/loss"] > 3.2
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.4
    assert result["best_val"] == min(r["val/loss"] for r in evals)
    assert math.isfinite(result["final_val"])
    logs = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in logs] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("opt/lr", "opt/grad_norm", "perf/tokens_per_s", "perf/step_ms", "train/tokens_seen", "perf/mem_mb"):
        assert all(r[key] is not None and r[key] >= 0 for r in logs), key
    assert "perf/mfu" not in logs[0]  # no peak FLOPs known for a CPU unless peak_flops= is given
    assert logs[-1]["train/tokens_seen"] == 40 * 4 * 16
    assert all(isinstance(r["val/sample"], str) for r in evals)
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()


def test_checkpoint_contents(trained):
    cfg, result = trained
    run = Path(result["run_dir"])
    raw = torch.load(run / "last.pt", weights_only=True)  # plain data only: no pickled objects
    assert PAYLOAD_KEYS <= set(raw)
    assert raw["step"] == 40 and raw["tokens_seen"] == 40 * 64
    assert raw["config"]["optim"]["lr"] == 1e-2 and raw["config"]["model"]["n_layer"] == 1
    assert raw["model_config"]["vocab_size"] == raw["data"]["meta"]["vocab_size"]
    assert raw["loader_state"] == {"step": 40, "seed": cfg.seed}
    assert set(raw["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert raw["optimizer"]["state"]["wte.weight"]["exp_avg"].shape == raw["model"]["wte.weight"].shape
    # sample.py's path: rebuild the model and the tokenizer from the checkpoint alone.
    model = model_from_checkpoint(load_checkpoint(run))  # the run dir resolves to last.pt
    from data.tokenizer import tokenizer_from_json
    tok = tokenizer_from_json(raw["tokenizer"])
    assert tok.decode(tok.encode("the king")) == "the king"
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["best_val"] == pytest.approx(result["best_val"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name


def test_plot_metrics_writes_png(trained):
    from scripts.plot_metrics import main as plot_main
    run = Path(trained[1]["run_dir"])
    assert plot_main([str(run)]) == 0
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_metrics_draws_a_sweeps_jobs_side_by_side_and_names_the_corpus(trained, tmp_path, capsys):
    from engine.metrics import read_metrics
    from scripts.plot_metrics import corpus, read_sweep
    from scripts.plot_metrics import main as plot_main
    run = Path(trained[1]["run_dir"])
    assert corpus(read_metrics(run / "metrics.jsonl")) == trained[1]["corpus"]
    sweep = tmp_path / "multirun" / "2030-01-01" / "00-00-00"
    for num, lr in ((0, "1e-3"), (1, "3e-3")):
        (sweep / str(num) / ".hydra").mkdir(parents=True)
        (sweep / str(num) / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes())
        (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(f"- max_iters=4\n- optim.lr={lr}\n")
    assert list(read_sweep(sweep)) == ["0: optim.lr=1e-3", "1: optim.lr=3e-3"]  # what differs, not max_iters
    assert plot_main([str(sweep)]) == 0 and (sweep / "loss.png").stat().st_size > 10_000
    assert plot_main([str(tmp_path / "multirun")]) == 2 and "holds no metrics.jsonl" in capsys.readouterr().err


def test_plot_metrics_drops_a_torn_last_line(trained, tmp_path, caplog):
    from scripts.plot_metrics import main as plot_main
    torn = tmp_path / "metrics.jsonl"
    torn.write_bytes((Path(trained[1]["run_dir"]) / "metrics.jsonl").read_bytes() + b'{"step": 99, "train/lo')
    assert plot_main([str(torn), "--out", str(tmp_path / "loss.png")]) == 0
    assert "metrics.jsonl" in caplog.text and (tmp_path / "loss.png").stat().st_size > 10_000


def test_init_from_takes_weights_not_state(trained, tiny_overrides, tmp_path):
    _, result = trained
    cfg = compose_train([*tiny_overrides, "max_iters=0", f"init_from={result['run_dir']}",
                         f"out_dir={tmp_path / 'finetune'}"])
    out = train.train(cfg)
    assert out["step"] == 0  # a fresh step counter and optimizer
    source = torch.load(result["checkpoint"], weights_only=True)
    new = torch.load(tmp_path / "finetune" / "last.pt", weights_only=True)
    assert new["optimizer"]["state"] == {}
    for name, tensor in source["model"].items():
        assert torch.equal(tensor, new["model"][name]), name


def test_nan_loss_is_skipped_then_stops(tiny_overrides, tmp_path, monkeypatch):
    """Steps 5+ produce a NaN loss: each is skipped (weights untouched, logged), and after
    max_bad_steps the run stops with a clear error; last.pt from step 4 stays intact."""
    forward, calls = GPT.forward, {"n": 0}

    def nan_after_4_steps(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] > 4:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_after_4_steps)
    cfg = compose_train([*tiny_overrides, "ckpt_interval=4", "eval_interval=100", "max_bad_steps=3",
                         "log_interval=1"])
    with pytest.raises(TrainingError, match=r"NaN/inf on 4 steps \(max_bad_steps=3\); stopped at step 8.*last\.pt"):
        train.train(cfg)
    run = tmp_path / "run"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    skipped = [json.loads(line)["train/skipped_steps"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "train/skipped_steps" in line]
    assert skipped == [1, 2, 3, 4]


def test_fp16_gradscaler_path_runs_on_cpu(tiny_overrides, tmp_path):
    cfg = compose_train([*tiny_overrides, "precision=fp16", "max_iters=3", "eval_interval=3"])
    result = train.train(cfg)
    assert result["step"] == 3
    scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler  # a real, enabled GradScaler's state


def test_model_vocab_size_is_filled_from_data_and_checked(tiny_overrides):
    with pytest.raises(ValueError, match=r"model.vocab_size=5 is smaller than the data's vocabulary of 27"):
        train.train(compose_train([*tiny_overrides, "model.vocab_size=5"]))
    result = train.train(compose_train([*tiny_overrides, "model.vocab_size=40", "max_iters=1"]))
    assert torch.load(result["checkpoint"], weights_only=True)["model_config"]["vocab_size"] == 40


def test_init_from_refuses_data_with_another_tokenizer(trained, tiny_overrides, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("0123456789 xyz\n" * 400, encoding="utf-8")  # another character set
    overrides = [*tiny_overrides, f"data.path={other}", f"init_from={trained[1]['run_dir']}",
                 f"out_dir={tmp_path / 'fine_tuned'}"]  # not the source run's own directory
    with pytest.raises(ValueError, match="does not fit this data: it was trained with another tokenizer"):
        train.train(compose_train(overrides))


def test_the_closing_time_line_splits_the_run_into_phases_that_add_up(tiny_overrides, caplog):
    import re
    caplog.set_level("INFO", logger="train")
    train.train(compose_train([*tiny_overrides, "max_iters=2", "eval_interval=2"]))
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time: ")]
    parts = dict((name, float(s)) for name, s in re.findall(r"([a-z-]+) (\d+\.\d+) s", line.split(";")[0]))
    assert {"set-up", "data", "train", "eval", "save", "other"} <= set(parts), line
    total = float(re.search(r"; (\d+\.\d+) s in all$", line).group(1))
    # a phase is named only once it has been timed; on a fast machine 2 tiny steps round to 0.00 s
    assert abs(sum(parts.values()) - total) < 0.05 and min(parts.values()) >= 0

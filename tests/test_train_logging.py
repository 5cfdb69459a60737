"""Logging: W&B offline writes a run (and a resumed run continues it), disabled writes nothing, the
mode follows login state and WANDB_MODE, and metrics.jsonl drops the replayed part of a killed run."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import compose_train

import train
from engine.config import LoggerConfig
from engine.metrics import RunLogger, wandb_mode


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    def set_mode(mode: str):
        monkeypatch.setenv("WANDB_MODE", mode)
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
        monkeypatch.setenv("WANDB_SILENT", "true")
        (tmp_path / "wandb_home").mkdir(exist_ok=True)
        return tmp_path / "wandb_home"
    return set_mode


def test_wandb_offline_writes_a_run_and_resume_continues_it(tiny_overrides, tmp_path, wandb_env):
    home = wandb_env("offline")
    overrides = [*tiny_overrides, "logger=wandb", "max_iters=4", "eval_interval=2", "log_interval=2"]
    train.train(compose_train(overrides))
    run_id = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"]
    runs = list(home.glob("wandb/offline-run-*"))
    assert run_id and len(runs) == 1 and runs[0].name.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0  # the logged data, for `wandb sync`

    train.train(compose_train([*overrides, "max_iters=6", "resume=auto"]))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"] == run_id
    # Two local directories of the one run (wandb adds a suffix when both start in the same second).
    resumed = list(home.glob("wandb/offline-run-*"))
    assert len(resumed) == 2 and all(f"-{run_id}" in p.name for p in resumed)


def test_wandb_disabled_writes_nothing(tiny_overrides, tmp_path, wandb_env):
    home = wandb_env("disabled")
    train.train(compose_train([*tiny_overrides, "logger=wandb", "max_iters=2"]))
    assert not any(home.iterdir()) and not list((tmp_path / "run").glob("wandb*"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"] is None
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the local log is written regardless


def test_wandb_mode_follows_config_environment_and_login(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(LoggerConfig(name="none")) == "disabled"
    assert wandb_mode(LoggerConfig(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(LoggerConfig(mode="online")) == "disabled"  # the environment can always turn it off
    monkeypatch.delenv("WANDB_MODE")
    import wandb
    for logged_in, expected in ((True, "online"), (False, "offline")):
        monkeypatch.setattr(wandb, "login", lambda logged_in=logged_in, **kw: logged_in)
        assert wandb_mode(LoggerConfig()) == expected


def test_logger_none_does_not_import_wandb(tiny_overrides, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    train.train(compose_train([*tiny_overrides, "max_iters=2"]))  # would fail on an import of wandb
    assert sys.modules["wandb"] is None
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the run still logged, without W&B


def test_metrics_jsonl_drops_the_replayed_part_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(0, 30, 5)))
    logger = RunLogger(LoggerConfig(name="none"), tmp_path, {}, enabled=True, resume_step=10)
    logger.log({"step": 11, "train/loss": float("nan")})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 11]
    assert records[-1]["train/loss"] is None  # NaN is not JSON: written as null

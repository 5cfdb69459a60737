"""A sweep (-m) that survives its failed jobs, through train.py's command line.

Three jobs: model.n_head=3 is a user error (32 % 3), model.n_head=2 trains, and model.n_head=1 hits
an unexpected exception (injected at its first eval, after W&B has started). Every job runs; the
user error is one line on stderr and in its train.log, the crash shows its traceback; one summary
table ends the sweep, the exit status is 1; W&B (offline) holds a run per started job, named,
grouped and tagged, each finished with its exit code. The corpus path holds a comma and a space.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from omegaconf import OmegaConf
from test_train_logging import wandb_runs

from cli.sweeps import _shown_overrides, _sweep_plan, format_sweep_table

# Runs train.py's `if __name__ == "__main__":` block with argv, after making job 2's eval raise.
DRIVER = r"""
import runpy, sys
import engine.evaluate
from hydra.core.hydra_config import HydraConfig
root = sys.argv[1]
real = engine.evaluate.estimate_loss
def flaky(*args, **kwargs):
    if HydraConfig.get().job.num == 2:
        raise RuntimeError("injected failure")
    return real(*args, **kwargs)
engine.evaluate.estimate_loss = flaky
sys.argv = [root + "/train.py", *sys.argv[2:]]
runpy.run_path(root + "/train.py", run_name="__main__")
"""


def run_train_in(cwd, args: list[str], env: dict, driver: str | None = None) -> subprocess.CompletedProcess:
    """`python train.py args` (or a driver script) run in cwd, so that outputs/ and multirun/ land there."""
    inherited = {k: v for k, v in os.environ.items() if k != "CAUSALGPT_RUNS"}  # runs in cwd, as a user's
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, "-c", driver, str(ROOT), *args] if driver else [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sweep_with_failing_jobs_runs_them_all_and_ends_with_one_table(tiny_overrides, corpus, tmp_path):
    odd_corpus = tmp_path / "my corpus, v2.txt"
    odd_corpus.write_bytes(corpus.read_bytes())
    args = [a for a in tiny_overrides if not a.startswith(("out_dir=", "data.path=", "logger="))]
    args += [f"data.path={odd_corpus}", "logger=wandb", "max_iters=2", "eval_interval=2", "final_eval_iters=2",
             "model.n_head=3,2,1"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_home"), "WANDB_SILENT": "true"}
    (tmp_path / "wandb_home").mkdir()
    r = run_train_in(tmp_path, ["-m", *args], env, driver=DRIVER)
    assert r.returncode == 1, r.stderr[-3000:]

    # One table at the end: every job, its swept override, its status, its numbers, its directory.
    [sweep_dir] = (tmp_path / "multirun").glob("*/*")
    stamp = f"{sweep_dir.parent.name}_{sweep_dir.name}"
    table = r.stdout[r.stdout.index(f"sweep multirun/{sweep_dir.parent.name}/{sweep_dir.name}: 3 jobs, 2 failed"):]
    lines = table.splitlines()
    assert lines[1].split() == ["job", "overrides", "status", "best", "val", "final", "val", "run", "dir"]
    assert re.match(r"\s*0  model\.n_head=3  error: model\.n_embd=32 must be divisible by model\.n_head=3", lines[2])
    assert re.match(r"\s*1  model\.n_head=2  done\s+\d+\.\d{4}\s+\d+\.\d{4}\s+multirun/.*/1$", lines[3])
    assert re.match(r"\s*2  model\.n_head=1  error: RuntimeError: injected failure\s+-\s+-\s+multirun/.*/2$", lines[4])
    assert len(lines) == 5

    # The user error: one line on stderr and in its job's train.log; the crash: its traceback, in both.
    err = r.stderr.splitlines()
    assert err.count("error: model.n_embd=32 must be divisible by model.n_head=3; try n_embd=33") == 1
    assert "Traceback (most recent call last):" in r.stderr and "RuntimeError: injected failure" in r.stderr
    assert err[-1].startswith("error: 2 of 3 jobs failed")
    assert "Error executing job" not in r.stderr  # the table replaces Hydra's own report
    log0 = (sweep_dir / "0" / "train.log").read_text().splitlines()
    assert [line for line in log0 if "ERROR" in line] == [line for line in log0 if "must be divisible" in line]
    assert len(log0) == 1
    assert "RuntimeError: injected failure" in (sweep_dir / "2" / "train.log").read_text()
    assert (sweep_dir / "1" / "best.pt").is_file() and not (sweep_dir / "2" / "last.pt").exists()

    # The saved config says what was trained: the preset's sizes, not nulls.
    model = yaml.safe_load((sweep_dir / "1" / ".hydra" / "config.yaml").read_text())["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"], model["norm"], model["pos"]) == (
        1, 2, 32, 16, "post", "learned")

    # W&B: a run for each job that got as far as starting one (jobs 1 and 2), findable and finished.
    runs = {run["name"]: run for run in wandb_runs(tmp_path / "wandb_home")}
    assert set(runs) == {f"tiny-{stamp} model.n_head=2", f"tiny-{stamp} model.n_head=1"}
    for name, exit_code in ((f"tiny-{stamp} model.n_head=2", 0), (f"tiny-{stamp} model.n_head=1", 1)):
        run = runs[name]
        assert run["group"] == f"multirun/{sweep_dir.parent.name}/{sweep_dir.name}"
        assert run["project"] == "causalgpt" and run["exit_code"] == exit_code
        assert {"model:tiny", "data:files", "tok:char"} <= set(run["tags"])


def sweep_config(task: list[str], max_batch_size: int | None = None, params: dict | None = None,
                 sweeper: str = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"):
    return OmegaConf.create({"hydra": {"sweeper": {"_target_": sweeper, "max_batch_size": max_batch_size,
                                                   "params": params or {}}, "overrides": {"task": task}}})


@pytest.mark.parametrize(("task", "max_batch_size", "params", "swept", "batch_ends"), [
    (["a=1,2,3", "b=x,y", "lr=0.1"], 4, None, {"a", "b"}, [4, 6]),  # 3 x 2 jobs in batches of 4
    (["a=1,2,3", "a=4,5"], None, None, {"a"}, [2]),  # the last override of a key wins; one batch
    (["a=range(0,10,3)", "+b=choice(1,2)"], 3, {"c": "7,8"}, {"a", "b", "c"}, [3, 6, 9, 12, 15, 16]),
    (["x=interval(0,1)"], None, None, {"x"}, None),  # not a sweep the basic sweeper runs
])
def test_sweep_plan_counts_the_jobs_and_batches_of_the_basic_sweeper(task, max_batch_size, params, swept, batch_ends):
    assert _sweep_plan(sweep_config(task, max_batch_size, params)) == (swept, batch_ends)
    # Another sweeper batches its own way: the table then waits for on_multirun_end.
    assert _sweep_plan(sweep_config(task, max_batch_size, params, sweeper="optuna.OptunaSweeper")) == (swept, None)


def test_the_table_shows_only_the_swept_overrides_one_aligned_line_per_job():
    swept, _ = _sweep_plan(sweep_config(["model.n_head=2,4", "+tag=x,y", "max_iters=5"]))
    assert _shown_overrides(["model.n_head=2", "+tag=x", "max_iters=5"], swept) == "model.n_head=2,+tag=x"
    rows = [{"num": 1, "overrides": "lr=0.1", "status": "error: boom", "run_dir": "/elsewhere/1"},
            {"num": 0, "overrides": "lr=0.01", "status": "done", "best": 1.23456, "final": 1.5, "run_dir": "/elsewhere/0"}]
    lines = format_sweep_table(rows, "/elsewhere").splitlines()
    assert lines[1] == "sweep /elsewhere: 2 jobs, 1 failed"
    assert lines[3].split() == ["0", "lr=0.01", "done", "1.2346", "1.5000", "/elsewhere/0"]
    assert lines[4].split() == ["1", "lr=0.1", "error:", "boom", "-", "-", "/elsewhere/1"]

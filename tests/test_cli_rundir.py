"""Run directories never clobber: a fresh run into a directory holding another run is refused in one
line naming resume=auto and overwrite=true; overwrite=true starts over; a live run's lock keeps a
second run out, a killed run's lock (an OS lock) never blocks the next one; run stamps are unique within a second; `make clean`
keeps runs, `make clean-runs` removes them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, compose_train, names_besides_locks, run_script

import cli
import train
from engine.metrics import read_metrics


def test_fresh_run_into_a_run_directory_is_refused_and_overwrite_starts_over(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "max_iters=2", "eval_interval=2"]
    train.train(compose_train(overrides))
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(ValueError, match="already holds a run .*resume=auto.*overwrite=true"):
        train.train(compose_train(overrides))
    assert {name: (run / name).read_bytes() for name in before} == before  # untouched
    assert _lock_is_free(run)  # released although the run was refused

    train.train(compose_train([*overrides, "max_iters=4", "overwrite=true"]))
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps[0] == 0 and steps.count(0) == 2 and steps[-1] == 4  # one run's records: params, eval at 0
    with pytest.raises(ValueError, match="give one of them"):
        train.train(compose_train([*overrides, "overwrite=true", "resume=auto"]))


def test_refusal_on_the_command_line_is_one_line(tiny_overrides, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"an earlier run's")
    r = run_script(["train.py", *tiny_overrides, f"hydra.run.dir={tmp_path}/hydra"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run'} already holds a run (best.pt); continue it with resume=auto, "
        "or start over in it with overwrite=true")
    assert "Traceback" not in r.stderr and (tmp_path / "run" / "best.pt").read_bytes() == b"an earlier run's"
    assert not (tmp_path / "hydra").exists()  # the refused launch left nothing behind


def test_one_run_one_directory_and_a_refused_launch_changes_nothing(tiny_overrides, tmp_path):
    """.hydra/, train.log (eval lines and the summary included), metrics and checkpoints in out_dir,
    on resume too; a launch refused or failed before its run starts leaves no directory behind and
    does not rewrite the .hydra/ of the run it refused."""
    runs, run = tmp_path / "runs", tmp_path / "run"
    env = {"CAUSALGPT_RUNS": str(runs)}
    overrides = [*tiny_overrides, "max_iters=4", "eval_interval=2"]
    r = run_script(["train.py", *overrides], env=env)
    assert r.returncode == 0, r.stderr
    assert {".hydra", "train.log", "metrics.jsonl", "last.pt", "best.pt"} <= set(names_besides_locks(run))
    assert not runs.exists()  # no second directory under outputs/
    text = (run / "train.log").read_text()
    assert "step 2: train loss" in text and "done: step 4" in text and "try it:" in text
    saved = (run / ".hydra" / "config.yaml").read_bytes()

    for bad in (["max_iters=6"],  # a fresh run into a run directory: refused
                ["max_iters=6", "resume=auto", "+max_iter=6"],  # a typo: refused
                ["max_iters=6", "resume=auto", "model.n_head=3"]):  # a config error
        r = run_script(["train.py", *overrides, *bad], env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (run / ".hydra" / "config.yaml").read_bytes() == saved and (run / "train.log").read_text() == text
    for bad in (["+max_iter=6"], ["data.path=" + str(tmp_path / "missing.txt")]):  # no out_dir: outputs/<stamp>
        r = run_script(["train.py", *overrides[:-1], *bad], env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))

    r = run_script(["train.py", *overrides, "max_iters=6", "resume=auto"], env=env)
    assert r.returncode == 0, r.stderr
    assert "resume='auto'" in (run / ".hydra" / "overrides.yaml").read_text()
    log = (run / "train.log").read_text()
    assert log.startswith(text) and "done: step 6" in log and not runs.exists()


def _lock_is_free(run) -> bool:
    from filelock import FileLock, Timeout
    try:
        FileLock(run / ".lock").acquire(timeout=0).lock.release()
    except Timeout:
        return False
    return True


HOLDER = "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"


def test_a_live_runs_lock_keeps_others_out_and_a_killed_runs_lock_never_blocks(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"^{run} is in use by another training run that is still running"):
            train.train(compose_train([*tiny_overrides, "max_iters=2"]))
        assert not (run / "last.pt").exists()
    finally:
        live.kill()  # SIGKILL: no handler, no clean-up; the OS drops its lock
        live.wait()
    (run / ".lock").write_text("-1 an unknown host\n")  # whatever the file holds, it is not the lock
    train.train(compose_train([*tiny_overrides, "max_iters=2"]))
    assert (run / "last.pt").is_file() and _lock_is_free(run)


def test_a_second_hold_is_refused_while_the_first_lives(tmp_path):
    with cli.hold_run_dir(tmp_path / "run", None, False):
        assert not _lock_is_free(tmp_path / "run")
        with pytest.raises(ValueError, match="in use"):  # a second run, even from this process
            with cli.hold_run_dir(tmp_path / "run", None, False):
                pass
    assert _lock_is_free(tmp_path / "run")
    with cli.hold_run_dir(tmp_path / "other", None, False, enabled=False):  # torchrun ranks but 0
        assert not (tmp_path / "other").exists()


def test_run_stamps_are_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.delenv("CAUSALGPT_RUN_STAMP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(time, "strftime", lambda fmt: "2030-01-01/00-00-00")
    stamps = [cli.run_stamp(str(tmp_path / "outputs")) for _ in range(3)]
    assert stamps == ["2030-01-01/00-00-00", "2030-01-01/00-00-00-2", "2030-01-01/00-00-00-3"]
    assert all((tmp_path / "outputs" / s).is_dir() for s in stamps)  # each one taken by creating it


def test_two_launches_in_the_same_second_get_two_directories(tmp_path):
    """Two processes asking for a stamp at once: two directories (mkdir decides, not a clock)."""
    code = ("import sys, time, cli; t = float(sys.argv[1]); time.sleep(max(0, t - time.time())); "
            "time.strftime = lambda fmt: '2030-01-01/00-00-00'; print(cli.run_stamp(sys.argv[2]))")
    import time
    start = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", code, start, str(tmp_path / "outputs")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "1"},
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    stamps = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert stamps == ["2030-01-01/00-00-00", "2030-01-01/00-00-00-2"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_keeps_runs_and_clean_runs_removes_them(tmp_path):
    for d in ("outputs/2030-01-01/00-00-00", "multirun/x/0", "wandb/offline-run-1", ".pytest_cache/v",
              "pkg/__pycache__", ".ruff_cache/x"):
        (tmp_path / d).mkdir(parents=True)
    make = ["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path)]
    subprocess.run([*make, "clean"], check=True, capture_output=True, timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["multirun", "outputs", "pkg", "wandb"] and not (tmp_path / "pkg" / "__pycache__").exists()
    runs = tmp_path / "elsewhere"
    (runs / "outputs" / "2030-01-01").mkdir(parents=True)
    (runs / "multirun").mkdir()
    env = {**os.environ, "CAUSALGPT_RUNS": str(runs)}
    subprocess.run([*make, "clean-runs"], check=True, capture_output=True, timeout=60, env=env)
    assert sorted(p.name for p in runs.iterdir()) == [] and (tmp_path / "outputs").exists()  # $CAUSALGPT_RUNS's
    env.pop("CAUSALGPT_RUNS")
    subprocess.run([*make, "clean-runs"], check=True, capture_output=True, timeout=60, env=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "pkg"]


def test_step_checkpoints_count_as_a_run_and_overwrite_deletes_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-000250.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt-000250.pt\)"):
        with cli.hold_run_dir(run, None, False):
            pass
    with cli.hold_run_dir(run, "auto", False):  # resume=auto has something to continue: nothing deleted
        assert (run / "ckpt-000250.pt").exists()
    (run / "best.pt").write_bytes(b"x")
    with cli.hold_run_dir(run, None, True):
        assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_run_without_sampled_evals_says_so_instead_of_best_val_inf(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith(("out_dir=", "final_eval_iters="))]
    r = run_script(["train.py", *overrides, "max_iters=2", "eval_iters=0", "final_eval_iters=1",
                    f"out_dir={tmp_path / 'run'}"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    [done] = [line for line in r.stdout.splitlines() if line.startswith("done: ")]
    assert "no sampled eval, final val " in done and "inf" not in done, done

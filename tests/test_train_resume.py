"""Resume: a run killed with SIGKILL and resumed with resume=auto ends bit-identical to a run that was
never interrupted; SIGTERM saves last.pt and exits cleanly; a corrupted last.pt with no older
checkpoint to fall back to is a one-line error naming the file, with best.pt untouched (the fallback
to ckpt-<step>.pt files is in test_train_faults.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, compose_train, run_script

import train
from engine.checkpoint import CheckpointError

# Runs train.py as `python train.py ...` would, except that the first save of last.pt at step >= 16
# kills the process with SIGKILL before writing: no handler, no cleanup, the work since step 8 lost.
KILLER = """
import os, runpy, signal, sys
import engine.checkpoint as mc
real_save = mc.save_checkpoint
def save_or_die(path, payload, **kw):
    if path.name == "last.pt" and payload["step"] >= 16:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(path, payload, **kw)
mc.save_checkpoint = save_or_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bit_identical(tiny_overrides, tmp_path):
    # Dropout and two accumulation micro-batches: the RNG and both data streams must come back exactly.
    recipe = [*tiny_overrides, "max_iters=24", "eval_interval=8", "ckpt_interval=8", "log_interval=4",
              "model.dropout=0.1", "gradient_accumulation_steps=2", "optim.warmup_iters=4"]
    reference = train.train(compose_train([*recipe, f"out_dir={tmp_path / 'ref'}"]))
    assert reference["step"] == 24

    run = tmp_path / "killed"
    args = [a for a in recipe if not a.startswith("out_dir=")] + [f"out_dir={run}"]
    killed = run_script(["-c", KILLER, *args])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 8  # the step-16 save never happened

    resumed = run_script(["train.py", *args, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr

    want = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    got = torch.load(run / "last.pt", weights_only=True)
    assert got["step"] == want["step"] == 24
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), f"{name} differs after resume"
    for name, state in want["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][name][key], tensor), f"optimizer {name}.{key}"
    assert got["best_val"] == want["best_val"] and got["loader_state"] == want["loader_state"]
    # The curve continues where the checkpoint was: the replayed steps log the same losses, once each.
    strip = [{k: v for k, v in r.items() if not k.startswith("perf/")}
             for r in _records(run)]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("perf/")}
                     for r in _records(tmp_path / "ref")]


@pytest.mark.slow
def test_sigterm_saves_last_pt_and_exits_143(tiny_overrides, tmp_path):
    args = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "max_iters=100000", "ckpt_interval=0",
                             "eval_interval=100000", "log_interval=1", f"out_dir={run}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # wait until it is training (a few steps logged)
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM: a scheduler tells a preemption from a finished run
    assert "SIGTERM received" in out + err and "stopped early" in out
    assert f"resume:     python train.py {' '.join(args)} max_iters=100000" in out
    assert f"resume=auto out_dir={run}" in out
    last = torch.load(run / "last.pt", weights_only=True)
    # 4 lines: the params and step-0 eval records, then steps 1 and 2; the signal can land at once
    assert 2 <= last["step"] < 100000
    assert last["loader_state"]["step"] == last["step"]


def test_corrupted_last_pt_falls_back_to_best_pt_and_all_corrupt_is_one_line(tiny_overrides, tmp_path, caplog):
    tiny_overrides = [*tiny_overrides, "keep_last=0"]  # last.pt and best.pt alone
    train.train(compose_train(tiny_overrides))
    run = tmp_path / "run"
    assert not list(run.glob("ckpt-*.pt"))
    best_before = (run / "best.pt").read_bytes()
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a truncated file
    resumed = train.train(compose_train([*tiny_overrides, "resume=auto", "max_iters=24"]))
    assert resumed["step"] == 24 and f"skipping {last}" in caplog.text and "best.pt" in caplog.text
    # Every checkpoint damaged: on the command line one line naming the first, exit status 2, no traceback.
    for path in (last, run / "best.pt"):
        path.write_bytes(best_before[: len(best_before) // 2])
    args = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    r = run_script(["train.py", *args, f"out_dir={run}", "resume=auto"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: none of last.pt, best.pt in") and f"checkpoint {last} is corrupt" in line


def test_resume_from_another_run_directory_continues_its_state(tiny_overrides, tmp_path):
    first = train.train(compose_train(tiny_overrides))
    second = train.train(compose_train([*tiny_overrides, "max_iters=30", f"resume={first['run_dir']}",
                                        f"out_dir={tmp_path / 'continued'}"]))
    assert second["step"] == 30
    ckpt = torch.load(tmp_path / "continued" / "last.pt", weights_only=True)
    assert ckpt["tokens_seen"] == 30 * 4 * 16 and ckpt["loader_state"]["step"] == 30
    with pytest.raises(CheckpointError, match="does not exist"):
        train.train(compose_train([*tiny_overrides, f"resume={tmp_path / 'nope.pt'}"]))


def test_resume_onto_data_with_another_vocabulary_is_one_line(tiny_overrides, tmp_path):
    train.train(compose_train([*tiny_overrides, "max_iters=4"]))
    other = tmp_path / "other.txt"
    other.write_text("0123456789 ~!@#$%^&*() other characters entirely\n" * 200, encoding="utf-8")
    args = [a for a in tiny_overrides if not a.startswith("data.path=")]
    r = run_script(["train.py", *args, f"data.path={other}", "resume=auto", "max_iters=8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {tmp_path / 'run' / 'last.pt'} does not fit this data: it was "
                           "trained with another tokenizer (char, ") and "init_from=" in line


def test_resume_without_the_data_overrides_continues_on_the_data_it_was_trained_on(tiny_overrides, tmp_path):
    train.train(compose_train([*tiny_overrides, "max_iters=4"]))
    run = tmp_path / "run"
    keep = [a for a in tiny_overrides if not a.startswith(("data", "out_dir="))]  # no data=, data.path=, ...
    r = run_script(["train.py", *keep, "resume=auto", f"out_dir={run}", "max_iters=8"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "resuming on the data the checkpoint was trained on (data.source=files" in r.stdout + r.stderr
    assert "ignoring changed model settings" not in r.stdout + r.stderr
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] == 8 and last["config"]["data"]["source"] == "files"

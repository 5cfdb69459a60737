"""DDP and FSDP2 under torchrun on CPU (gloo), compared with one process; and the faults of a job:
a rank failing in a save, in the set-up, in a step (NaN), or hanging, stops every rank promptly
with one line each, never a wait for the process-group timeout.

The comparison is exact by construction, not by luck: micro-batch g = rank * accum + micro of each
step is drawn from data stream g of world_size * accum streams, so two processes with one micro-batch
each see the very windows that one process with gradient_accumulation_steps=2 sees. Only the order
of floating-point sums differs (all-reduce vs accumulation), hence a tight tolerance; a run on other
windows with the same global batch size lands far outside it, which shows the tolerance means something.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_train, run_script

import train
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.metrics import read_metrics

STEPS = 6


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _train_losses(run_dir: Path) -> dict[int, float]:
    """{step: train/loss} of a run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


@pytest.fixture
def recipe(tiny_overrides) -> list[str]:
    keep = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    return [*keep, f"max_iters={STEPS}", "eval_interval=3", "eval_iters=3", "optim.lr=1e-2",
            "optim.warmup_iters=1", "sample_tokens=4"]


def _torchrun(args: list[str], tmp_path: Path):
    r = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", *args], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(recipe, tmp_path, caplog):
    single = train.train(compose_train([*recipe, "gradient_accumulation_steps=2", f"out_dir={tmp_path / 'one'}"]))
    train.train(compose_train([*recipe, "batch_size=8", f"out_dir={tmp_path / 'other'}"]))

    # DDP: no out_dir, so the run directory comes from Hydra (hydra.run.dir with the shared stamp).
    _torchrun([*recipe, f"hydra.run.dir={tmp_path}/ddp/${{run_stamp:}}"], tmp_path)
    run_dirs = [p.parent for p in (tmp_path / "ddp").glob("*/*/last.pt")]
    assert len(run_dirs) == 1 and len(list((tmp_path / "ddp").glob("*/*"))) == 1  # one dir for both ranks
    ddp_dir = run_dirs[0]
    _torchrun([*recipe, "distributed=fsdp", f"out_dir={tmp_path / 'fsdp'}"], tmp_path)

    one = _weights(tmp_path / "one" / "last.pt")
    assert _max_diff(one, _weights(tmp_path / "other" / "last.pt")) > 1e-3  # other windows: far apart
    assert _max_diff(one, _weights(ddp_dir / "last.pt")) < 1e-5
    assert _max_diff(one, _weights(tmp_path / "fsdp" / "last.pt")) < 1e-5
    for run in (ddp_dir, tmp_path / "fsdp"):
        ckpt = torch.load(run / "last.pt", weights_only=True)
        assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
        assert ckpt["tokens_seen"] == single["step"] * 2 * 4 * 16
        assert ckpt["best_val"] == pytest.approx(single["best_val"], abs=1e-5)  # eval split across ranks
    # The logged train loss is the global batch's: the mean of the two ranks' losses, which is what one
    # process logs for its two micro-batches (rank 0's alone would be one micro-batch's).
    want = _train_losses(tmp_path / "one")
    assert len(want) == 2
    for run in (ddp_dir, tmp_path / "fsdp"):
        got = _train_losses(run)
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want), (got, want)

    # An FSDP checkpoint is a plain, full one: it loads into one process, for sampling or to resume.
    fsdp_ckpt = load_checkpoint(tmp_path / "fsdp")
    assert fsdp_ckpt["model"]["wte.weight"].shape[0] == fsdp_ckpt["model_config"]["vocab_size"]
    model_from_checkpoint(fsdp_ckpt)
    with caplog.at_level(logging.WARNING):
        resumed = train.train(compose_train([*recipe, "gradient_accumulation_steps=2", f"max_iters={STEPS + 2}",
                                             f"resume={tmp_path / 'fsdp'}", f"out_dir={tmp_path / 'resumed'}"]))
    assert resumed["step"] == STEPS + 2
    # Two processes' RNG states for one: rank 0 takes rank 0's; the global batch is the same.
    assert any("the checkpoint was written by 2 process(es), this run has 1" in r.getMessage()
               and "global batch" not in r.getMessage() for r in caplog.records)


# ---- faults: one rank fails, every rank stops with one line ------------------------------------------
# Runs train.py as torchrun would, with one fault injected on one rank (FAULT; STEP counts training
# forwards after the start, or saves): these patches are the test's, nothing in the product knows them.
INJECT = """
import errno, os, runpy, signal, sys, time
rank, fault, at = int(os.environ["RANK"]), os.environ["FAULT"], int(os.environ.get("AT", "0"))
if fault == "enospc" and rank == 0:  # the disk of the run directory fills up during a save
    import torch
    real_save = torch.save
    def save(obj, f, **kw):
        if isinstance(obj, dict) and obj.get("step", 0) >= at:
            f.write(bytes(4096))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, **kw)
    torch.save = save
if fault == "setup" and rank == 1:  # this rank cannot read the prepared data
    import data.prepare
    from data.config import DataError
    def prepare(*a, **kw):
        raise DataError("prepared data /injected/train.bin is cut short; delete it to rebuild")
    data.prepare.prepare = prepare
if fault in ("hang", "inf_then_nan") and rank == 1:
    from model import GPT
    real_forward, calls = GPT.forward, [0]
    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            calls[0] += 1
            if fault == "hang" and calls[0] == at:  # stuck (SIGTERM kills it: torchrun then need not wait)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(3600)
            if fault == "inf_then_nan" and calls[0] >= at:
                loss = loss * float("nan")
        return logits, loss
    GPT.forward = forward
if fault == "inf_then_nan":
    import engine.step, engine.state
    real_poison, real_save, poisons = engine.step.poison_grads_if, engine.state.TrainState.save, [0]
    def poison(flag, params):  # an overflow in this rank's shard of one gradient only
        poisons[0] += 1
        if rank == 1 and poisons[0] == 2:
            grad = next(p.grad for p in params if p.grad is not None)
            grad.to_local().view(-1)[0] = float("inf")
        return real_poison(flag, params)
    def save(self, path, *a, **kw):
        print(f"rank {rank} saves step {self.step} with loss scale {self.scaler.get_scale()}", flush=True)
        return real_save(self, path, *a, **kw)
    engine.step.poison_grads_if, engine.state.TrainState.save = poison, save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _inject(fault: str, at: int, args: list[str], tmp_path: Path, bound_s: float = 60) -> tuple[str, str]:
    """torchrun with the fault on; returns (stdout, stderr) after checking that every process ended
    with an error within bound_s (start-up included) and that none printed a traceback."""
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    start = time.monotonic()
    r = run_script(["torchrun", "--standalone", "--nproc_per_node=2", str(script), *args],
                   env={"FAULT": fault, "AT": str(at), "TQDM_DISABLE": "1"}, timeout=180)
    elapsed = time.monotonic() - start
    assert r.returncode != 0 and elapsed < bound_s, (elapsed, r.stdout[-2000:], r.stderr[-3000:])
    # torchrun's own report of a failed job is a traceback of the launcher; none may come from a rank.
    assert "Error executing job" not in r.stderr and f'File "{ROOT / "train.py"}"' not in r.stderr, r.stderr[-3000:]
    return r.stdout, r.stderr


def _errors(stderr: str) -> dict[int, str]:
    """{rank: its error line}; two ranks writing at once may run their lines together."""
    found = re.finditer(r"error \(rank (\d)\): (.*?)(?=error \(rank \d\): |$)", stderr, re.M)
    return {int(m.group(1)): m.group(2) for m in found}


@pytest.mark.slow
def test_fsdp_fp16_from_a_one_process_checkpoint_skips_together_and_stops_together_on_nan(recipe, tmp_path):
    """fp32 on one process -> fp16 under FSDP on two: a fresh GradScaler and rank 1 deriving its RNG
    state, both said once. An overflow in rank 1's shard of one gradient makes both ranks skip the
    step (the inf check is all-reduced: the loss scales stay equal); a NaN loss on rank 1 only stops
    both, each with the same line."""
    train.train(compose_train([*recipe, "max_iters=4", f"out_dir={tmp_path / 'one'}"]))
    run = tmp_path / "fsdp"
    out, err = _inject("inf_then_nan", 5, [
        *recipe, "distributed=fsdp", "precision=fp16", "max_iters=16", "eval_interval=4", "ckpt_interval=4",
        "log_interval=4", "max_bad_steps=2", f"resume={tmp_path / 'one'}", f"out_dir={run}"], tmp_path)
    said = out + err
    assert "this run uses fp16: its GradScaler starts fresh (scale 65536)" in said, said[-3000:]
    assert "the checkpoint was written by 1 process(es), this run has 2" in said
    for rank in (0, 1):  # the overflow at step 6 was skipped by both ranks: the same scale on both
        assert f"rank {rank} saves step 8 with loss scale 32768.0" in out, out[-3000:]
    errors = _errors(err)
    assert set(errors) == {0, 1} and errors[0] == errors[1], err[-3000:]
    assert errors[0].startswith(f"the loss was NaN/inf on 4 steps (max_bad_steps=2); stopped at step 12. "
                                f"Last good checkpoint: {run / 'last.pt'}")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["world_size"], ckpt["precision"]) == (8, 2, "fp16")
    assert ckpt["scaler"]["scale"] == 32768.0 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_a_full_disk_on_rank_0_stops_both_ranks_and_keeps_the_last_checkpoint(recipe, tmp_path):
    run = tmp_path / "run"
    _, err = _inject("enospc", 4, [*recipe, "ckpt_interval=3", f"out_dir={run}"], tmp_path)
    errors = _errors(err)
    disk_full = rf"cannot write checkpoint {run}/(best|last).pt: No space left on device \(ENOSPC\); the previous"
    assert re.match(disk_full, errors[0]) and errors[1] == f"rank 0 failed: {errors[0]}", err[-3000:]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3
    assert not list(run.glob(".*.tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "reason"), [("setup", "Connection"), ("hang", "Timed out waiting 5000ms")])
def test_a_rank_that_fails_or_hangs_stops_the_other_promptly(recipe, tmp_path, fault, reason):
    """Rank 1 fails in its set-up (rank 0 is then in a collective with it) or hangs in its third
    step: rank 0 stops at once, or after dist_timeout_s, with one line; never the default 30 min."""
    _, err = _inject(fault, 3, [*recipe, "dist_timeout_s=5", f"out_dir={tmp_path / 'run'}"], tmp_path)
    errors = _errors(err)
    assert re.match(rf"lost contact with another process of this job \([^)]*{reason}", errors[0]), err[-3000:]
    assert errors[0].endswith(f"resume with resume=auto out_dir={tmp_path / 'run'}")
    if fault == "setup":
        assert errors[1] == "prepared data /injected/train.bin is cut short; delete it to rebuild"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str]) -> list:
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on localhost: the way
    two machines run one job (`--nnodes=2`), here on one machine."""
    import os
    import subprocess
    import sys
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=multinode-test", "train.py", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    out = [p.communicate(timeout=240) for p in nodes]
    for p, (stdout, stderr) in zip(nodes, out, strict=True):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_nodes_train_into_one_run_dir_and_resume(recipe, tmp_path):
    _two_nodes([*recipe, f"hydra.run.dir={tmp_path}/nodes/${{run_stamp:}}"])
    run_dirs = [p.parent for p in (tmp_path / "nodes").glob("*/*/last.pt")]
    assert len(run_dirs) == 1 and len(list((tmp_path / "nodes").glob("*/*"))) == 1  # one dir for the job
    ckpt = torch.load(run_dirs[0] / "last.pt", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    _two_nodes([*recipe, f"max_iters={STEPS + 2}", "resume=auto", f"out_dir={run_dirs[0]}"])
    resumed = torch.load(run_dirs[0] / "last.pt", weights_only=True)
    assert resumed["step"] == STEPS + 2 and resumed["world_size"] == 2
    assert not torch.equal(resumed["model"]["wte.weight"], ckpt["model"]["wte.weight"])

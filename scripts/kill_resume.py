"""SIGKILL a training run at random moments, resume it each time, and compare the end with a run that
was never interrupted: on CPU the final weights and optimizer state must be bit-identical.

    python scripts/kill_resume.py --kills 50 --rounds 10 --work /tmp/kill_resume
    python scripts/kill_resume.py --kills 3 --rounds 1 -- model.n_layer=1 max_iters=40   # overrides last

A reference run gives the timeline of a launch. Each round starts from nothing (new run directory,
empty data cache) and repeats: start `train.py resume=auto`, wait a random time, SIGKILL it. A
round's first wait is drawn around the data preparation (well under a second, which a uniform draw
would rarely hit), the others uniformly over what is left of the run plus 10 %. Where a kill landed
is read from what the process left: a save's temporary file, its own log lines, the data cache. Then
the round runs to the end and its last.pt is compared with the reference's, tensor by tensor. Prints
a line per kill and a summary, writes summary.json, exits 1 when a resume failed or a state differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Small, but with dropout, two accumulation streams, evals, samples, and a save after every step: the
# batch is small, so that saving (10 MB, ~20 ms) is a good part of a step and many kills land in one.
RECIPE = [
    "data=python_stdlib", "data.max_chars=null", "model=tiny", "model.dropout=0.1", "batch_size=2",
    "gradient_accumulation_steps=2", "max_iters=300", "eval_interval=50", "eval_iters=4", "ckpt_interval=1",
    "log_interval=10", "sample_tokens=16", "final_eval_iters=0", "threads=1", "logger=none", "device=cpu",
    "compile=false", "keep_last=2",
]
PHASES = ("start-up", "data preparation", "set-up", "training", "save")
# The log line that ends each part of a launch: start-up (imports, Hydra), data preparation, set-up.
MARKS = {"runtime": "runtime: rank", "prepared": "[data.prepare]", "set_up": "tokens per step, run dir"}
RUNNING: list[subprocess.Popen] = []


def launch(run: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    """train.py on run (resume=auto, its data cache beside it), its output appended to log."""
    args = [*RECIPE, *overrides, f"data.cache_dir={run.parent / 'cache'}", f"hydra.run.dir={run}", "resume=auto"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT),
           "PYTHONUNBUFFERED": "1"}  # every log line in the file before a kill can come
    with log.open("a") as out:
        RUNNING.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT))
    return RUNNING[-1]


def temps(run: Path) -> set[str]:
    """Temporary files of checkpoint saves in the run directory."""
    return {p.name for p in run.glob(".*.pt.tmp-*")}


def phase_of(run: Path, log_text: str, temps_before: set[str]) -> str:
    """Where a killed launch was: from a save's temporary file it left behind (one not there before it
    started), its own log lines, and the state of the data cache."""
    if temps(run) - temps_before:
        return "save"
    if MARKS["set_up"] in log_text:
        return "training"  # steps, evals, samples
    if MARKS["runtime"] not in log_text:
        return "start-up"
    cache = run.parent / "cache"
    built = cache.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in cache.iterdir())
    return "set-up" if built else "data preparation"  # set-up: resuming, building the model


def timeline(log_text: str, started: float) -> dict[str, float]:
    """Seconds from the launch to each of MARKS, from the log lines' time stamps."""
    out = {}
    for line in log_text.splitlines():
        for key, mark in MARKS.items():
            if mark in line and line.startswith("[") and key not in out:
                stamp = time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + int(line[21:24]) / 1000
                out[key] = stamp - started
    return out


def same_state(a: Path, b: Path) -> str | None:
    """None when two checkpoints hold the same step, weights, optimizer and loader state; else what differs."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x["step"] != y["step"] or x["loader_state"] != y["loader_state"]:
        return f"step/loader state {x['step']}/{x['loader_state']} vs {y['step']}/{y['loader_state']}"
    tensors = [(f"weight {k}", t, y["model"][k]) for k, t in x["model"].items()]
    tensors += [(f"optimizer {n}.{k}", t, y["optimizer"]["state"][n][k])
                for n, state in x["optimizer"]["state"].items() for k, t in state.items() if torch.is_tensor(t)]
    return next((what for what, s, t in tensors if not torch.equal(s, t)), None)


def last_step(run: Path) -> int:
    try:
        return torch.load(run / "last.pt", weights_only=True)["step"]
    except (FileNotFoundError, RuntimeError):  # none yet (or a damaged one: the next launch says)
        return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs in all (spread over the rounds)")
    p.add_argument("--rounds", type=int, default=4, help="runs killed and resumed, each from nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    p.add_argument("overrides", nargs="*", help="train.py overrides, after the recipe (put them after --)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume."))
    rng = random.Random(args.seed)

    ref, ref_log = work / "reference" / "run", work / "reference.log"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ref.parent, ignore_errors=True)
    ref_log.unlink(missing_ok=True)
    start = time.time()
    if launch(ref, args.overrides, ref_log).wait() != 0:
        print(f"error: the reference run failed; see {ref_log}", file=sys.stderr)
        return 1
    t_ref, marks, steps = time.time() - start, timeline(ref_log.read_text(), start), last_step(ref)
    t_setup = marks.get("set_up", 0.0)
    prep = (max(0.0, marks.get("runtime", 0.0) - 0.5), marks.get("prepared", t_setup) + 0.5)
    print(f"reference: {t_ref:.1f} s uninterrupted, {steps} steps; start-up {marks.get('runtime', 0):.1f} s, "
          f"data prepared at {marks.get('prepared', 0):.1f} s, set-up done at {t_setup:.1f} s")

    kills, rounds, failures = [], [], []
    for r in range(args.rounds):
        run, log = work / f"round{r}" / "run", work / f"round{r}.log"
        shutil.rmtree(run.parent, ignore_errors=True)
        log.unlink(missing_ok=True)
        launches = 0
        for _ in range(args.kills // args.rounds + (r < args.kills % args.rounds)):
            left = 1 - last_step(run) / steps
            delay = rng.uniform(*prep) if launches == 0 else rng.uniform(0, 1.1 * (t_setup + (t_ref - t_setup) * left))
            offset, before = log.stat().st_size if log.exists() else 0, temps(run)
            proc = launch(run, args.overrides, log)
            launches += 1
            try:
                code = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                code = proc.wait()
            landed = code == -signal.SIGKILL
            phase = phase_of(run, log.read_bytes()[offset:].decode(errors="replace"), before) if landed \
                else "after the end"
            kills.append({"round": r, "launch": launches, "after_s": round(delay, 2), "phase": phase})
            print(f"round {r} launch {launches}: kill after {delay:5.1f} s: "
                  f"{'landed during ' + phase if landed else 'the run had already ended'}")
            if not landed and code != 0:
                failures.append(f"round {r} launch {launches} exited with status {code}")
        launches += 1  # the rest of the run, uninterrupted
        if (code := launch(run, args.overrides, log).wait()) != 0:
            failures.append(f"round {r} final launch exited with status {code}")
        differs = same_state(ref / "last.pt", run / "last.pt") if code == 0 else "no final checkpoint"
        rounds.append({"round": r, "launches": launches, "identical": differs is None, "differs": differs})
        print(f"round {r}: {launches} launches, final state "
              f"{'bit-identical to the reference' if differs is None else 'DIFFERS: ' + differs}")

    landed = [k for k in kills if k["phase"] != "after the end"]
    by_phase = {ph: sum(k["phase"] == ph for k in landed) for ph in PHASES}
    summary = {"kills": len(kills), "landed_mid_run": len(landed), "by_phase": by_phase,
               "rounds": rounds, "reference_s": round(t_ref, 1), "reference_marks_s": marks,
               "torch": torch.__version__, "kill_log": kills, "failures": failures}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    identical = sum(r["identical"] for r in rounds)
    print(f"kills: {len(kills)}, landed mid-run: {len(landed)} ("
          + ", ".join(f"{n} during {ph}" for ph, n in by_phase.items()) + f"); final state bit-identical in "
          f"{identical}/{len(rounds)} rounds" + (f"; failures: {'; '.join(failures)}" if failures else ""))
    return 0 if identical == len(rounds) and not failures else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    finally:  # Ctrl-C: no training process left behind
        for child in RUNNING:
            if child.poll() is None:
                child.kill()

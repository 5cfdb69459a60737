"""The GPU proof in one command: every GPU check and figure of the project, run and recorded in
under 8 minutes on one CUDA GPU, carried wheels installed first.

    python scripts/gpu_suite.py --wheels .whl --data .carry/tinyshakespeare.txt --out results/
    python scripts/gpu_suite.py --dry-run --out /tmp/gpu_suite     # the same code on CPU, tiny sizes, < 2 min

Parts, in the order they run. Each has a time cap inside a 460 s budget (--budget; time a part
leaves unused passes on), runs in processes of its own, and reports pass, fail or skipped with the
reason; a failing part never stops the ones after it:
  wheels        pip install --no-index --no-deps --target <work>/site of --wheels DIR/*.whl; the
                site goes on PYTHONPATH for everything below (the Hydra stack a CUDA image lacks)
  pytest        `pytest -m gpu tests`: the GPU tests (tests/test_gpu.py and any other gpu-marked one)
  parity        train.py on the small preset for 200 steps from one seed in fp32, bf16 and fp16
                (GradScaler), and bf16 with attn=explicit, side by side (eager): 20-step mean train
                losses and the final val loss within --parity-tol of fp32 (explicit: of bf16 sdpa)
  scale         the largest preset that trains one step (bf16, eager), with and without activation
                checkpointing (each block recomputed in backward), and sharded by FSDP2 on one rank
                (engine.parallel.wrap_model): peak memory of each
  time_to_loss  train.py experiment=shakespeare_char (bf16, compiled) until an eval's val loss is
                <= --ttl-target (1.47), watched in metrics.jsonl and stopped there; wall time from the
                process start (compilation included); needs the canonical tinyshakespeare.txt
                (--data; default .carry/tinyshakespeare.txt when it exists)
  throughput    scripts/bench_train.py: gpt2 preset, context 1024, batch 16, bf16, compiled, 30 timed
                steps after 5: tokens/s, MFU (peak from engine/runtime.py's table), peak memory
  generation    scripts/bench_sample.py: gpt2 preset, batch 1, bf16, KV cache, 496 tokens after a
                16-token prompt, eager and compiled
Writes <out>/gpu_suite.json (every figure; rewritten after each part), <out>/gpu_suite.md (a table
for BENCHMARKS.md) and <out>/gpu_suite.log (every command and its output), and prints the table
last. Exit status 1 when a part failed, 2 for bad arguments, else 0. --dry-run runs the same code
on CPU with tiny sizes, fp32 and no compilation (the compiled generation variant is skipped: ~30 s
of CPU compile), on a corpus read from the Python standard library unless --data is given;
tests/test_gpu_suite.py runs it and checks every key of the JSON. Run directories and prepared
data live in a temporary work directory (--keep keeps it). This process only starts others:
`python -m pytest`, train.py, the bench scripts, and this file as --worker (env, scale, fsdp).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("wheels", "pytest", "parity", "scale", "time_to_loss", "throughput", "generation")  # run in this order
NEED_HYDRA = ("pytest", "parity", "time_to_loss")  # they run train.py or the conftest
TARGETS = {"time_to_loss_wall_s": 45.0, "mfu": 0.50, "generation_tokens_per_s": 2000.0}

# Sizes and settings of a real run (one CUDA GPU) and of a dry run (CPU, tiny, seconds each).
GPU = dict(
    device="cuda", budget_s=460.0, min_part_s=20.0, ttl_target=1.47, window=20, stdlib_chars=2_000_000,
    caps=dict(wheels=60, pytest=120, parity=90, time_to_loss=180, throughput=150, generation=150, scale=90),
    parity=["model=small", "batch_size=32", "max_iters=200", "eval_interval=200", "eval_iters=20",
            "optim.warmup_iters=20"],
    ttl=["precision=bf16", "compile=true"],
    throughput=["--preset", "gpt2", "--block-size", "1024", "--batch-size", "16", "--precision", "bf16",
                "--compile", "true", "--steps", "30", "--warmup", "5"],
    generation=["--preset", "gpt2", "--batch", "1", "--precision", "bf16", "--prompt-len", "16", "--new-tokens", "496",
                "--repeats", "2"],
    scale=dict(presets=["gpt2-medium", "gpt2", "small", "tiny"], batch_size=8, block_size=None, precision="bf16"),
)
DRY = dict(
    device="cpu", budget_s=110.0, min_part_s=5.0, ttl_target=4.0, window=5, stdlib_chars=200_000,
    caps=dict(wheels=30, pytest=40, parity=40, time_to_loss=30, throughput=25, generation=20, scale=25),
    parity=["model=tiny", "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32",
            "batch_size=8", "max_iters=30", "eval_interval=30", "eval_iters=2", "optim.warmup_iters=5", "threads=1"],
    ttl=["precision=fp32", "compile=false", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
         "model.block_size=32", "model.dropout=0.0", "batch_size=8", "max_iters=60", "eval_interval=10",
         "eval_iters=2", "optim.warmup_iters=5", "threads=1"],
    throughput=["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--precision", "fp32",
                "--compile", "false", "--steps", "3", "--warmup", "1", "--threads", "1"],
    generation=["--preset", "tiny", "--batch", "1", "--precision", "fp32", "--prompt-len", "16", "--new-tokens", "16",
                "--repeats", "1", "--threads", "1"],
    scale=dict(presets=["tiny"], batch_size=2, block_size=32, precision="fp32"),
)
PARITY_RUNS = {"fp32": ("fp32", "sdpa"), "bf16": ("bf16", "sdpa"), "fp16": ("fp16", "sdpa"),
               "bf16_explicit": ("bf16", "explicit")}
PARITY_REF = {"bf16": "fp32", "fp16": "fp32", "bf16_explicit": "bf16"}

# The figures of each part: always present in the JSON (None or empty when not measured).
FIGURES: dict[str, dict] = {
    "wheels": {"installed": [], "modules": [], "site": None},
    "pytest": {"passed": None, "failed": None, "skipped": None, "errors": None, "failures": []},
    "parity": {"steps": None, "window": None, "tolerance": None, "max_diff": {}, "final_val": {},
               "window_means": {}, "curves": {}},
    "time_to_loss": {"target_val": None, "reached": None, "step": None, "val": None, "best_val": None,
                     "wall_s": None, "from_first_eval_s": None, "tokens_per_s": None, "mfu": None,
                     "target_wall_s": TARGETS["time_to_loss_wall_s"], "target_met": None, "overrides": []},
    "throughput": {"preset": None, "batch_size": None, "block_size": None, "steps": None, "tokens_per_s": None,
                   "ms_per_iter": None, "mfu": None, "peak_mem_mb": None, "warmup_s": None,
                   "target_mfu": TARGETS["mfu"], "target_met": None},
    "generation": {"preset": None, "new_tokens": None, "eager_tokens_per_s": None, "compiled_tokens_per_s": None,
                   "compiled_status": None, "target_tokens_per_s": TARGETS["generation_tokens_per_s"],
                   "target_met": None},
    "scale": {"preset": None, "params": None, "batch_size": None, "block_size": None, "tried": [],
              "plain": None, "checkpointed": None, "fsdp": None},
}


class PartFailed(Exception):
    """A part's check failed; the message is the one-line reason recorded."""


@dataclass
class Proc:
    label: str
    rc: int | None  # None when stopped (time cap or watcher)
    out: str
    seconds: float
    timed_out: bool = False
    stopped: bool = False  # stopped on purpose by a watcher (the target loss was reached)

    def tail(self, n: int = 300) -> str:
        return " ".join(self.out[-n:].split())


@dataclass
class Suite:
    args: argparse.Namespace
    sizes: dict
    work: Path
    env: dict[str, str]
    log_path: Path
    deadline: float
    info: dict = field(default_factory=dict)

    @property
    def python(self) -> str:
        return sys.executable

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def run(self, jobs: list[tuple[str, list[str]]], cap_s: float,
            watch: Callable[[float], bool] | None = None) -> list[Proc]:
        """Run jobs (label, argv) side by side from the repository root; stop them all at cap_s, or
        when watch(elapsed seconds) returns True. Output goes to the log; nothing raises."""
        running = []
        for label, cmd in jobs:
            out = (self.work / f"{label}.out").open("w+", encoding="utf-8", errors="replace")
            self.log(f"\n=== {label}: {shlex.join(cmd)}")
            p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own process group: compile workers die with it
            running.append((label, p, out))
        start = time.monotonic()
        flags: dict[str, str] = {}
        try:
            while any(p.poll() is None for _, p, _ in running):
                elapsed = time.monotonic() - start
                why = "stopped" if watch is not None and watch(elapsed) else "timed_out" if elapsed > cap_s else ""
                for label, p, _ in running:
                    if why and p.poll() is None:
                        flags[label] = why
                        _stop(p)
                time.sleep(0.2)
            if watch is not None:
                watch(time.monotonic() - start)  # a last look at what was written before the end
        finally:  # also when the watcher raises: no process outlives its part
            for _, p, _ in running:
                if p.poll() is None:
                    _stop(p)
        procs = []
        for label, p, out in running:
            out.seek(0)
            text = out.read()
            out.close()
            seconds = time.monotonic() - start
            self.log(text[-200_000:] + f"=== {label}: rc {p.returncode}, {seconds:.1f} s {flags.get(label, '')}")
            procs.append(Proc(label, None if label in flags else p.returncode, text, round(seconds, 2),
                              flags.get(label) == "timed_out", flags.get(label) == "stopped"))
        return procs


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM to the process group (train.py saves and exits), SIGKILL if it lingers."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(5)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended between the two signals
        p.wait()


def _check(proc: Proc, what: str) -> None:
    if proc.timed_out:
        raise PartFailed(f"{what} ran past its time cap ({proc.seconds:.0f} s): {proc.tail()}")
    if proc.rc != 0 and not proc.stopped:
        raise PartFailed(f"{what} exited with status {proc.rc}: {proc.tail()}")


def _last_json(proc: Proc, what: str) -> dict:
    """The JSON object on the last line of a command's output that holds one."""
    _check(proc, what)
    for line in reversed(proc.out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PartFailed(f"{what} printed no JSON line: {proc.tail()}")


def _read_metrics(run_dir: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl so far (a line still being written is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def _train(s: Suite, run_dir: Path, overrides: list[str]) -> list[str]:
    return [s.python, "train.py", "logger=none", f"device={s.sizes['device']}", "sample_tokens=0",
            "ckpt_interval=0", "final_eval_iters=0", f"out_dir={run_dir}", *overrides]


def _data_overrides(s: Suite) -> list[str]:
    """tiny Shakespeare when --data is given, else a corpus every machine has (the standard library)."""
    if s.args.data is not None:
        return ["data=shakespeare_char", f"data.path={s.args.data}"]
    return ["data=python_stdlib", f"data.max_chars={s.sizes['stdlib_chars']}"]


# ---- the parts ---------------------------------------------------------------------------------------
def part_wheels(s: Suite, r: dict, cap: float) -> None:
    wheels = sorted(s.args.wheels.glob("*.whl"))
    if not wheels:
        raise PartFailed(f"no .whl files in {s.args.wheels}; fetch them with scripts/offline_wheels.sh")
    site = s.work / "site"
    r["site"] = str(site)
    (proc,) = s.run([("pip_install", [s.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                      *map(str, wheels)])], cap)
    _check(proc, "pip install")
    r["installed"] = [w.name for w in wheels]
    r["modules"] = sorted(p.stem for p in site.iterdir() if not p.name.endswith((".dist-info", "__pycache__"))
                          and p.name != "bin" and (p.is_dir() or p.suffix == ".py"))
    (probe,) = s.run([("import_probe", [s.python, "-c", "; ".join(f"import {m}" for m in r["modules"])])], cap)
    _check(probe, f"importing {', '.join(r['modules'])} from the installed site")
    r.update(status="pass", why=f"{len(wheels)} wheels installed and importable")


def part_pytest(s: Suite, r: dict, cap: float) -> None:
    xml = s.work / "pytest.xml"
    (proc,) = s.run([("pytest", [s.python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                                 "--continue-on-collection-errors", f"--junitxml={xml}",
                                 "-o", "junit_family=xunit2"])], cap)
    if proc.timed_out or not xml.exists():
        _check(proc, "pytest")
        raise PartFailed(f"pytest wrote no report: {proc.tail()}")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    r.update(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
             errors=n["errors"], skipped=n["skipped"])
    r["failures"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
    if r["failed"] or r["errors"] or proc.rc != 0:
        raise PartFailed(f"{r['failed']} failed, {r['errors']} errors: {', '.join(r['failures'][:5]) or proc.tail()}")
    if r["passed"] + r["skipped"] == 0:
        raise PartFailed("no gpu-marked test was collected")
    if s.args.dry_run:
        r.update(status="pass", why=f"{r['skipped']} gpu tests collected, skipped without CUDA")
    elif r["passed"] == 0:
        raise PartFailed(f"no GPU test ran ({r['skipped']} skipped): {proc.tail()}")
    else:
        r.update(status="pass", why=f"{r['passed']} passed, {r['skipped']} skipped")


def part_parity(s: Suite, r: dict, cap: float) -> None:
    common = [*_data_overrides(s), *s.sizes["parity"], "log_interval=1", "compile=false", "seed=1337"]
    jobs = [(f"parity_{name}", _train(s, s.work / f"parity_{name}", [*common, f"precision={p}", f"model.attn={a}"]))
            for name, (p, a) in PARITY_RUNS.items()]
    for proc in s.run(jobs, cap):
        _check(proc, proc.label)
    w, tol = s.sizes["window"], s.args.parity_tol
    r.update(window=w, tolerance=tol)
    for name in PARITY_RUNS:
        records = _read_metrics(s.work / f"parity_{name}")
        curve = [rec["train/loss"] for rec in records if "train/loss" in rec]
        vals = [rec["val/loss"] for rec in records if "val/loss" in rec]
        if not curve or not vals or any(v is None for v in curve):
            raise PartFailed(f"parity_{name}: no finite loss curve in metrics.jsonl")
        r["curves"][name] = [round(v, 5) for v in curve]
        r["window_means"][name] = [round(statistics.fmean(curve[i:i + w]), 5) for i in range(0, len(curve), w)]
        r["final_val"][name] = round(vals[-1], 5)
    r["steps"] = len(r["curves"]["fp32"])
    bad = []
    for name, ref in PARITY_REF.items():
        diffs = [abs(a - b) for a, b in zip(r["window_means"][name], r["window_means"][ref], strict=True)]
        r["max_diff"][name] = round(max([*diffs, abs(r["final_val"][name] - r["final_val"][ref])]), 5)
        if r["max_diff"][name] > tol:
            bad.append(f"{name} vs {ref}: {r['max_diff'][name]:.4f}")
    if bad:
        raise PartFailed(f"loss curves differ by more than {tol}: {'; '.join(bad)}")
    r.update(status="pass", why=f"{len(PARITY_REF)} comparisons within {tol} nats")


def part_time_to_loss(s: Suite, r: dict, cap: float) -> None:
    target = s.args.ttl_target if s.args.ttl_target is not None else s.sizes["ttl_target"]
    r["target_val"] = target
    if s.args.dry_run:
        data = _data_overrides(s)
    elif s.args.data is None:
        r.update(status="skipped", why="no tinyshakespeare.txt (pass --data PATH, e.g. .carry/tinyshakespeare.txt)")
        return
    else:
        data = [f"data.path={s.args.data}"]
    run_dir = s.work / "time_to_loss"
    r["overrides"] = ["experiment=shakespeare_char", *data, *s.sizes["ttl"], "seed=1337",
                      *shlex.split(s.args.ttl_overrides)]
    seen = {"lines": 0, "first_eval": None}

    def watch(elapsed: float) -> bool:
        records = _read_metrics(run_dir)
        for rec in records[seen["lines"]:]:
            if rec.get("val/loss") is None:
                continue
            seen["first_eval"] = seen["first_eval"] if seen["first_eval"] is not None else elapsed
            r["best_val"] = round(min(rec["val/loss"], r["best_val"] if r["best_val"] is not None else 1e9), 5)
            if rec["val/loss"] <= target and not r["reached"]:
                r.update(reached=True, step=rec["step"], val=round(rec["val/loss"], 5), wall_s=round(elapsed, 2),
                         from_first_eval_s=round(elapsed - seen["first_eval"], 2))
        seen["lines"] = len(records)
        return bool(r["reached"])

    (proc,) = s.run([("time_to_loss", _train(s, run_dir, r["overrides"]))], cap, watch)
    steps = [rec for rec in _read_metrics(run_dir) if "perf/tokens_per_s" in rec]
    if steps:
        r["tokens_per_s"] = round(statistics.median(rec["perf/tokens_per_s"] for rec in steps), 1)
        mfus = [rec["perf/mfu"] for rec in steps if rec.get("perf/mfu") is not None]
        r["mfu"] = round(statistics.median(mfus), 4) if mfus else None
    if not r["reached"]:
        r["reached"] = False
        if proc.timed_out:
            raise PartFailed(f"val {r['best_val']} > {target} after the {cap:.0f} s cap")
        _check(proc, "train.py")
        raise PartFailed(f"the run ended at best val {r['best_val']} > {target}")
    r["target_met"] = r["wall_s"] <= r["target_wall_s"]
    r.update(status="pass", why=f"val {r['val']} at step {r['step']} after {r['wall_s']} s")


def part_throughput(s: Suite, r: dict, cap: float) -> None:
    (proc,) = s.run([("throughput", [s.python, "scripts/bench_train.py", "--device", s.sizes["device"],
                                     *s.sizes["throughput"]])], cap)
    out = _last_json(proc, "bench_train.py")
    args = s.sizes["throughput"]
    r.update(preset=args[args.index("--preset") + 1], batch_size=out["batch_size"],
             block_size=out["model"]["block_size"], steps=out["steps"], tokens_per_s=out["tokens_per_s"],
             ms_per_iter=out["ms_per_iter_median"], mfu=out.get("mfu"), peak_mem_mb=out["peak_mem_mb"],
             warmup_s=out["warmup_s"])
    r["target_met"] = None if r["mfu"] is None else r["mfu"] >= r["target_mfu"]
    r.update(status="pass", why=f"{out['tokens_per_s']:,.0f} tokens/s on {out['device_name']}")


def part_generation(s: Suite, r: dict, cap: float) -> None:
    base = [s.python, "scripts/bench_sample.py", "--device", s.sizes["device"], *s.sizes["generation"]]
    r["preset"] = base[base.index("--preset") + 1]
    (proc,) = s.run([("generation_eager", base)], cap)
    eager = _last_json(proc, "bench_sample.py (eager)")
    r.update(new_tokens=eager["new_tokens"], eager_tokens_per_s=eager["tokens_per_s"])
    if s.args.dry_run:
        r["compiled_status"] = "skipped: dry run (compiling on CPU costs ~30 s)"
    else:
        (proc,) = s.run([("generation_compiled", [*base, "--compile"])], max(1.0, cap - proc.seconds))
        try:
            compiled = _last_json(proc, "bench_sample.py --compile")
        except PartFailed as e:
            r["compiled_status"] = f"fail: {e}"
            raise
        r.update(compiled_tokens_per_s=compiled["tokens_per_s"], compiled_status="pass")
    if not s.args.dry_run:
        best = max(v for v in (r["eager_tokens_per_s"], r["compiled_tokens_per_s"]) if v is not None)
        r["target_met"] = best >= r["target_tokens_per_s"]
    r.update(status="pass", why=f"{r['new_tokens']} new tokens after a 16-token prompt")


def part_scale(s: Suite, r: dict, cap: float) -> None:
    spec = {**s.sizes["scale"], "device": s.sizes["device"]}
    (proc,) = s.run([("scale", [s.python, __file__, "--worker", "scale", "--spec", json.dumps(spec)])], cap / 2)
    out = _last_json(proc, "the scale worker")
    r.update({k: out[k] for k in ("preset", "params", "batch_size", "block_size", "tried", "plain", "checkpointed")})
    if out["preset"] is None:
        raise PartFailed(f"no preset trained one step: {out['tried']}")
    fsdp_spec = {**spec, "presets": [out["preset"]]}
    (proc,) = s.run([("fsdp", [s.python, __file__, "--worker", "fsdp", "--spec", json.dumps(fsdp_spec)])],
                    max(1.0, cap - proc.seconds))
    try:
        r["fsdp"] = _last_json(proc, "the FSDP2 worker")
    except PartFailed as e:
        r["fsdp"] = {"ok": False, "error": str(e)}
    problems = [f"{k}: {r[k].get('error')}" for k in ("plain", "checkpointed", "fsdp") if not r[k]["ok"]]
    plain, ckpt = r["plain"]["mem_mb"], r["checkpointed"]["mem_mb"]
    if plain is not None and ckpt is not None and ckpt >= plain:
        problems.append(f"activation checkpointing did not lower peak memory ({ckpt} >= {plain} MB)")
    if problems:
        raise PartFailed("; ".join(problems))
    r.update(status="pass", why=f"{out['preset']} ({out['params']:,} params) trains one step each way")


PART_FUNCS = {"wheels": part_wheels, "pytest": part_pytest, "parity": part_parity,
              "time_to_loss": part_time_to_loss, "throughput": part_throughput,
              "generation": part_generation, "scale": part_scale}


# ---- workers: run as `gpu_suite.py --worker NAME --spec JSON`, print one JSON line ------------------
def worker_env(spec: dict) -> dict:
    import importlib.metadata
    import platform

    import torch

    from engine.runtime import setup_runtime
    versions = {}
    for dist in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "numpy", "tokenizers", "tqdm",
                 "safetensors", "matplotlib", "pytest", "triton", "wandb", "datasets"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
        hydra_ok = True
    except ImportError:
        hydra_ok = False
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device_name": platform.processor() or platform.machine(),
            "capability": None, "precision_auto": "fp32", "peak_flops": None, "cpus": os.cpu_count(),
            "hydra": hydra_ok, "packages": versions}
    if info["cuda_available"]:
        rt = setup_runtime("cuda", "auto", "false")
        info.update(device_name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    precision_auto=rt.precision, peak_flops=rt.peak_flops())
    return info


def _one_step(spec: dict, preset: str, mode: str) -> dict:
    """Build the preset on the device and train one step (forward, backward, clip, AdamW) in mode
    plain, checkpointed (each block recomputed in backward) or fsdp; peak memory over all of it."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from cli import model_preset
    from engine.config import OptimConfig
    from engine.optim import build_optimizer
    from engine.parallel import wrap_model
    from engine.runtime import Runtime, setup_runtime
    from engine.step import clip_grad_norm
    from model import GPT, ModelConfig

    class Checkpointed(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor, **kwargs):
            return checkpoint(self.block, x, use_reentrant=False, **kwargs)

    class OneRank(Runtime):  # engine.parallel shards only when distributed: one rank counts here
        @property
        def distributed(self) -> bool:
            return True

    rt = setup_runtime(spec["device"], spec["precision"], "false", 1 if spec["device"] == "cpu" else 0)
    cfg = ModelConfig(**{**model_preset(preset), **({"block_size": spec["block_size"]} if spec["block_size"] else {})})
    cuda = rt.device_type == "cuda"
    gc.collect()  # the previous variant's model and optimizer: gone before this one is measured
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        with rt.device:
            model = GPT(ModelConfig(**{**cfg.to_dict(), "vocab_size": cfg.vocab_size or 65}))
        train_model = model
        if mode == "checkpointed":
            model.h = nn.ModuleList(Checkpointed(b) for b in model.h)
        elif mode == "fsdp":
            import torch.distributed as dist
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{spec['store']}", rank=0,
                                    world_size=1, **({"device_id": rt.device} if cuda else {}))
            rt = OneRank(**{k: getattr(rt, k) for k in ("rank", "local_rank", "world_size", "device", "precision",
                                                        "compile")})
            train_model, _ = wrap_model(model, rt, "fsdp")
        optimizer = build_optimizer(model, OptimConfig(), rt.device_type)
        x = torch.randint(0, model.config.vocab_size, (spec["batch_size"], cfg.block_size + 1), device=rt.device)
        with rt.autocast():
            _, loss = train_model(x[:, :-1], x[:, 1:])
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
    except torch.cuda.OutOfMemoryError as e:
        return {"ok": False, "error": f"out of memory: {str(e).splitlines()[0]}", "mem_mb": None}
    finally:
        if mode == "fsdp":
            rt.close()
    return {"ok": True, "error": None, "loss": round(loss_value, 4), "step_s": round(time.perf_counter() - t0, 3),
            "mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "params": model.num_params(), "block_size": cfg.block_size}


def worker_scale(spec: dict) -> dict:
    out = {"preset": None, "params": None, "batch_size": spec["batch_size"], "block_size": None, "tried": [],
           "plain": None, "checkpointed": None}
    for preset in spec["presets"]:  # largest first
        plain, ckpt = _one_step(spec, preset, "plain"), _one_step(spec, preset, "checkpointed")
        out["tried"].append({"preset": preset, "plain": plain["ok"], "checkpointed": ckpt["ok"]})
        if plain["ok"] or ckpt["ok"]:
            done = plain if plain["ok"] else ckpt
            out.update(preset=preset, params=done["params"], block_size=done["block_size"], plain=plain,
                       checkpointed=ckpt)
            break
    return out


def worker_fsdp(spec: dict) -> dict:
    fd, store = tempfile.mkstemp(prefix="gpu_suite_store-")
    os.close(fd)
    os.unlink(store)  # the file store wants a path that does not exist yet
    try:
        return _one_step({**spec, "store": store}, spec["presets"][0], "fsdp")
    finally:
        Path(store).unlink(missing_ok=True)


WORKERS = {"env": worker_env, "scale": worker_scale, "fsdp": worker_fsdp}


# ---- the record ----------------------------------------------------------------------------------------
def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _rows(name: str, p: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows of one part for the Markdown table."""
    match name:
        case "wheels":
            return [("wheels installed", _fmt(len(p["installed"])), "")]
        case "pytest":
            return [("passed / failed / errors / skipped",
                     " / ".join(_fmt(p[k]) for k in ("passed", "failed", "errors", "skipped")), "none fail")]
        case "parity":
            return [(f"max abs diff of {p['window']}-step mean train loss and final val: {k} vs {PARITY_REF[k]}",
                     _fmt(v, 4), f"<= {p['tolerance']}") for k, v in p["max_diff"].items()] or [("loss curves", "-", "")]
        case "time_to_loss":
            return [(f"wall s to val <= {p['target_val']} (process start; from first eval)",
                     f"{_fmt(p['wall_s'], 1)} ({_fmt(p['from_first_eval_s'], 1)})", f"<= {p['target_wall_s']:.0f}"),
                    ("step, val at the crossing", f"{_fmt(p['step'])}, {_fmt(p['val'], 4)}", ""),
                    ("tokens/s, MFU while training", f"{_fmt(p['tokens_per_s'])}, {_fmt(p['mfu'])}", "")]
        case "throughput":
            return [(f"{p['preset']} T={p['block_size']} B={p['batch_size']}: tokens/s", _fmt(p["tokens_per_s"]), ""),
                    ("MFU", _fmt(p["mfu"]), f">= {p['target_mfu']}"), ("ms/step", _fmt(p["ms_per_iter"], 1), ""),
                    ("peak memory MB", _fmt(p["peak_mem_mb"], 0), "")]
        case "generation":
            return [(f"{p['preset']} B=1, {p['new_tokens']} new tokens: tokens/s eager", _fmt(p["eager_tokens_per_s"], 1), ""),
                    ("tokens/s compiled", _fmt(p["compiled_tokens_per_s"], 1) if p["compiled_tokens_per_s"] is not None
                     else _fmt(p["compiled_status"]), f">= {p['target_tokens_per_s']:,.0f}")]
        case "scale":
            return [(f"{p['preset']} B={p['batch_size']} T={p['block_size']} peak MB, {k}",
                     _fmt((p[k] or {}).get("mem_mb"), 0) if (p[k] or {}).get("ok") else _fmt((p[k] or {}).get("error")), "")
                    for k in ("plain", "checkpointed", "fsdp")]
    return []


def markdown(report: dict) -> str:
    env = report["env"]
    head = (f"GPU suite{' (dry run)' if report['dry_run'] else ''}: {env.get('device_name')}, torch {env.get('torch')}, "
            f"CUDA {env.get('cuda')}, Python {env.get('python')}, commit {env.get('git_commit') or '-'}, "
            f"{report['started']}, {report['wall_s']:.0f} s in all")
    lines = [head, "", "| part | status | figure | value | target |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        status = p["status"] if p["status"] == "pass" else f"{p['status']}: {p['why']}"
        for i, (figure, value, target) in enumerate(_rows(name, p)):
            cells = [name if i == 0 else "", status if i == 0 else "", figure, value, target]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _env(s: Suite) -> dict:
    """The env worker's answer: versions, the device, whether Hydra imports; {"error": ...} if it failed."""
    (proc,) = s.run([("env", [s.python, __file__, "--worker", "env"])], 120)
    try:
        return _last_json(proc, "the env worker")
    except PartFailed as e:
        return {"error": str(e)}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="directory for gpu_suite.json, gpu_suite.md and gpu_suite.log")
    p.add_argument("--dry-run", action="store_true", help="the same code on CPU with tiny sizes (< 2 minutes)")
    p.add_argument("--wheels", type=Path, help="install the *.whl files in this directory first (offline)")
    p.add_argument("--data", type=Path, help="tinyshakespeare.txt (default: .carry/tinyshakespeare.txt if present)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, help="seconds for the whole suite (default 460; dry run 110)")
    p.add_argument("--parity-tol", type=float, default=0.05, help="largest loss difference, nats (default 0.05)")
    p.add_argument("--ttl-target", type=float, help="val loss to reach (default 1.47; dry run 4.0)")
    p.add_argument("--ttl-overrides", default="", help="extra train.py overrides for time_to_loss, quoted")
    p.add_argument("--keep", action="store_true", help="keep the work directory (run dirs, data, outputs)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.out is None:
        p.error("--out DIR is required")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels {args.wheels}: no such directory")
    if args.data is None and (ROOT / ".carry" / "tinyshakespeare.txt").is_file() and not args.dry_run:
        args.data = ROOT / ".carry" / "tinyshakespeare.txt"
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    args.data = args.data.resolve() if args.data is not None else None
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(WORKERS[args.worker](json.loads(args.spec))))
        return 0
    sizes = DRY if args.dry_run else GPU
    budget = args.budget or sizes["budget_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    site = work / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "CAUSALGPT_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(x for x in (str(site) if args.wheels else "", str(ROOT),
                                                     os.environ.get("PYTHONPATH", "")) if x)}
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    log_path = args.out / "gpu_suite.log"
    log_path.write_text("")
    start = time.monotonic()
    s = Suite(args, sizes, work, env, log_path, start + budget)
    report = {"suite": "causalgpt gpu_suite", "dry_run": args.dry_run,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_s": 0.0, "budget_s": budget,
              "command": shlex.join([sys.executable, *sys.argv]), "work_dir": str(work) if args.keep else None,
              "env": {}, "parts": {}, "summary": {}}
    selected = args.parts.split(",")
    for i, name in enumerate(PARTS):
        r = {"status": "skipped", "why": "", "seconds": 0.0, "cap_s": 0.0, **copy.deepcopy(FIGURES[name])}
        report["parts"][name] = r
        if name == "pytest":  # after the wheels: what the suite's processes can import, and the device
            s.info = _env(s)
            report["env"] = {**s.info, "git_commit": _git_commit()}
        # Each part after this one keeps min_part_s of the budget; unused time passes on to the next.
        cap = min(sizes["caps"][name], s.deadline - time.monotonic() - sizes["min_part_s"] * (len(PARTS) - 1 - i))
        r["cap_s"] = round(max(cap, 0.0), 1)
        if name not in selected:
            r["why"] = "not selected (--parts)"
        elif name != "wheels" and "error" in s.info:
            r["why"] = f"torch could not start: {s.info['error']}"
        elif name != "wheels" and not args.dry_run and not s.info.get("cuda_available"):
            r["why"] = "no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs the CPU path"
        elif name in NEED_HYDRA and not s.info.get("hydra"):
            r["why"] = "hydra-core is not importable: fetch it with scripts/offline_wheels.sh, pass --wheels .whl"
        elif name == "wheels" and args.wheels is None:
            r["why"] = "no --wheels DIR given"
        elif cap < sizes["min_part_s"]:
            r["why"] = f"out of time: {max(cap, 0.0):.0f} s left of the {budget:.0f} s budget"
        else:
            t0 = time.monotonic()
            try:
                PART_FUNCS[name](s, r, cap)
            except PartFailed as e:
                r.update(status="fail", why=str(e))
            except Exception as e:  # a bug in this file must not cost the remaining parts their run
                s.log(traceback.format_exc())
                r.update(status="fail", why=f"{type(e).__name__} in gpu_suite.py: {e}")
            r["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu_suite] {name}: {r['status']}{': ' + r['why'] if r['why'] else ''} ({r['seconds']} s)",
              file=sys.stderr, flush=True)
        report["wall_s"] = round(time.monotonic() - start, 1)
        report["summary"] = {k: sum(p["status"] == k for p in report["parts"].values())
                             for k in ("pass", "fail", "skipped")}
        (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=1) + "\n")  # each part, in case of a kill
    table = markdown(report)
    (args.out / "gpu_suite.md").write_text(table)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out / 'gpu_suite.json'}, gpu_suite.md, gpu_suite.log\n")
    print(table, end="")
    return 1 if report["summary"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())

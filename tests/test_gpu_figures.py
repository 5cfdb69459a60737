"""The GPU figures, as tests: precision parity, scale, time to loss, throughput and generation.

Each test runs the project's own commands (train.py, scripts/bench_train.py, scripts/bench_sample.py,
and tests/gpu_workers.py for the one-step scale checks), asserts what must hold, and writes its
figures to <out>/<part>.json, also when it fails, with the table rows for BENCHMARKS.md.
scripts/gpu_suite.py runs them one part at a time within its time budget
(`pytest tests/test_gpu_figures.py -k <part>`), with its settings in $CAUSALGPT_GPU_SUITE (JSON: out,
dry_run, data, cap_s, parity_tol, ttl_target, ttl_overrides). Run by hand on a GPU they use the real
sizes and write to a temporary directory; in a dry run they run on CPU with tiny sizes, fp32 and no
compilation; without either they are skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).with_name("gpu_workers.py")  # the scale and FSDP2 workers, run as scripts
SETTINGS = json.loads(os.environ.get("CAUSALGPT_GPU_SUITE") or "{}")
DRY = bool(SETTINGS.get("dry_run"))
TARGETS = {"time_to_loss_wall_s": 45.0, "mfu": 0.50, "generation_tokens_per_s": 2000.0}
pytestmark = [pytest.mark.gpu, pytest.mark.figures,
              pytest.mark.skipif(not DRY and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Sizes of a real run (one CUDA GPU) and of a dry run (CPU, tiny, seconds each).
SIZES = dict(
    device="cpu" if DRY else "cuda", ttl_target=4.0 if DRY else 1.47, window=5 if DRY else 20,
    stdlib_chars=200_000 if DRY else 2_000_000,
    parity=(["model=tiny", "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32",
             "batch_size=8", "max_iters=30", "eval_interval=30", "eval_iters=2", "optim.warmup_iters=5", "threads=1"]
            if DRY else ["model=small", "batch_size=32", "max_iters=200", "eval_interval=200", "eval_iters=20",
                         "optim.warmup_iters=20"]),
    ttl=(["precision=fp32", "compile=false", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
          "model.block_size=32", "model.dropout=0.0", "batch_size=8", "max_iters=60", "eval_interval=10",
          "eval_iters=2", "optim.warmup_iters=5", "threads=1"] if DRY else ["precision=bf16", "compile=true"]),
    throughput=(["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--precision", "fp32",
                 "--compile", "false", "--steps", "3", "--warmup", "1", "--threads", "1"] if DRY else
                ["--preset", "gpt2", "--block-size", "1024", "--batch-size", "16", "--precision", "bf16",
                 "--compile", "true", "--steps", "30", "--warmup", "5"]),
    generation=(["--preset", "tiny", "--batch", "1", "--precision", "fp32", "--prompt-len", "16",
                 "--new-tokens", "16", "--repeats", "1", "--threads", "1"] if DRY else
                ["--preset", "gpt2", "--batch", "1", "--precision", "bf16", "--prompt-len", "16",
                 "--new-tokens", "496", "--repeats", "2"]),
    scale=(dict(presets=["tiny"], batch_size=2, block_size=32, precision="fp32") if DRY else
           dict(presets=["gpt2-medium", "gpt2", "small", "tiny"], batch_size=8, block_size=None, precision="bf16")),
)
PARITY_RUNS = {"fp32": ("fp32", "sdpa"), "bf16": ("bf16", "sdpa"), "fp16": ("fp16", "sdpa"),
               "bf16_explicit": ("bf16", "explicit")}
PARITY_REF = {"bf16": "fp32", "fp16": "fp32", "bf16_explicit": "bf16"}


# The figures of each part: always present in its JSON (None or empty when not measured).
FIGURES: dict[str, dict] = {
    "parity": {"steps": None, "window": None, "tolerance": None, "max_diff": {}, "final_val": {},
               "window_means": {}, "curves": {}},
    "scale": {"preset": None, "params": None, "batch_size": None, "block_size": None, "tried": [],
              "plain": None, "checkpointed": None, "fsdp": None},
    "time_to_loss": {"target_val": None, "reached": None, "step": None, "val": None, "best_val": None,
                     "wall_s": None, "from_first_eval_s": None, "tokens_per_s": None, "mfu": None,
                     "target_wall_s": TARGETS["time_to_loss_wall_s"], "target_met": None, "overrides": []},
    "throughput": {"preset": None, "batch_size": None, "block_size": None, "steps": None, "tokens_per_s": None,
                   "ms_per_iter": None, "mfu": None, "peak_mem_mb": None, "warmup_s": None,
                   "target_mfu": TARGETS["mfu"], "target_met": None},
    "generation": {"preset": None, "new_tokens": None, "eager_tokens_per_s": None, "compiled_tokens_per_s": None,
                   "compiled_status": None, "target_tokens_per_s": TARGETS["generation_tokens_per_s"],
                   "target_met": None},
}


# ---- running commands within a time cap --------------------------------------------------------------
class Part:
    """One part's figures, its output directory and its share of the time; record() writes
    <out>/<name>.json (the figures, a status and the Markdown rows) and <out>/<name>.log."""

    def __init__(self, name: str, tmp_path: Path, figures: dict) -> None:
        self.name, self.figures = name, figures
        self.out = Path(SETTINGS.get("out") or tmp_path)
        self.work = tmp_path
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / f"{name}.log"
        self.cap = float(SETTINGS.get("cap_s") or 600)
        self.start = time.monotonic()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
            x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x), "CAUSALGPT_CACHE": str(tmp_path / "cache")}
        if DRY:
            self.env["OMP_NUM_THREADS"] = "1"

    def left(self) -> float:
        return max(1.0, self.cap - 5 - (time.monotonic() - self.start))  # 5 s to write the record

    def run(self, jobs: list[tuple[str, list[str]]], watch: Callable[[float], bool] | None = None) -> list[dict]:
        """Run jobs (label, argv) side by side from the repository root until they end, the cap, or
        watch(elapsed) says stop; each result is {label, rc (None when stopped), out, timed_out, stopped}."""
        cap, running = self.left(), []
        for label, cmd in jobs:
            out = (self.work / f"{label}.out").open("w+", encoding="utf-8", errors="replace")
            running.append((label, cmd, out, subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out,
                                                             stderr=subprocess.STDOUT, start_new_session=True)))
        start, why = time.monotonic(), ""
        try:
            while any(p.poll() is None for *_, p in running):
                if not why:
                    elapsed = time.monotonic() - start
                    why = "stopped" if watch is not None and watch(elapsed) else "timed_out" if elapsed > cap else ""
                if why:
                    for *_, p in running:
                        _stop(p)
                time.sleep(0.2)
            if watch is not None:
                watch(time.monotonic() - start)  # a last look at what was written before the end
        finally:  # no process outlives its part
            for *_, p in running:
                _stop(p)
        results = []
        with self.log_path.open("a", encoding="utf-8") as log:
            for label, cmd, out, p in running:
                out.seek(0)
                text = out.read()
                out.close()
                log.write(f"\n=== {label}: {shlex.join(cmd)}\n{text[-200_000:]}=== {label}: rc {p.returncode} {why}\n")
                results.append({"label": label, "rc": None if why else p.returncode, "out": text,
                                "timed_out": why == "timed_out", "stopped": why == "stopped"})
        return results

    def record(self, status: str, why: str, rows: list[list[str]]) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(
            {"status": status, "why": why, "figures": self.figures, "rows": rows}, indent=1) + "\n")


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM to the process group (train.py saves and exits), SIGKILL if it lingers."""
    if p.poll() is not None:
        return
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


def _tail(result: dict, n: int = 300) -> str:
    return " ".join(result["out"][-n:].split())


def _check(result: dict, what: str) -> None:
    assert not result["timed_out"], f"{what} ran past its time cap: {_tail(result)}"
    assert result["rc"] == 0 or result["stopped"], f"{what} exited with status {result['rc']}: {_tail(result)}"


def _last_json(result: dict, what: str) -> dict:
    """The JSON object on the last line of a command's output that holds one."""
    _check(result, what)
    for line in reversed(result["out"].splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"{what} printed no JSON line: {_tail(result)}")


def _read_metrics(run_dir: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl so far (a line still being written is left out)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()] if path.exists() else []


def _train(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "train.py", "logger=none", f"device={SIZES['device']}", "sample_tokens=0",
            "ckpt_interval=0", "final_eval_iters=0", f"out_dir={run_dir}", *overrides]


def _data() -> list[str]:
    """tiny Shakespeare when the suite was given it, else a corpus every machine has (the standard library)."""
    if SETTINGS.get("data"):
        return ["data=shakespeare_char", f"data.path={SETTINGS['data']}"]
    return ["data=python_stdlib", f"data.max_chars={SIZES['stdlib_chars']}"]


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _figures_test(name: str, rows: Callable[[dict], list[list[str]]]):
    """Run body(part) for the part, then record its figures and rows whatever happened: pass,
    skipped (pytest.skip inside) or fail with the one-line reason."""
    def wrap(body):
        def test(tmp_path):
            part = Part(name, tmp_path, json.loads(json.dumps(FIGURES[name])))  # a fresh copy
            try:
                why = body(part)
            except pytest.skip.Exception as e:
                part.record("skipped", str(e.msg), rows(part.figures))
                raise
            except BaseException as e:
                part.record("fail", " ".join(str(e).split("\nassert")[0].split()) or type(e).__name__, rows(part.figures))
                raise
            part.record("pass", why, rows(part.figures))
        test.__name__, test.__doc__ = f"test_{name}", body.__doc__
        return test
    return wrap


# ---- the parts ---------------------------------------------------------------------------------------
@_figures_test("parity",
               lambda p: [[f"max abs diff of {p['window']}-step mean train loss and final val: {k} vs {PARITY_REF[k]}",
                           _fmt(v, 4), f"<= {p['tolerance']}"] for k, v in p["max_diff"].items()]
               or [["loss curves", "-", ""]])
def test_parity(part: Part) -> str:
    """fp32, bf16, fp16 (GradScaler) and bf16 with attn=explicit from one seed, side by side: the
    window-mean train losses and the final val loss agree with the reference within the tolerance."""
    common = [*_data(), *SIZES["parity"], "log_interval=1", "compile=false", "seed=1337"]
    jobs = [(f"parity_{name}", _train(part.work / f"parity_{name}", [*common, f"precision={p}", f"model.attn={a}"]))
            for name, (p, a) in PARITY_RUNS.items()]
    for result in part.run(jobs):
        _check(result, result["label"])
    r, w, tol = part.figures, SIZES["window"], float(SETTINGS.get("parity_tol") or 0.05)
    r.update(window=w, tolerance=tol)
    for name in PARITY_RUNS:
        records = _read_metrics(part.work / f"parity_{name}")
        curve = [rec["train/loss"] for rec in records if "train/loss" in rec]
        vals = [rec["val/loss"] for rec in records if "val/loss" in rec]
        assert curve and vals and None not in curve, f"parity_{name}: no finite loss curve in metrics.jsonl"
        r["curves"][name] = [round(v, 5) for v in curve]
        r["window_means"][name] = [round(statistics.fmean(curve[i:i + w]), 5) for i in range(0, len(curve), w)]
        r["final_val"][name] = round(vals[-1], 5)
    r["steps"] = len(r["curves"]["fp32"])
    for name, ref in PARITY_REF.items():
        diffs = [abs(a - b) for a, b in zip(r["window_means"][name], r["window_means"][ref], strict=True)]
        r["max_diff"][name] = round(max([*diffs, abs(r["final_val"][name] - r["final_val"][ref])]), 5)
    bad = [f"{k} vs {PARITY_REF[k]}: {v:.4f}" for k, v in r["max_diff"].items() if v > tol]
    assert not bad, f"loss curves differ by more than {tol}: {'; '.join(bad)}"
    return f"{len(PARITY_REF)} comparisons within {tol} nats"


@_figures_test("time_to_loss",
               lambda p: [[f"wall s to val <= {p['target_val']} (process start; from first eval)",
                           f"{_fmt(p['wall_s'], 1)} ({_fmt(p['from_first_eval_s'], 1)})", f"<= {p['target_wall_s']:.0f}"],
                          ["step, val at the crossing", f"{_fmt(p['step'])}, {_fmt(p['val'], 4)}", ""],
                          ["tokens/s, MFU while training", f"{_fmt(p['tokens_per_s'])}, {_fmt(p['mfu'])}", ""]])
def test_time_to_loss(part: Part) -> str:
    """train.py experiment=shakespeare_char until an eval reaches the target val loss, watched in
    metrics.jsonl and stopped there; wall time from the process start, compilation included."""
    r = part.figures
    r["target_val"] = target = float(SETTINGS.get("ttl_target") or SIZES["ttl_target"])
    if not DRY and not SETTINGS.get("data"):
        pytest.skip("no tinyshakespeare.txt (pass --data PATH, e.g. .carry/tinyshakespeare.txt)")
    run_dir = part.work / "time_to_loss"
    r["overrides"] = ["experiment=shakespeare_char", *(_data() if DRY else [f"data.path={SETTINGS['data']}"]),
                      *SIZES["ttl"], "seed=1337", *shlex.split(SETTINGS.get("ttl_overrides") or "")]
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

    (result,) = part.run([("time_to_loss", _train(run_dir, r["overrides"]))], watch)
    steps = [rec for rec in _read_metrics(run_dir) if "perf/tokens_per_s" in rec]
    if steps:
        r["tokens_per_s"] = round(statistics.median(rec["perf/tokens_per_s"] for rec in steps), 1)
        mfus = [rec["perf/mfu"] for rec in steps if rec.get("perf/mfu") is not None]
        r["mfu"] = round(statistics.median(mfus), 4) if mfus else None
    if not r["reached"]:
        r["reached"] = False
        assert not result["timed_out"], f"val {r['best_val']} > {target} after the time cap"
        _check(result, "train.py")
        raise AssertionError(f"the run ended at best val {r['best_val']} > {target}")
    r["target_met"] = r["wall_s"] <= r["target_wall_s"]
    return f"val {r['val']} at step {r['step']} after {r['wall_s']} s"


@_figures_test("throughput",
               lambda p: [[f"{p['preset']} T={p['block_size']} B={p['batch_size']}: tokens/s", _fmt(p["tokens_per_s"]), ""],
                          ["MFU", _fmt(p["mfu"]), f">= {p['target_mfu']}"], ["ms/step", _fmt(p["ms_per_iter"], 1), ""],
                          ["peak memory MB", _fmt(p["peak_mem_mb"], 0), ""]])
def test_throughput(part: Part) -> str:
    """scripts/bench_train.py: tokens/s, MFU (peak from engine/runtime.py's table) and peak memory."""
    args = SIZES["throughput"]
    (result,) = part.run([("throughput", [sys.executable, "scripts/bench_train.py", "--device", SIZES["device"], *args])])
    out, r = _last_json(result, "bench_train.py"), part.figures
    r.update(preset=args[args.index("--preset") + 1], batch_size=out["batch_size"],
             block_size=out["model"]["block_size"], steps=out["steps"], tokens_per_s=out["tokens_per_s"],
             ms_per_iter=out["ms_per_iter_median"], mfu=out.get("mfu"), peak_mem_mb=out["peak_mem_mb"],
             warmup_s=out["warmup_s"])
    assert r["tokens_per_s"] > 0 and r["ms_per_iter"] > 0
    r["target_met"] = None if r["mfu"] is None else r["mfu"] >= r["target_mfu"]
    return f"{out['tokens_per_s']:,.0f} tokens/s on {out['device_name']}"


@_figures_test("generation",
               lambda p: [[f"{p['preset']} B=1, {p['new_tokens']} new tokens: tokens/s eager",
                           _fmt(p["eager_tokens_per_s"], 1), ""],
                          ["tokens/s compiled", _fmt(p["compiled_tokens_per_s"], 1) if p["compiled_tokens_per_s"]
                           is not None else _fmt(p["compiled_status"]), f">= {p['target_tokens_per_s']:,.0f}"]])
def test_generation(part: Part) -> str:
    """scripts/bench_sample.py with the KV cache, eager and compiled (not in a dry run: compiling on
    CPU costs ~30 s)."""
    base, r = [sys.executable, "scripts/bench_sample.py", "--device", SIZES["device"], *SIZES["generation"]], part.figures
    r["preset"] = base[base.index("--preset") + 1]
    (result,) = part.run([("generation_eager", base)])
    eager = _last_json(result, "bench_sample.py (eager)")
    r.update(new_tokens=eager["new_tokens"], eager_tokens_per_s=eager["tokens_per_s"])
    assert r["new_tokens"] > 0 and r["eager_tokens_per_s"] > 0, eager
    if DRY:
        r["compiled_status"] = "skipped: dry run (compiling on CPU costs ~30 s)"
        return f"{r['new_tokens']} new tokens after a 16-token prompt"
    r["compiled_status"] = "fail"
    (result,) = part.run([("generation_compiled", [*base, "--compile"])])
    r.update(compiled_tokens_per_s=_last_json(result, "bench_sample.py --compile")["tokens_per_s"], compiled_status="pass")
    assert r["compiled_tokens_per_s"] > 0, r
    r["target_met"] = max(r["eager_tokens_per_s"], r["compiled_tokens_per_s"]) >= r["target_tokens_per_s"]
    return f"{r['new_tokens']} new tokens after a 16-token prompt"


@_figures_test("scale",
               lambda p: [[f"{p['preset']} B={p['batch_size']} T={p['block_size']} peak MB, {k}",
                           _fmt((p[k] or {}).get("mem_mb"), 0) if (p[k] or {}).get("ok")
                           else _fmt((p[k] or {}).get("error")), ""] for k in ("plain", "checkpointed", "fsdp")])
def test_scale(part: Part) -> str:
    """The largest preset that trains one step, with and without activation checkpointing, and
    sharded by FSDP2 on one rank: each works, and checkpointing lowers the peak memory."""
    spec, r = {**SIZES["scale"], "device": SIZES["device"]}, part.figures
    (result,) = part.run([("scale", [sys.executable, str(WORKERS), "scale", json.dumps(spec)])])
    out = _last_json(result, "the scale worker")
    r.update({k: out[k] for k in ("preset", "params", "batch_size", "block_size", "tried", "plain", "checkpointed")})
    assert out["preset"] is not None, f"no preset trained one step: {out['tried']}"
    (result,) = part.run([("fsdp", [sys.executable, str(WORKERS), "fsdp", json.dumps({**spec, "presets": [out["preset"]]})])])
    try:
        r["fsdp"] = _last_json(result, "the FSDP2 worker")
    except AssertionError as e:
        r["fsdp"] = {"ok": False, "error": str(e)}
    problems = [f"{k}: {r[k].get('error')}" for k in ("plain", "checkpointed", "fsdp") if not r[k]["ok"]]
    plain, ckpt = r["plain"]["mem_mb"], r["checkpointed"]["mem_mb"]
    if plain is not None and ckpt is not None and ckpt >= plain:
        problems.append(f"activation checkpointing did not lower peak memory ({ckpt} >= {plain} MB)")
    assert not problems, "; ".join(problems)
    return f"{out['preset']} ({out['params']:,} params) trains one step each way"

"""scripts/gpu_suite.py cannot rot: its --dry-run runs every part's code on CPU with tiny sizes (the
carried-wheel install included, with a small wheel made here), and every key of the JSON it writes
is checked, with values that show each part really ran. Without CUDA and without --dry-run, every
part is skipped with the reason; bad arguments are one-line errors."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_script

SUITE = "scripts/gpu_suite.py"
PARTS = ["wheels", "pytest", "parity", "scale", "time_to_loss", "throughput", "generation"]
TOP_KEYS = {"suite", "dry_run", "started", "wall_s", "budget_s", "command", "work_dir", "env", "parts", "summary"}
ENV_KEYS = {"python", "torch", "cuda", "cuda_available", "device_name", "capability", "precision_auto",
            "peak_flops", "cpus", "hydra", "packages", "git_commit"}
COMMON = {"status", "why", "seconds", "cap_s"}
FIGURES = {
    "wheels": {"installed", "modules", "site"},
    "pytest": {"passed", "failed", "skipped", "errors", "failures"},
    "parity": {"steps", "window", "tolerance", "max_diff", "final_val", "window_means", "curves"},
    "time_to_loss": {"target_val", "reached", "step", "val", "best_val", "wall_s", "from_first_eval_s",
                     "tokens_per_s", "mfu", "target_wall_s", "target_met", "overrides"},
    "throughput": {"preset", "batch_size", "block_size", "steps", "tokens_per_s", "ms_per_iter", "mfu",
                   "peak_mem_mb", "warmup_s", "target_mfu", "target_met"},
    "generation": {"preset", "new_tokens", "eager_tokens_per_s", "compiled_tokens_per_s", "compiled_status",
                   "target_tokens_per_s", "target_met"},
    "scale": {"preset", "params", "batch_size", "block_size", "tried", "plain", "checkpointed", "fsdp"},
}
STEP_KEYS = {"ok", "error", "loss", "step_s", "mem_mb", "params", "block_size"}
PARITY_RUNS = {"fp32", "bf16", "fp16", "bf16_explicit"}


def probe_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel: the suite must install it and import it in its processes."""
    directory.mkdir()
    info = "causalgpt_probe-0.1.dist-info"
    files = {"causalgpt_probe/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: causalgpt-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = directory / "causalgpt_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def check_keys(report: dict) -> None:
    assert set(report) == TOP_KEYS
    assert set(report["env"]) == ENV_KEYS
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert set(part) == COMMON | FIGURES[name], name
        assert part["status"] in ("pass", "fail", "skipped"), name
        assert part["status"] == "pass" or part["why"], f"{name}: a fail or skip must say why"


@pytest.mark.slow
def test_dry_run_runs_every_part_and_records_every_figure(tmp_path):
    wheel = probe_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    r = run_script([SUITE, "--dry-run", "--out", str(out), "--wheels", str(wheel.parent)], timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    check_keys(report)
    parts = report["parts"]
    assert {n: p["status"] for n, p in parts.items()} == dict.fromkeys(PARTS, "pass"), \
        {n: p["why"] for n, p in parts.items()}
    assert report["dry_run"] is True and report["summary"] == {"pass": 7, "fail": 0, "skipped": 0}
    assert report["env"]["cuda_available"] is False and report["env"]["hydra"] is True
    assert 0 < report["wall_s"] < 120 and report["work_dir"] is None

    wheels = parts["wheels"]
    assert wheels["installed"] == [wheel.name] and wheels["modules"] == ["causalgpt_probe"]

    tests = parts["pytest"]  # the gpu tests are collected and skipped without CUDA; none fails
    assert tests["skipped"] >= 7 and tests["passed"] == tests["failed"] == tests["errors"] == 0

    parity = parts["parity"]
    assert set(parity["curves"]) == set(parity["window_means"]) == set(parity["final_val"]) == PARITY_RUNS
    assert parity["steps"] == 30 and all(len(c) == 30 for c in parity["curves"].values())
    assert all(len(m) == 30 // parity["window"] for m in parity["window_means"].values())
    assert set(parity["max_diff"]) == {"bf16", "fp16", "bf16_explicit"}
    assert all(0 <= d <= parity["tolerance"] for d in parity["max_diff"].values())
    assert parity["final_val"]["fp32"] < parity["window_means"]["fp32"][0] - 0.3  # it learned

    ttl = parts["time_to_loss"]
    assert ttl["reached"] is True and ttl["val"] <= ttl["target_val"] == 4.0 and ttl["best_val"] <= ttl["val"]
    assert ttl["step"] > 0 and 0 <= ttl["from_first_eval_s"] < ttl["wall_s"] and ttl["tokens_per_s"] > 0
    assert ttl["mfu"] is None and isinstance(ttl["target_met"], bool)
    assert "experiment=shakespeare_char" in ttl["overrides"]

    tp = parts["throughput"]
    assert (tp["preset"], tp["batch_size"], tp["block_size"], tp["steps"]) == ("tiny", 4, 32, 3)
    assert tp["tokens_per_s"] > 0 and tp["ms_per_iter"] > 0 and tp["peak_mem_mb"] > 0
    assert tp["mfu"] is None and tp["target_met"] is None  # no peak FLOP/s for a CPU

    gen = parts["generation"]
    assert gen["preset"] == "tiny" and gen["new_tokens"] == 16 and gen["eager_tokens_per_s"] > 0
    assert gen["compiled_tokens_per_s"] is None and gen["compiled_status"].startswith("skipped: dry run")

    scale = parts["scale"]
    assert scale["preset"] == "tiny" and scale["params"] > 0 and scale["block_size"] == 32
    for mode in ("plain", "checkpointed", "fsdp"):
        step = scale[mode]
        assert set(step) == STEP_KEYS and step["ok"] is True and math.isfinite(step["loss"]), mode
        assert step["mem_mb"] is None  # peak memory is a CUDA figure
    # Same seed, same batch: the three ways compute the same first loss.
    assert scale["plain"]["loss"] == pytest.approx(scale["checkpointed"]["loss"], abs=1e-4)
    assert scale["plain"]["loss"] == pytest.approx(scale["fsdp"]["loss"], abs=1e-4)

    table = (out / "gpu_suite.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows if row.split("|")[1].strip()][1:] == PARTS
    assert r.stdout.rstrip().endswith(table.rstrip())  # the table is printed last
    assert "=== parity_fp16:" in (out / "gpu_suite.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the whole GPU suite")
def test_without_cuda_every_part_is_skipped_with_the_reason(tmp_path):
    r = run_script([SUITE, "--out", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    check_keys(report)
    assert report["summary"] == {"pass": 0, "fail": 0, "skipped": 7}
    assert report["parts"]["wheels"]["why"] == "no --wheels DIR given"
    for name in PARTS[1:]:
        assert report["parts"][name]["why"].startswith("no CUDA GPU here"), name
    assert "| scale | skipped: no CUDA GPU here" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--dry-run"], "--out DIR is required"),
    (["--out", "x", "--wheels", "no/such/dir"], "--wheels no/such/dir: no such directory"),
    (["--out", "x", "--data", "no/such.txt"], "--data no/such.txt: no such file"),
    (["--out", "x", "--parts", "pytest,speed"], "--parts: unknown ['speed']"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    r = run_script([SUITE, *args], timeout=30)
    assert r.returncode == 2
    assert message in r.stderr.strip().splitlines()[-1]

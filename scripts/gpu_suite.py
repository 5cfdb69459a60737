"""The GPU proof in one command: every GPU check and figure of the project, run and recorded in
under 8 minutes on one CUDA GPU, carried wheels installed first (README.md, "GPU", says what each
part runs and measures).

    python scripts/gpu_suite.py --wheels .whl --data .carry/tinyshakespeare.txt --out results/
    python scripts/gpu_suite.py --dry-run --out /tmp/gpu_suite     # the same code on CPU, tiny sizes, < 2 min

The PARTS run in order within --budget, each in processes of its own under a time cap (unused time
passes on) and reported as pass, fail or skipped with the reason; a failing part never stops the
ones after it. Writes <out>/gpu_suite.json (after each part), gpu_suite.md (printed last) and
gpu_suite.log. Exit status 1 when a part failed, 2 for bad arguments, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("wheels", "pytest", "parity", "scale", "time_to_loss", "throughput", "generation")  # run in this order
# Per mode (False: one CUDA GPU, True: --dry-run on CPU): the budget, what each later part keeps, the caps.
BUDGET_S, MIN_PART_S = {False: 460.0, True: 110.0}, {False: 20.0, True: 5.0}
CAPS = {False: dict(wheels=60, pytest=120, parity=90, time_to_loss=180, throughput=150, generation=150, scale=90),
        True: dict(wheels=30, pytest=40, parity=40, time_to_loss=30, throughput=25, generation=20, scale=25)}


def run(cmd: list[str], env: dict, cap: float, log: Path) -> tuple[int | None, str]:
    """Run cmd from the repository root in its own process group: (exit status, None past the cap;
    its output). Command and output go to the log."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace", start_new_session=True)
    try:
        out, rc = p.communicate(timeout=cap)[0], p.returncode
    except subprocess.TimeoutExpired:  # the whole group: pytest's own children too
        os.killpg(p.pid, signal.SIGTERM)
        try:
            out = p.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out = p.communicate()[0]
        rc = None
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n=== {shlex.join(cmd)}\n{out[-200_000:]}=== rc {rc}\n")
    return rc, out


def tail(out: str, n: int = 300) -> str:
    return " ".join(out[-n:].split())


def part_wheels(args: argparse.Namespace, env: dict, r: dict, cap: float, log: Path, work: Path) -> None:
    wheels = sorted(args.wheels.glob("*.whl"))
    if not wheels:
        return r.update(status="fail", why=f"no .whl files in {args.wheels}; fetch them with scripts/offline_wheels.sh")
    site = Path(r["site"])
    rc, out = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], env, cap, log)
    if rc != 0:
        return r.update(status="fail", why=f"pip install exited with status {rc}: {tail(out)}")
    r.update(installed=[w.name for w in wheels], modules=sorted(
        p.stem for p in site.iterdir() if not p.name.endswith((".dist-info", "__pycache__"))
        and p.name != "bin" and (p.is_dir() or p.suffix == ".py")))
    rc, out = run([sys.executable, "-c", "; ".join(f"import {m}" for m in r["modules"])], env, cap, log)
    if rc != 0:
        return r.update(status="fail", why=f"importing {', '.join(r['modules'])} from the site failed: {tail(out)}")
    r.update(status="pass", why=f"{len(wheels)} wheels installed and importable")


def part_pytest(args: argparse.Namespace, env: dict, r: dict, cap: float, log: Path, work: Path) -> None:
    xml = work / "pytest.xml"
    rc, out = run([sys.executable, "-m", "pytest", "-m", "gpu and not figures", "tests", "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", f"--junitxml={xml}", "-o", "junit_family=xunit2"], env, cap, log)
    if not xml.exists():
        return r.update(status="fail", why=f"pytest wrote no report (status {rc}): {tail(out)}")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    r.update(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
             errors=n["errors"], skipped=n["skipped"], failures=[
                 f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                 if c.find("failure") is not None or c.find("error") is not None])
    if r["failed"] or r["errors"] or rc != 0:
        r.update(status="fail", why=f"{r['failed']} failed, {r['errors']} errors: {', '.join(r['failures'][:5]) or tail(out)}")
    elif r["passed"] + r["skipped"] == 0:
        r.update(status="fail", why="no gpu-marked test was collected")
    elif args.dry_run:
        r.update(status="pass", why=f"{r['skipped']} gpu tests collected, skipped without CUDA")
    elif r["passed"] == 0:
        r.update(status="fail", why=f"no GPU test ran ({r['skipped']} skipped): {tail(out)}")
    else:
        r.update(status="pass", why=f"{r['passed']} passed, {r['skipped']} skipped")


def part_figures(name: str, args: argparse.Namespace, env: dict, r: dict, cap: float, log: Path, work: Path) -> list:
    """One test of tests/test_gpu_figures.py in a pytest process of its own; its JSON becomes the part
    and its table rows are returned."""
    out_dir = work / "figures"
    settings = {"out": str(out_dir), "dry_run": args.dry_run, "data": str(args.data) if args.data else None,
                "cap_s": cap, "parity_tol": args.parity_tol, "ttl_target": args.ttl_target,
                "ttl_overrides": args.ttl_overrides}
    rc, out = run([sys.executable, "-m", "pytest", f"tests/test_gpu_figures.py::test_{name}", "-q", "-p",
                   "no:cacheprovider", "-o", "addopts="], {**env, "CAUSALGPT_GPU_SUITE": json.dumps(settings)},
                  cap + 15, log)
    if (part_log := out_dir / f"{name}.log").exists():
        with log.open("a", encoding="utf-8") as f:
            f.write(part_log.read_text(encoding="utf-8", errors="replace"))
    if not (record := out_dir / f"{name}.json").exists():
        r.update(status="fail", why=f"the {name} test wrote no figures (status {rc}): {tail(out)}")
        return []
    got = json.loads(record.read_text())
    r.update(got["figures"], status=got["status"], why=got["why"])
    return got["rows"]


def markdown(report: dict, rows: dict[str, list]) -> str:
    env = report["env"]
    lines = [f"GPU suite{' (dry run)' if report['dry_run'] else ''}: {env.get('device_name')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, Python {env.get('python')}, commit {env.get('git_commit') or '-'}, "
             f"{report['started']}, {report['wall_s']:.0f} s in all", "",
             "| part | status | figure | value | target |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        status = p["status"] if p["status"] == "pass" else f"{p['status']}: {p['why']}"
        for i, (figure, value, target) in enumerate(rows.get(name) or [["-", "-", ""]]):
            cells = [name if i == 0 else "", status if i == 0 else "", figure, value, target]
            lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out DIR is required")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels {args.wheels}: no such directory")
    if args.data is None and (ROOT / ".carry" / "tinyshakespeare.txt").is_file() and not args.dry_run:
        args.data = ROOT / ".carry" / "tinyshakespeare.txt"
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    args.data = args.data and args.data.resolve()
    if unknown := set(args.parts.split(",")) - set(PARTS):
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget, min_part = args.budget or BUDGET_S[args.dry_run], MIN_PART_S[args.dry_run]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    path = [str(work / "site") if args.wheels else "", str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "CAUSALGPT_CACHE": str(work / "cache"),
           "CAUSALGPT_RUNS": str(work / "runs"), "PYTHONPATH": os.pathsep.join(x for x in path if x),
           **({"OMP_NUM_THREADS": "1"} if args.dry_run else {})}
    log = args.out / "gpu_suite.log"
    log.write_text("")
    start, deadline = time.monotonic(), time.monotonic() + budget
    report = {"suite": "causalgpt gpu_suite", "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "wall_s": 0.0, "budget_s": budget, "command": shlex.join([sys.executable, *sys.argv]),
              "work_dir": str(work) if args.keep else None, "env": {}, "parts": {}, "summary": {}}
    rows: dict[str, list] = {}
    # The figures of a part that does not run; those of tests/test_gpu_figures.py come from the env worker.
    empty, info = {"wheels": {"installed": [], "modules": [], "site": str(work / "site")},
                   "pytest": {"passed": None, "failed": None, "skipped": None, "errors": None, "failures": []}}, {}
    for i, name in enumerate(PARTS):
        r = report["parts"][name] = {"status": "skipped", "why": "", "seconds": 0.0, "cap_s": 0.0, **empty.get(name, {})}
        if name == "pytest":  # after the wheels: what the suite's processes import, and the device
            rc, out = run([sys.executable, "tests/gpu_workers.py", "env", "{}"], env, 120, log)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            info = json.loads(lines[-1]) if rc == 0 and lines else {"error": tail(out)}
            empty.update(info.pop("figures", {}))
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
            report["env"] = {**info, "git_commit": commit.stdout.strip() or None}
        # Each part after this one keeps min_part of the budget; unused time passes on to the next.
        cap = min(CAPS[args.dry_run][name], deadline - time.monotonic() - min_part * (len(PARTS) - 1 - i))
        r["cap_s"] = round(max(cap, 0.0), 1)
        if name not in args.parts.split(","):
            r["why"] = "not selected (--parts)"
        elif name != "wheels" and "error" in info:
            r["why"] = f"torch could not start: {info['error']}"
        elif name != "wheels" and not args.dry_run and not info.get("cuda_available"):
            r["why"] = "no CUDA GPU here (torch.cuda.is_available() is False); --dry-run runs the CPU path"
        elif name != "wheels" and not info.get("hydra"):
            r["why"] = "hydra-core is not importable: fetch it with scripts/offline_wheels.sh, pass --wheels .whl"
        elif name == "wheels" and args.wheels is None:
            r["why"] = "no --wheels DIR given"
        elif cap < min_part:
            r["why"] = f"out of time: {max(cap, 0.0):.0f} s left of the {budget:.0f} s budget"
        else:
            t0 = time.monotonic()
            if name in ("wheels", "pytest"):
                (part_wheels if name == "wheels" else part_pytest)(args, env, r, cap, log, work)
            else:
                rows[name] = part_figures(name, args, env, r, cap, log, work)
            r["seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu_suite] {name}: {r['status']}{': ' + r['why'] if r['why'] else ''} ({r['seconds']} s)",
              file=sys.stderr, flush=True)
        report["wall_s"] = round(time.monotonic() - start, 1)
        report["summary"] = {k: sum(p["status"] == k for p in report["parts"].values()) for k in ("pass", "fail", "skipped")}
        (args.out / "gpu_suite.json").write_text(json.dumps(report, indent=1) + "\n")  # each part, in case of a kill
    tests = report["parts"]["pytest"]
    rows["wheels"] = [["wheels installed", str(len(report["parts"]["wheels"]["installed"])), ""]]
    rows["pytest"] = [["passed / failed / errors / skipped", " / ".join(
        "-" if tests[k] is None else str(tests[k]) for k in ("passed", "failed", "errors", "skipped")), "none fail"]]
    table = markdown(report, rows)
    (args.out / "gpu_suite.md").write_text(table)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out / 'gpu_suite.json'}, gpu_suite.md, gpu_suite.log\n")
    print(table, end="")
    return 1 if report["summary"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())

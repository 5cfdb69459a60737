"""Start-up pays only for what a run uses, and the end of a process for nothing: neither sample.py (eager)
nor a training run with logger=none on a local file imports torch._dynamo (the compiler: ~1 s on 2 cores),
transformers, datasets or wandb; cli.run_and_exit ends an entry point with its status, its output and its
log files complete, and no interpreter teardown."""

from __future__ import annotations

import json

import pytest
from conftest import run_script
from test_sample_generate import train_checkpoint

HEAVY = ("torch._dynamo", "transformers", "datasets", "wandb")
# Runs an entry point as `python <script> <args>` would, then prints which HEAVY modules it imported.
PROBE = ("import json, os, runpy, sys; sys.argv = sys.argv[1:]; code = 0; os._exit = sys.exit\n"
         "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code or 0\n"
         f"print(json.dumps({{'code': code, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))")


def probe(*args: str) -> dict:
    r = run_script(["-c", PROBE, *args], timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_sample_imports_no_compiler_and_no_optional_package(tmp_path):
    ckpt = train_checkpoint(tmp_path / "last.pt", steps=2)
    result = probe("sample.py", f"ckpt={ckpt}", "prompt=the", "max_new_tokens=4")
    assert result == {"code": 0, "loaded": []}


def test_training_on_a_local_file_imports_no_optional_package(tiny_overrides):
    result = probe("train.py", *tiny_overrides, "max_iters=2", "eval_interval=2")
    assert result == {"code": 0, "loaded": []}


# main() for cli.run_and_exit: a log record and a print that no newline flushes, then the exit given.
EXITS = ("import logging, sys, cli\n"
         "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
         "def main():\n    logging.info('kept')\n    print('out', end='')\n    {end}\n"
         "cli.run_and_exit(main)")


@pytest.mark.parametrize(("end", "status", "stderr"), [
    ("return", 0, ""), ("sys.exit(3)", 3, ""), ("sys.exit(None)", 0, ""), ("sys.exit('no such file')", 1, "no such file\n"),
])
def test_run_and_exit_keeps_the_status_the_output_and_the_log(tmp_path, end, status, stderr):
    log_file = tmp_path / "run.log"
    r = run_script(["-c", EXITS.format(end=end), str(log_file)])
    assert (r.returncode, r.stdout, r.stderr) == (status, "out", stderr)
    assert log_file.read_text() == "INFO:root:kept\n"

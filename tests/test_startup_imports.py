"""Start-up pays only for what a run uses: sample.py (eager) imports neither torch._dynamo nor
transformers, datasets or wandb, and a training run with logger=none on a local file imports none of
the last three. (Training cannot skip torch._dynamo: torch.optim's Optimizer.step imports it.)"""

from __future__ import annotations

import json

from conftest import run_script
from test_sample_generate import train_checkpoint

HEAVY = ("torch._dynamo", "transformers", "datasets", "wandb")
# Runs an entry point as `python <script> <args>` would, then prints which HEAVY modules it imported.
PROBE = ("import json, runpy, sys; sys.argv = sys.argv[1:]; code = 0\n"
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
    assert result["code"] == 0 and result["loaded"] == ["torch._dynamo"]

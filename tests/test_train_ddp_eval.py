"""Under torchrun a rank whose share of the eval batches is empty still joins every all-reduce of the
evaluation: with eval_iters=1 and two ranks, rank 1 scores nothing and the run must still finish."""

from __future__ import annotations

import json

import pytest
from conftest import run_script


@pytest.mark.slow
def test_ddp_eval_with_fewer_batches_than_ranks(tiny_overrides, tmp_path):
    run_dir = tmp_path / "ddp"
    args = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    r = run_script(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", *args, "max_iters=2",
                    "eval_interval=1", "eval_iters=1", "sample_tokens=0", f"hydra.run.dir={run_dir}"], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [rec["val/loss"] for rec in records if "val/loss" in rec]
    assert len(val) == 3 and all(v > 0 for v in val)  # steps 0, 1 and 2, each scored on rank 0's batch

"""DDP and FSDP2 under torchrun on CPU (gloo), compared with one process.

The comparison is exact by construction, not by luck: micro-batch g = rank * accum + micro of each
step is drawn from data stream g of world_size * accum streams, so two processes with one micro-batch
each see the very windows that one process with gradient_accumulation_steps=2 sees. Only the order
of floating-point sums differs (all-reduce vs accumulation), hence a tight tolerance; a run on other
windows with the same global batch size lands far outside it, which shows the tolerance means something.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_script

import train
from engine.formats.checkpoint import load_checkpoint, model_from_checkpoint

STEPS = 6


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


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
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(recipe, tmp_path):
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

    # An FSDP checkpoint is a plain, full one: it loads into one process, for sampling or to resume.
    fsdp_ckpt = load_checkpoint(tmp_path / "fsdp")
    assert fsdp_ckpt["model"]["wte.weight"].shape[0] == fsdp_ckpt["model_config"]["vocab_size"]
    model_from_checkpoint(fsdp_ckpt)
    resumed = train.train(compose_train([*recipe, "gradient_accumulation_steps=2", f"max_iters={STEPS + 2}",
                                         f"resume={tmp_path / 'fsdp'}", f"out_dir={tmp_path / 'resumed'}"]))
    assert resumed["step"] == STEPS + 2

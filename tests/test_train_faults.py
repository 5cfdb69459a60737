"""What kills, crashes and full disks leave behind, and the way out of each (RELIABILITY.md):

- checkpoint history: keep_last step-numbered checkpoints; resume=auto falls back to the newest that
  loads and says which; a damaged history is one line; leftovers of killed saves are removed at start;
- a full disk during a save: one line naming the file, the previous checkpoint intact, resume works;
- resuming on another runtime: every precision pair CPU runs (fp32, bf16, fp16), a GPU checkpoint
  on CPU; a warning names what was reset, and an unchanged fp16 resume stays bit-identical;
- exports: a killed overwrite, a cut-short weights file, a corrupt config.json are one line each;
- scripts/kill_resume.py: random SIGKILLs, resumes, the same final weights as an uninterrupted run.
The torchrun faults (a rank failing in a save, the set-up, a step; a hang) are in test_train_distributed.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_train, names_besides_locks, run_script

import train
from engine.checkpoint import (
    CheckpointError,
    keep_history,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
)
from engine.formats.pretrained import INCOMPLETE_MARKER, load_pretrained, save_export, write_dir


def _model_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- checkpoint history ---------------------------------------------------------------------------------
def test_keep_history_links_the_newest_and_prunes_the_rest(tmp_path):
    def saved(step: int) -> Path:
        return save_checkpoint(tmp_path / "last.pt", {"model": {}, "model_config": {}, "step": step})

    for step in (5, 10, 15, 20):
        keep_history(saved(step), step, keep_last=2)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [20, 15]
    assert os.path.samefile(tmp_path / "ckpt-000020.pt", tmp_path / "last.pt")  # no second copy on disk
    assert not os.path.samefile(tmp_path / "ckpt-000015.pt", tmp_path / "last.pt")
    # Resumed from step 15 and saving step 16: step 20 belongs to the abandoned run and goes.
    keep_history(saved(16), 16, keep_last=3)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [16, 15]
    keep_history(saved(17), 17, keep_last=1)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [17]


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tiny_overrides, tmp_path, caplog):
    run = tmp_path / "run"
    recipe = [*tiny_overrides, "ckpt_interval=5", "keep_last=2", "model.dropout=0.1"]
    train.train(compose_train(recipe))
    assert [s for s, _ in step_checkpoints(run)] == [20, 15]
    want = torch.load(run / "last.pt", weights_only=True)

    # Bytes changed in place hit both names of the newest checkpoint (last.pt is a hard link to
    # ckpt-000020.pt); killed saves left temporary files behind.
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    leftovers = [run / ".last.pt.tmp-0badc0de", run / ".ckpt-000020.pt.tmp-link", run / ".best.pt.a1b2c3d4.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO):
        resumed = train.train(compose_train([*recipe, "resume=auto"]))
    assert resumed["step"] == 20
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"skipping {last}, it does not load: checkpoint {last} is corrupt" in m for m in messages)
    assert any(f"using {run / 'ckpt-000015.pt'} (step 15), the newest checkpoint of {run} that loads" in m
               for m in messages)
    assert any("removed 3 temporary file(s) of interrupted saves" in m for m in messages)
    assert not any(p.exists() for p in leftovers)
    # Steps 16-20 replayed from step 15: the same weights as before the damage, bit for bit.
    got = torch.load(run / "last.pt", weights_only=True)
    assert _model_equal(got["model"], want["model"])

    for path in [last, *(p for _, p in step_checkpoints(run)), run / "best.pt"]:  # all damaged: one line
        path.write_bytes(b"junk")
    (run / "junk.pt").write_bytes(b"")  # not a checkpoint's name: not a candidate
    with pytest.raises(CheckpointError, match=rf"^none of last.pt, ckpt-000015.pt, best.pt in {run} loads "
                                              rf"\(checkpoint {last} is corrupt"):
        train.train(compose_train([*recipe, "resume=auto"]))


def test_a_full_disk_during_a_save_ends_the_run_and_keeps_the_last_checkpoint(tiny_overrides, tmp_path,
                                                                                monkeypatch):
    run = tmp_path / "run"
    recipe = [*tiny_overrides, "ckpt_interval=5", "eval_interval=5"]
    real_save = torch.save

    def disk_full_at_step_10(obj, f, **kwargs):
        if isinstance(obj, dict) and obj.get("step", 0) >= 10:
            f.write(b"\0" * 4096)  # part of it got written before the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_10)
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint {run}/(best|last).pt: No space left on "
                                              r"device \(ENOSPC\); the previous (best|last).pt, if any, is intact"):
        train.train(compose_train(recipe))
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["step"] == 5
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    assert train.train(compose_train([*recipe, "resume=auto"]))["step"] == 20  # space freed: it goes on


# ---- resuming on another runtime ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus, data_cache) -> dict[str, Path]:
    """Run directories of 4 steps trained with fp32, bf16 and fp16 (4 more steps make them 8)."""
    base = tmp_path_factory.mktemp("precision")
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        out[precision] = base / precision
        train.train(compose_train([*_small(corpus, data_cache), f"precision={precision}", "max_iters=4",
                                   f"out_dir={out[precision]}"]))
    return out


def _small(corpus: Path, data_cache: Path) -> list[str]:
    return ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "batch_size=4",
            "data=files", f"data.path={corpus}", f"data.cache_dir={data_cache}", "logger=none", "device=cpu",
            "eval_interval=4", "eval_iters=1", "log_interval=4", "sample_tokens=0", "final_eval_iters=0",
            "threads=1", "model.dropout=0.1"]


@pytest.mark.parametrize(("was", "now", "said"), [
    ("fp32", "fp16", "trained with precision=fp32, this run uses fp16: its GradScaler starts fresh (scale 65536)"),
    ("bf16", "fp16", "trained with precision=bf16, this run uses fp16: its GradScaler starts fresh (scale 65536)"),
    ("fp16", "fp32", "trained with precision=fp16, this run uses fp32: its GradScaler state (scale"),
    ("fp16", "bf16", "trained with precision=fp16, this run uses bf16: its GradScaler state (scale"),
    ("fp32", "bf16", "precision changes from fp32 to bf16"),
    ("bf16", "fp32", "precision changes from bf16 to fp32"),
])
def test_a_precision_change_on_resume_works_and_says_what_was_reset(sources, corpus, data_cache, tmp_path,
                                                                     caplog, was, now, said):
    with caplog.at_level(logging.WARNING):
        result = train.train(compose_train([*_small(corpus, data_cache), f"precision={now}", "max_iters=8",
                                            f"resume={sources[was]}", f"out_dir={tmp_path / 'resumed'}"]))
    assert result["step"] == 8
    warning = next(r.getMessage() for r in caplog.records if "resuming on another runtime" in r.getMessage())
    assert said in warning and "cannot be bit-identical to an uninterrupted one" in warning
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert ckpt["precision"] == now and bool(ckpt["scaler"]) == (now == "fp16")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_an_unchanged_fp16_resume_restores_the_scaler_and_is_bit_identical(sources, corpus, data_cache, tmp_path,
                                                                           caplog):
    fp16 = [*_small(corpus, data_cache), "precision=fp16", "max_iters=8"]
    train.train(compose_train([*fp16, f"out_dir={tmp_path / 'ref'}"]))
    with caplog.at_level(logging.WARNING):
        train.train(compose_train([*fp16, f"resume={sources['fp16']}", f"out_dir={tmp_path / 'resumed'}"]))
    assert not any("another runtime" in r.getMessage() for r in caplog.records)
    want = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert _model_equal(got["model"], want["model"]) and got["scaler"] == want["scaler"]


def test_a_gpu_checkpoint_resumes_on_cpu_without_its_cuda_rng_states(sources, corpus, data_cache, tmp_path,
                                                                      caplog):
    ckpt = load_checkpoint(sources["fp16"] / "last.pt")
    for state in ckpt["rng"]:
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # what get_rng_state_all() gives on one GPU
    ckpt["device"] = "cuda"
    save_checkpoint(tmp_path / "gpu" / "last.pt", ckpt)
    with caplog.at_level(logging.WARNING):
        result = train.train(compose_train([*_small(corpus, data_cache), "precision=fp16", "max_iters=8",
                                            f"resume={tmp_path / 'gpu'}", f"out_dir={tmp_path / 'cpu'}"]))
    assert result["step"] == 8
    assert any("the checkpoint was written on cuda, this run is on cpu: its CUDA RNG states are not used"
               in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
def test_a_cpu_checkpoint_resumes_on_the_gpu_and_back(sources, corpus, data_cache, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        train.train(compose_train([*_small(corpus, data_cache), "device=cuda", "precision=fp16", "max_iters=8",
                                   f"resume={sources['fp32']}", f"out_dir={tmp_path / 'gpu'}"]))
        result = train.train(compose_train([*_small(corpus, data_cache), "max_iters=12",
                                            f"resume={tmp_path / 'gpu'}", f"out_dir={tmp_path / 'cpu'}"]))
    assert result["step"] == 12
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "written on cpu, this run is on cuda" in messages and "GradScaler starts fresh" in messages
    assert "written on cuda, this run is on cpu: its CUDA RNG states are not used" in messages


# ---- exports --------------------------------------------------------------------------------------------
def test_a_killed_or_damaged_export_is_one_line_and_a_new_export_repairs_it(sources, tmp_path, monkeypatch):
    ckpt = load_pretrained(sources["fp32"])
    out = tmp_path / "export"
    write_dir(out, lambda tmp: save_export(ckpt, tmp))
    (out / "README.md").write_text("mine")

    # Killed while overwriting: the first file replaced, then the process is gone.
    real_replace, replaced = os.replace, []

    def killed_after_one(src, dst):
        if Path(dst).parent == out and Path(dst).name != INCOMPLETE_MARKER:
            if replaced:
                raise KeyboardInterrupt("killed")
            replaced.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        write_dir(out, lambda tmp: save_export(ckpt, tmp))
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=rf"^{out} was being overwritten when its writer stopped "
                                              rf"\({INCOMPLETE_MARKER} is still there\).*export again"):
        load_pretrained(out)
    write_dir(out, lambda tmp: save_export(ckpt, tmp))  # exporting again repairs it, keeps the user's file
    assert _model_equal(load_pretrained(out)["model"], ckpt["model"]) and (out / "README.md").exists()
    assert names_besides_locks(tmp_path) == ["export"]  # no temporary directory; a lock held by no one

    weights = out / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=f"{weights} is not a readable safetensors file"):
        load_pretrained(out)
    weights.write_bytes(good)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(CheckpointError, match=f"{out / 'config.json'} is not a JSON object .*export again"):
        load_pretrained(out)
    config["model_config"]["n_embd"] = 64  # weights that do not fit the config beside them
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{weights}: its weights do not match its model_config"):
        load_pretrained(out)


# ---- random SIGKILLs and resumes --------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_resume_script_ends_bit_identical(corpus, tmp_path):
    tiny = ["data=files", f"data.path={corpus}", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
            "model.block_size=16", "batch_size=4", "max_iters=24", "eval_interval=8"]
    r = run_script(["scripts/kill_resume.py", "--kills", "2", "--rounds", "1", "--seed", "3",
                    "--work", str(tmp_path), "--", *tiny], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "final state bit-identical to the reference" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kills"] == 2 and summary["rounds"][0]["identical"]
    shutil.rmtree(tmp_path, ignore_errors=True)

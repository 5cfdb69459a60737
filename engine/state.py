"""What a checkpoint holds beyond the weights, and how the loop gets it back.

RNG states are converted to plain lists, ints and tensors so that the checkpoint loads with
`torch.load(weights_only=True)`. The payload keys are those documented in
engine/formats/checkpoint.py, plus "loop" (bad steps, last eval step) and "world_size".

- saving: `save_state` writes last.pt/best.pt atomically on rank 0 and, for last.pt, keeps a history
  of `keep_last` step-numbered checkpoints (`ckpt-000250.pt`): the newest is a hard link to last.pt,
  so it costs neither a second write nor disk space, and an older one is a whole other file. A
  failed save (disk full) raises on every rank at once, with one line naming the file.
- resuming: `find_resume` decides which file `resume=` means; with a run directory (resume=auto) it
  takes last.pt, else the newest step-numbered checkpoint that loads, saying which and why.
- changes on resume: `restore_runtime` puts back the GradScaler and RNG states, mapped onto this
  run's precision (fp16 <-> bf16/fp32), device (CPU <-> GPU) and world size, with a warning naming
  what had to be reset. Only a resume that changes none of them is bit-identical.
- the checks that a resumed or fine-tuned run fits its data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.atomic import fsync_dir
from engine.formats.checkpoint import (
    CheckpointError,
    link_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_checkpoints,
    step_name,
)
from model import ModelConfig

from .parallel import full_state, gather_objects, raise_together
from .runtime import Runtime

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says why and what to try."""


@dataclass
class LoopState:
    """The training loop's own counters, saved in every checkpoint."""
    step: int = 0  # optimisation steps done
    tokens_seen: int = 0  # training tokens consumed, all ranks together
    best_val: float = math.inf  # best val loss at an eval so far
    bad_steps: int = 0  # steps skipped for a NaN/inf loss or gradient
    last_eval_step: int = -1  # the step of the latest eval (a resumed run does not redo it)

    def to_payload(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "loop": {"bad_steps": self.bad_steps, "last_eval_step": self.last_eval_step}}

    @classmethod
    def from_payload(cls, ckpt: dict) -> LoopState:
        loop = ckpt.get("loop", {})
        return cls(int(ckpt["step"]), int(ckpt.get("tokens_seen", 0)), float(ckpt.get("best_val", math.inf)),
                   int(loop.get("bad_steps", 0)), int(loop.get("last_eval_step", -1)))


# ---- saving --------------------------------------------------------------------------------------------
def save_state(path: Path, rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loop: LoopState, loader_state: dict, static: dict,
               wandb_id: str | None, keep_last: int = 0) -> None:
    """Write a full training checkpoint (call on every rank: under FSDP gathering the weights is a
    collective; every rank's RNG state is kept). Only rank 0 writes, atomically; keep_last > 0 also
    keeps that many step-numbered checkpoints beside path. When the write fails every rank raises
    (rank 0 the CheckpointError naming the file), so none waits for a save that will not come."""
    model_sd, optim_sd = full_state(model, optimizer)
    rngs = gather_objects(rng_state(), rt)
    error = None
    if rt.is_main:
        try:
            save_checkpoint(path, {**static, **loop.to_payload(), "model": model_sd, "optimizer": optim_sd,
                                   "scaler": scaler.state_dict(), "loader_state": loader_state, "rng": rngs,
                                   "world_size": rt.world_size, "precision": rt.precision,
                                   "device": rt.device_type, "wandb_run_id": wandb_id})
            if keep_last:
                keep_history(path, loop.step, keep_last)
        except Exception as e:  # raised again below, on this rank and (as RankFailed) on the others
            error = e
    raise_together(rt, error)  # also the barrier: nobody runs ahead (or exits) before the file is complete


def keep_history(last: Path, step: int, keep_last: int) -> None:
    """Name the checkpoint just written to `last` also ckpt-<step>.pt (a hard link) and delete the
    step-numbered checkpoints beyond the newest keep_last. Those of later steps than this one belong
    to a run that was resumed from an earlier checkpoint: they are deleted too."""
    link_checkpoint(last, last.parent / step_name(step))
    older = [p for s, p in step_checkpoints(last.parent) if s <= step]  # newest first
    for p in older[keep_last:]:
        p.unlink(missing_ok=True)
    for s, p in step_checkpoints(last.parent):
        if s > step:
            log.info("removing %s: it is from before this run was resumed at an earlier step", p)
            p.unlink(missing_ok=True)
    fsync_dir(last.parent)


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as plain data."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Put back the generators of rng_state(); CUDA's only where this machine has the same GPUs."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- which checkpoint to resume from -----------------------------------------------------------------
def find_resume(resume: str | None, out_dir: Path, rt: Runtime) -> tuple[Path, dict] | None:
    """The checkpoint `resume=` means, loaded: None (start fresh); `auto` (out_dir's last.pt, else its
    newest ckpt-<step>.pt that loads; nothing there: start fresh); a run directory (the same); or a
    file. Rank 0 chooses and the others load its choice, so every rank resumes from the same file;
    when rank 0 finds nothing usable, every rank raises its CheckpointError."""
    chosen, error = None, None
    if rt.is_main:
        try:
            chosen = choose_checkpoint(resume, out_dir)
        except Exception as e:
            error = e
    raise_together(rt, error)
    if not rt.distributed:
        return chosen
    path = gather_objects(None if chosen is None else str(chosen[0]), rt)[0]
    if path is None:
        return None
    ckpt = chosen[1] if chosen is not None else None
    error = None
    if not rt.is_main:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, Path(path))
        except Exception as e:
            error = e
    raise_together(rt, error)
    return Path(path), ckpt


def choose_checkpoint(resume: str | None, out_dir: Path) -> tuple[Path, dict] | None:
    """find_resume's choice on one process: (path, checkpoint) or None."""
    if resume is None or str(resume).lower() in ("", "none", "null", "false", "never"):
        return None
    auto = str(resume).lower() == "auto"
    folder = out_dir if auto else Path(resume).expanduser()
    if not auto and folder.is_file():
        ckpt = load_checkpoint(folder)
        check_resumable(ckpt, folder)
        return folder, ckpt
    if not auto and not folder.is_dir():
        raise CheckpointError(f"resume={resume}: checkpoint {folder} does not exist")
    candidates = _candidates(folder)
    if not candidates and not auto and (folder / "checkpoints").is_dir():
        candidates = _candidates(folder / "checkpoints")
    if not candidates:
        if auto:
            log.warning("resume=auto: no %s yet, starting fresh (to continue an earlier run, pass "
                        "out_dir=<its run directory> or resume=<its last.pt>)", out_dir / "last.pt")
            return None
        raise CheckpointError(f"resume={resume}: no last.pt or ckpt-<step>.pt in that directory; "
                              "pass a .pt file instead")
    errors: list[CheckpointError] = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
        except CheckpointError as e:
            if len(candidates) == 1:
                raise
            log.warning("resume: skipping %s, it does not load: %s", path, e)
            errors.append(e)
            continue
        if errors:
            log.warning("resume: continuing from %s (step %d), the newest checkpoint that loads", path,
                        ckpt["step"])
        return path, ckpt
    raise CheckpointError(f"resume={resume}: none of {', '.join(p.name for p in candidates)} in {folder} "
                          f"loads ({errors[0]}); pass resume=<a checkpoint file> that does, or start fresh "
                          "in another out_dir")


def _candidates(folder: Path) -> list[Path]:
    """last.pt, then the step-numbered checkpoints newest first; a name for a file already listed
    (the hard link between last.pt and the newest step file) is left out."""
    seen, out = set(), []
    last = [folder / "last.pt"] if (folder / "last.pt").is_file() else []
    names = last + [p for _, p in step_checkpoints(folder)]
    for path in names:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(path)
    return out


def check_resumable(ckpt: dict, path: Path) -> None:
    """A file that has weights but no training state (e.g. an exported model) cannot be resumed."""
    missing = [k for k in ("step", "optimizer", "loader_state", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no training state ({', '.join(missing)} missing); "
                              "use init_from= to start from its weights instead of resume=")


# ---- putting the state back on another runtime -------------------------------------------------------
def grad_scaler(rt: Runtime, distributed: str) -> torch.amp.GradScaler:
    """The loss scaler: torch's GradScaler, enabled for fp16 only, under FSDP2 too.

    Under FSDP2 each rank holds only its shards of the gradients (DTensors), yet the inf check is
    global: DTensor runs GradScaler's check-and-unscale op on the local shard and then all-reduces
    its inf flag (max), so every rank skips the same steps (tests/test_train_distributed.py injects
    an inf on one rank). FSDP1's ShardedGradScaler is not used: on FSDP2 it all-reduces that flag a
    second time, as a sum, and fused AdamW skips a step only when the flag is exactly 1, so an
    overflow on two ranks was applied and turned the weights into NaN (measured, torch 2.13)."""
    return torch.amp.GradScaler(rt.device_type, enabled=rt.precision == "fp16")


def restore_runtime(ckpt: dict, rt: Runtime, scaler: torch.amp.GradScaler, seed: int, n_streams: int) -> None:
    """Put back the GradScaler and this rank's RNG states (call last in the set-up: after it nothing
    may draw random numbers). What a change of precision, device or world size (or of the number of
    data streams, world size x gradient_accumulation_steps) resets is said once, by rank 0."""
    notes = []
    was = ckpt.get("precision") or ("fp16" if ckpt.get("scaler") else None)
    saved_scaler = ckpt.get("scaler") or {}
    if scaler.is_enabled() and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    elif scaler.is_enabled():
        notes.append(f"the checkpoint was trained with precision={was or 'bf16 or fp32'}, this run uses "
                     f"fp16: its GradScaler starts fresh (scale {scaler.get_scale():g})")
    elif saved_scaler:
        notes.append(f"the checkpoint was trained with precision=fp16, this run uses {rt.precision}: its "
                     f"GradScaler state (scale {saved_scaler.get('scale')}) is dropped, none is needed")
    elif was and was != rt.precision:
        notes.append(f"precision changes from {was} to {rt.precision}")
    device = ckpt.get("device")
    if device and device != rt.device_type:
        notes.append(f"the checkpoint was written on {device}, this run is on {rt.device_type}"
                     + (": its CUDA RNG states are not used" if device == "cuda" else ""))

    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if rt.rank < len(rngs):
        set_rng_state(rngs[rt.rank])
    else:
        _seed_all(int(np.random.SeedSequence([seed, int(ckpt["step"]), rt.rank]).generate_state(1)[0]))
    if torch.cuda.is_available() and rt.device_type == "cuda" and (
            rt.rank >= len(rngs) or len(rngs[rt.rank]["cuda"]) != torch.cuda.device_count()):
        torch.cuda.manual_seed_all(int(np.random.SeedSequence([seed, int(ckpt["step"]), rt.rank, 1])
                                       .generate_state(1)[0]))
        if rt.rank < len(rngs):
            notes.append(f"the checkpoint holds CUDA RNG states for {len(rngs[rt.rank]['cuda'])} GPU(s), "
                         f"this machine has {torch.cuda.device_count()}: the CUDA generators are seeded from seed")
    if len(rngs) != rt.world_size:
        notes.append(f"the checkpoint was written by {len(rngs)} process(es), this run has {rt.world_size}: "
                     f"ranks beyond {len(rngs) - 1} get RNG states derived from seed and step")
    saved_streams = int(ckpt.get("world_size", 1)) * int(
        ckpt.get("config", {}).get("gradient_accumulation_steps", 1))
    if saved_streams != n_streams:
        notes.append(f"the global batch changes from {saved_streams} to {n_streams} micro-batches per step, "
                     "so the data order differs too")
    if notes and rt.is_main:
        log.warning("resuming on another runtime: %s. The run goes on from the checkpoint, but it cannot be "
                    "bit-identical to an uninterrupted one", "; ".join(notes))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- checks that a resumed or fine-tuned run fits its data -------------------------------------------
def warn_if_resume_differs(ckpt: dict, model_cfg: ModelConfig, meta: dict) -> None:
    """Resuming keeps the checkpoint's model; say so when this run's config or data differ from it."""
    changed = {k: (v, model_cfg.to_dict()[k]) for k, v in ckpt["model_config"].items()
               if model_cfg.to_dict().get(k) != v}
    if changed:
        log.warning("resuming with the checkpoint's model; ignoring changed model settings %s",
                    ", ".join(f"model.{k}: {old} -> {new}" for k, (old, new) in changed.items()))
    if ckpt.get("data", {}).get("meta", {}).get("fingerprint") != meta.get("fingerprint"):
        log.warning("resuming on other data than the checkpoint was trained on (prepared data fingerprint "
                    "differs): the data order cannot match an uninterrupted run")


def same_vocabulary(a: str, b: str) -> bool:
    """Whether two tokenizer JSONs map text to the same ids: equal, or the same `tokenizers` model
    (vocabulary and merges) and special tokens, whatever the formatting of the files."""
    if a == b:
        return True
    ja, jb = json.loads(a), json.loads(b)
    keys = ("model", "added_tokens", "pre_tokenizer", "normalizer")
    return "model" in ja and all(ja.get(k) == jb.get(k) for k in keys)

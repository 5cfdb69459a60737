"""What a checkpoint holds beyond the weights, and how the loop gets it back.

RNG states are converted to plain lists, ints and tensors so that the checkpoint loads with
`torch.load(weights_only=True)`; `resume_path` decides which file `resume=` means; the checks that
a resumed or fine-tuned run fits its data live here too. The payload keys are those documented in
engine/formats/checkpoint.py, plus "loop" (bad steps, last eval step) and "world_size".
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.formats.checkpoint import CheckpointError, save_checkpoint
from model import ModelConfig

from .parallel import full_state, gather_objects
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


def save_state(path: Path, rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loop: LoopState, loader_state: dict, static: dict,
               wandb_id: str | None) -> None:
    """Write a full training checkpoint (call on every rank: under FSDP gathering the weights is a
    collective; every rank's RNG state is kept). Only rank 0 writes, atomically."""
    model_sd, optim_sd = full_state(model, optimizer)
    rngs = gather_objects(rng_state(), rt)
    if rt.is_main:
        save_checkpoint(path, {**static, **loop.to_payload(), "model": model_sd, "optimizer": optim_sd,
                               "scaler": scaler.state_dict(), "loader_state": loader_state, "rng": rngs,
                               "world_size": rt.world_size, "wandb_run_id": wandb_id})
    rt.barrier()  # nobody runs ahead (or exits) before the file is complete


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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_path(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint `resume=` points at: None (start fresh), `auto` (out_dir/last.pt if it exists),
    or a file / run directory (its last.pt: resuming continues the latest state, not the best)."""
    if resume is None or str(resume).lower() in ("", "none", "false", "never"):
        return None
    if str(resume).lower() == "auto":
        path = out_dir / "last.pt"
        if path.exists():
            return path
        log.warning("resume=auto: no %s yet, starting fresh (to continue an earlier run, pass "
                    "out_dir=<its run directory> or resume=<its last.pt>)", path)
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        for candidate in (path / "last.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"resume={resume}: no last.pt in that directory; pass a .pt file instead")
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: checkpoint {path} does not exist")
    return path


def check_resumable(ckpt: dict, path: Path) -> None:
    """A file that has weights but no training state (e.g. an exported model) cannot be resumed."""
    missing = [k for k in ("step", "optimizer", "loader_state", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no training state ({', '.join(missing)} missing); "
                              "use init_from= to start from its weights instead of resume=")


def restore_rng(ckpt: dict, rt: Runtime) -> None:
    """Put back this rank's generators (rank 0's when the world size changed)."""
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    set_rng_state(rngs[rt.rank] if len(rngs) == rt.world_size else rngs[0])


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

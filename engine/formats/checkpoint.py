"""Checkpoints: written atomically, read back without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`. Keys written by the trainer (the model keys are required):

    format_version  int, FORMAT_VERSION
    model           state dict of the unwrapped, uncompiled GPT
    model_config    ModelConfig.to_dict()
    tokenizer       the tokenizer as a JSON string (sampling needs no data directory), or None
    config          the whole resolved run config as plain data
    step, tokens_seen, best_val, optimizer, scaler, loader_state, rng, wandb_run_id, data
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from model import GPT, ModelConfig
from model.positions import sinusoidal_table

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("best.pt", "last.pt")  # looked for, in this order, inside a run directory


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another format; the message names the file."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write payload to path atomically: a temporary file in the same directory, flushed to disk,
    then renamed over the old one. A crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its best.pt, else last.pt, also under checkpoints/)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for folder in (path, path / "checkpoints"):
            for name in CHECKPOINT_NAMES:
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(f"no checkpoint in directory {path}: expected one of {list(CHECKPOINT_NAMES)}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file or a run directory")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file or run directory safely (weights_only=True) and check its format."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a causalgpt "
                              f"checkpoint ({type(e).__name__}); retrain, or pick another file") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no model weights/config: not a causalgpt checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this code reads version "
                              f"{FORMAT_VERSION}; use the causalgpt release that wrote it")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", **overrides) -> GPT:
    """Rebuild the exact model a checkpoint was trained with (overrides, e.g. attn="explicit" or
    causal=False, change how it runs, not its weights)."""
    config = ModelConfig(**{**ckpt["model_config"], **overrides})
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if config.tie_weights:  # to_empty materialises the shared tensor twice: tie it again
        model.lm_head.weight = model.wte.weight
    model.load_state_dict(ckpt["model"], strict=True)
    if config.pos == "sinusoidal":  # non-persistent buffer: rebuilt, not loaded
        model.pe = sinusoidal_table(config.block_size, config.n_embd).to(device)
    return model

"""Where the model under study comes from: a checkpoint file, a run directory, the newest run under
the outputs directory, or a random-init preset (the leakage and attention modes need no training).

A checkpoint carries its tokenizer as JSON, so sampling needs no data directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data.tokenizer import Tokenizer, tokenizer_from_json
from engine.formats.checkpoint import (
    CHECKPOINT_NAMES,
    CheckpointError,
    model_from_checkpoint,
    resolve_checkpoint,
)
from engine.formats.pretrained import load_pretrained
from model import GPT, ModelConfig

log = logging.getLogger(__name__)

# A random-init model needs a vocabulary size and has no data to take it from: tiny Shakespeare's
# 65 characters keeps it the same shape as the default trained model.
DEFAULT_RANDOM_VOCAB = 65
TRAIN_HINT = "python train.py"


@dataclass
class Loaded:
    """A model ready to run, and what it came from."""
    model: GPT
    tokenizer: Tokenizer | None  # None for a random-init preset (or a checkpoint saved without one)
    source: str  # for reports: the checkpoint path, or "random-init <preset>"
    run_dir: Path | None  # the training run the checkpoint belongs to (None for random init)
    step: int | None = None  # the training step of the checkpoint


def run_dir_of(ckpt_path: Path) -> Path:
    """The run directory of a checkpoint file: its folder, or the folder above `checkpoints/`."""
    parent = ckpt_path.parent
    return parent.parent if parent.name == "checkpoints" else parent


def find_latest_run(root: str | os.PathLike) -> Path:
    """The run directory under root holding the most recently written best.pt or last.pt."""
    root = Path(root)
    found = [p for name in CHECKPOINT_NAMES for p in root.rglob(name) if p.is_file()] if root.is_dir() else []
    if not found:
        raise CheckpointError(
            f"no checkpoint given and none found under {root}/; train one first with `{TRAIN_HINT}`, then "
            f"`python sample.py`, or pass ckpt=<file or run dir> (mode=leakage and mode=attention also "
            f"work untrained: model=tiny)")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return run_dir_of(newest)


def load_from_checkpoint(ckpt: str | os.PathLike | None, outputs_dir: str | os.PathLike,
                         device: torch.device) -> Loaded:
    """Load a checkpoint file or run directory (None: the newest run under outputs_dir), our
    safetensors export (scripts/export.py) or a local Hugging Face GPT-2 directory."""
    target = Path(ckpt) if ckpt else find_latest_run(outputs_dir)
    payload = load_pretrained(target, device="cpu")
    is_checkpoint = payload["source"] == "checkpoint"
    path = resolve_checkpoint(target) if is_checkpoint else target  # a run directory -> best.pt or last.pt
    model = model_from_checkpoint(payload, device=device).eval()
    tokenizer = tokenizer_from_json(payload["tokenizer"]) if payload.get("tokenizer") else None
    log.info("loaded %s (%s, step %s)", path, payload["source"], payload.get("step"))
    return Loaded(model, tokenizer, str(path), run_dir_of(path) if is_checkpoint else None, payload.get("step"))


def random_init(config: ModelConfig, seed: int, device: torch.device) -> Loaded:
    """An untrained model of the given config (vocab_size defaults to 65), seeded."""
    if config.vocab_size is None:
        config = dataclasses.replace(config, vocab_size=DEFAULT_RANDOM_VOCAB)
    torch.manual_seed(seed)
    model = GPT(config).to(device).eval()
    name = config.preset or "custom"
    log.info("random-init model %s (vocab %d, %d layers, %d heads, %d wide, context %d): no checkpoint",
             name, config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.block_size)
    return Loaded(model, None, f"random-init {name}", None)


def variant(model: GPT, **changes) -> GPT:
    """The same weights run another way, e.g. variant(model, causal=False) for the mask-off control
    or attn="explicit". A new module: the original is left untouched."""
    config = dataclasses.replace(model.config, **changes)
    device = model.wte.weight.device
    other = GPT(config).to(device).eval()
    other.load_state_dict(model.state_dict())
    return other

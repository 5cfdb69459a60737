"""Checkpoints: written atomically, read back without unpickling arbitrary objects.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`. Keys written by the trainer (the model keys are required):

    format_version  int, FORMAT_VERSION
    model           state dict of the unwrapped, uncompiled GPT
    model_config    ModelConfig.to_dict()
    tokenizer       the tokenizer as a JSON string (sampling needs no data directory), or None
    config          the whole resolved run config as plain data
    step, tokens_seen, best_val, optimizer, scaler, loader_state, rng, wandb_run_id, data,
    precision, device   (what the run trained with: a resume that changes them is told what resets)

Writing: a temporary file beside the target (`.<name>.tmp-<random>`), fsync'ed, renamed over the
target, then the directory fsync'ed (data/atomic.py): a kill or a power cut leaves the old file or
the new one, never a mix. A failed write (disk full, quota, read-only) removes the temporary file,
keeps the previous checkpoint and raises one CheckpointError naming the path. A run directory
also holds step-numbered checkpoints (`ckpt-000250.pt`, see engine/state.py) and, after a kill,
temporary files that `remove_leftovers` deletes.

Reading: anything torch.load fails on (junk, a cut-short file, a zip of something else), a record
whose CRC-32 does not match (bit rot: torch.load does not check them) and weights that do not fit
their model_config are one CheckpointError naming the file, never a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

from data.atomic import atomic_open, fsync_dir
from model import GPT, ModelConfig
from model.positions import sinusoidal_table

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("best.pt", "last.pt")  # looked for, in this order, inside a run directory
STEP_NAME = re.compile(r"^ckpt-(\d+)\.pt$")  # step-numbered checkpoints: ckpt-000250.pt
# What killed saves leave: `.<name>.tmp-<random>` (data/atomic.py; `.tmp-link` for a step file's
# hard link), and mkstemp's `.<name>.<random>.tmp` from earlier versions.
_TEMP = re.compile(r"^\.(last|best|ckpt-\d+)\.pt\.(tmp-[^.]+|[^.]+\.tmp)$")
# Errors of the disk rather than of the program: the message says what to free or fix.
_DISK_HINTS = {
    errno.ENOSPC: "free space on {dir} (or set out_dir= to a disk with room)",
    errno.EDQUOT: "free space within your quota on {dir} (or set out_dir= elsewhere)",
    errno.EROFS: "{dir} is on a read-only file system: set out_dir= to a writable directory",
    errno.EACCES: "{dir} is not writable: fix its permissions or set out_dir= elsewhere",
    errno.EPERM: "{dir} is not writable: fix its permissions or set out_dir= elsewhere",
    errno.EIO: "the disk of {dir} reports I/O errors: check it, or set out_dir= elsewhere",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another format; the message names the file."""


def step_name(step: int) -> str:
    """The file name of the step-numbered checkpoint of a step: ckpt-000250.pt."""
    return f"ckpt-{step:06d}.pt"


def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints of a run directory as (step, path), newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write payload to path atomically (temporary file, fsync, rename, directory fsync). A crash
    mid-save leaves the previous checkpoint intact; a disk error is a CheckpointError naming path."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            torch.save(payload, f)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write of its buffered file as a RuntimeError ("unexpected
        # pos ...") raised while handling the OSError; look for that OSError down the chain.
        if (error := _write_error(path, e)) is None:
            raise
        raise error from e
    return path


def link_checkpoint(src: Path, dst: Path) -> Path:
    """Make dst name the same checkpoint as src, atomically: a hard link (no bytes copied, no disk
    used) renamed into place, or, where the file system has no hard links, an atomic copy."""
    tmp = dst.parent / f".{dst.name}.tmp-link"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, 2**22)
            return dst
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if (error := _write_error(dst, e)) is None:
            raise
        raise error from e
    return dst


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves left in run_dir; returns them. Call it where no
    save into run_dir is running (the trainer does at start, on rank 0)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = sorted(p for p in run_dir.iterdir() if _TEMP.match(p.name) and p.is_file())
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def _write_error(path: Path, e: BaseException) -> CheckpointError | None:
    """The CheckpointError for a failed write of path, or None when e is no disk error."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    name = errno.errorcode.get(cause.errno or 0, "")
    hint = _DISK_HINTS.get(cause.errno or 0, "check the disk of {dir}, or set out_dir= elsewhere")
    return CheckpointError(
        f"cannot write checkpoint {path}: {cause.strerror or cause}{f' ({name})' if name else ''}; "
        f"the previous {path.name}, if any, is intact and no partial file is left: "
        f"{hint.format(dir=path.parent)}, then run again (resume=auto continues from the last checkpoint)")


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
    """Load a checkpoint file or run directory safely (weights_only=True) and check its format and
    that its weights fit its model_config. Every failure is one CheckpointError naming the file."""
    path = resolve_checkpoint(path)
    try:
        _check_crcs(path)
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}; fix its permissions") from e
    except Exception as e:
        # On arbitrary bytes the unpickler and the zip reader fail with nearly any exception type
        # (KeyError, ValueError, UnicodeDecodeError, struct.error, EOFError, RuntimeError, ...).
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a causalgpt checkpoint "
                              f"({type(e).__name__}); pick another checkpoint (a run directory keeps "
                              "ckpt-<step>.pt files) or retrain") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("model_config"), dict):
        raise CheckpointError(f"checkpoint {path} has no model weights/config: not a causalgpt checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this code reads version "
                              f"{FORMAT_VERSION}; use the causalgpt release that wrote it")
    check_weights(ckpt, path)
    return ckpt


def _check_crcs(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record that torch.load never checks, so a
    flipped bit in the weights would load silently. Checking them reads the file once (~3 GB/s)."""
    if not zipfile.is_zipfile(path):
        return  # not a zip at all: torch.load says what it is
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record {bad} fails its CRC check (the file "
                              "changed on disk after it was written); pick another checkpoint (a run directory "
                              "keeps ckpt-<step>.pt files)")


def check_weights(ckpt: dict, path: Path) -> None:
    """The weights must be the tensors model_config builds: same names, same shapes (checked on
    the meta device: no memory, no initialisation)."""
    try:
        config = ModelConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid model_config ({e}); it is damaged or "
                              "from another program: pick another checkpoint") from e
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = ckpt["model"]
    problem = next((f"{k} is missing" for k in want if k not in got), None) \
        or next((f"unexpected {k}" for k in got if k not in want), None) \
        or next((f"{k} is not a tensor" for k in want if not torch.is_tensor(got[k])), None) \
        or next((f"{k} has shape {list(got[k].shape)}, its model_config gives {list(want[k])}"
                 for k in want if tuple(got[k].shape) != want[k]), None)
    if problem:
        raise CheckpointError(f"checkpoint {path}: its weights do not match its model_config ({problem}); "
                              "the file is damaged or was edited: pick another checkpoint")


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

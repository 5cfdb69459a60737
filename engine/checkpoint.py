"""Checkpoints: the one module that writes, reads and chooses them, for every caller.

A checkpoint is a plain dict that loads with `torch.load(weights_only=True)`: format_version, model
(the unwrapped, uncompiled GPT's state dict), model_config, tokenizer (JSON string or None), config
(the resolved run config) and the training state of engine/state.py (step, optimizer, rng, ...).

Writing is atomic (data/atomic.py): a kill leaves the old file or the new one; keep_last > 0 also
names it ckpt-<step>.pt (a hard link) and prunes older step files. Every reader tries `candidates`
in one order, last.pt, the step files newest first, best.pt, and skips with a warning a file that
does not load. Every failure (a disk error, a torch.load error, a bad CRC-32, weights that do not fit
model_config, data the model cannot read: `check_fits_data`) is one CheckpointError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
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
log = logging.getLogger(__name__)
CHECKPOINT_GLOBS = ("last.pt", "ckpt-*.pt", "best.pt")  # a run directory's checkpoints, in `candidates` order
STEP_NAME = re.compile(r"^ckpt-(\d+)\.pt$")  # step-numbered checkpoints: ckpt-000250.pt
# What killed saves leave: `.<name>.tmp-<random>` (data/atomic.py; `.tmp-link` for a step file's
# hard link), and mkstemp's `.<name>.<random>.tmp` from earlier versions.
_TEMP = re.compile(r"^\.(last|best|ckpt-\d+)\.pt\.(tmp-[^.]+|[^.]+\.tmp)$")
_NOT_WRITABLE = "{dir} is not writable: fix its permissions or set out_dir= elsewhere"
_DISK_HINTS = {  # errors of the disk rather than of the program: what to free or fix
    errno.ENOSPC: "free space on {dir} (or set out_dir= to a disk with room)",
    errno.EDQUOT: "free space within your quota on {dir} (or set out_dir= elsewhere)",
    errno.EROFS: "{dir} is on a read-only file system: set out_dir= to a writable directory",
    errno.EACCES: _NOT_WRITABLE, errno.EPERM: _NOT_WRITABLE,
    errno.EIO: "the disk of {dir} reports I/O errors: check it, or set out_dir= elsewhere",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another format; the message names the file."""


# ---- writing ------------------------------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"ckpt-{step:06d}.pt"


def step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints of a run directory as (step, path), newest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("ckpt-*.pt") if (m := STEP_NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(path: str | os.PathLike, payload: dict, keep_last: int = 0) -> Path:
    """Write payload to path atomically; keep_last > 0: also as its step's file (`keep_history`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **payload}, f)
    except (OSError, RuntimeError) as e:
        _raise_write_error(path, e)
    if keep_last:
        keep_history(path, int(payload["step"]), keep_last)
    return path


def keep_history(last: Path, step: int, keep_last: int) -> None:
    """Name the checkpoint just written to `last` also ckpt-<step>.pt and delete the step files beyond
    the newest keep_last, and those of later steps (left by a run since resumed at an earlier one)."""
    link_checkpoint(last, last.parent / step_name(step))
    kept = 0
    for s, p in step_checkpoints(last.parent):
        if s > step:
            log.info("removing %s: it is from before this run was resumed at an earlier step", p)
        elif (kept := kept + 1) <= keep_last:
            continue
        p.unlink(missing_ok=True)
    fsync_dir(last.parent)


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
        else:
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        _raise_write_error(dst, e)
    return dst


def _raise_write_error(path: Path, e: BaseException) -> None:
    """Raise the CheckpointError for a failed write of path, or e itself when it is no disk error.
    torch.save reports a failed write as a RuntimeError ("unexpected pos ...") raised while handling
    the OSError: that OSError is looked for down the chain."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise e
    hint = _DISK_HINTS.get(cause.errno or 0, "check the disk of {dir}, or set out_dir= elsewhere")
    raise CheckpointError(
        f"cannot write checkpoint {path}: {disk_reason(cause)}; "
        f"the previous {path.name}, if any, is intact and no partial file is left: "
        f"{hint.format(dir=path.parent)}, then run again (resume=auto continues from the last checkpoint)") from e


def disk_reason(e: OSError) -> str:
    """An OSError in a few words: its message and errno name, "No space left on device (ENOSPC)"."""
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e}{f' ({name})' if name else ''}"


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves left in run_dir; returns them. Call it where no
    save into run_dir is running (the trainer does at start, on rank 0)."""
    removed = sorted(p for p in Path(run_dir).glob(".*") if _TEMP.match(p.name) and p.is_file())
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


# ---- choosing and reading -----------------------------------------------------------------------------
def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run directory in the order every reader tries them: last.pt, the step
    files newest first, best.pt; a second name of one file (last.pt's hard link) is left out."""
    run_dir, files = Path(run_dir), {}
    for path in [run_dir / "last.pt", *(p for _, p in step_checkpoints(run_dir)), run_dir / "best.pt"]:
        with contextlib.suppress(OSError):
            st = path.stat()
            files.setdefault((st.st_dev, st.st_ino), path)
    return list(files.values())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or a run directory's first candidate (whether it loads or not)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if found := candidates(path):
            return found[0]
        raise CheckpointError(f"no checkpoint in directory {path}: expected last.pt, ckpt-<step>.pt or best.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a .pt file or a run directory")
    return path


def open_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    training_state: bool = False) -> tuple[Path, dict]:
    """(file, checkpoint) for a file or a run directory: of a directory the first candidate that
    loads, each one skipped named in a warning. training_state: it must hold what resume needs."""
    path = Path(path).expanduser()
    files = (candidates(path) if path.is_dir() else []) or [resolve_checkpoint(path)]  # raises: nothing there
    errors: list[CheckpointError] = []
    for file in files:
        try:
            ckpt = _load_file(file, map_location)
            missing = [k for k in ("step", "optimizer", "loader_state", "rng") if k not in ckpt]
            if training_state and missing:  # e.g. an exported model: weights only
                raise CheckpointError(f"checkpoint {file} has no training state ({', '.join(missing)} missing); "
                                      "use init_from= to start from its weights instead of resume=")
        except CheckpointError as e:
            if len(files) == 1:
                raise
            log.warning("skipping %s, it does not load: %s", file, e)
            errors.append(e)
            continue
        if errors:
            log.warning("using %s (step %s), the newest checkpoint of %s that loads", file, ckpt.get("step"), path)
        return file, ckpt
    raise CheckpointError(f"none of {', '.join(p.name for p in files)} in {path} loads ({errors[0]}); pass a "
                          "checkpoint file that does, or start fresh in another out_dir")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """open_checkpoint(path)'s checkpoint: a file, or the first one of a run directory that loads."""
    return open_checkpoint(path, map_location)[1]


def _load_file(path: Path, map_location: str | torch.device) -> dict:
    """One checkpoint file, loaded with weights_only=True, its CRCs, format and weights checked."""
    try:
        if zipfile.is_zipfile(path):  # not a zip at all: torch.load says what it is
            # torch.save writes a zip with a CRC-32 per record that torch.load never checks, so a
            # flipped bit in the weights would load silently. Checking reads the file once (~3 GB/s).
            with zipfile.ZipFile(path) as archive:
                if (bad := archive.testzip()) is not None:
                    raise CheckpointError(f"checkpoint {path} is corrupt: its record {bad} fails its CRC check "
                                          "(the file changed on disk after it was written); pick another "
                                          "checkpoint (a run directory keeps ckpt-<step>.pt files)")
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
    if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_config"))):
        raise CheckpointError(f"checkpoint {path} has no model weights/config: not a causalgpt checkpoint")
    if (version := ckpt.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this code reads version "
                              f"{FORMAT_VERSION}; use the causalgpt release that wrote it")
    check_weights(ckpt, path)
    return ckpt


# ---- what a checkpoint's weights fit ------------------------------------------------------------------
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


def check_fits_data(ckpt: dict, path: str | os.PathLike, tokenizer_json: str | None, vocab_size: int,
                    use: str) -> None:
    """The one check that a checkpoint's weights can read this data: its tokenizer maps text to the
    same ids as the data's (when both are known), and the data's ids fit its embedding. use: what the
    caller does with it ("resume", "init_from", "sample"), named in the fix."""
    model_vocab = int(ckpt["model_config"]["vocab_size"])
    saved = ckpt.get("tokenizer")
    if saved and tokenizer_json and not same_vocabulary(saved, tokenizer_json):
        problem = f"it was trained with another tokenizer ({_describe(saved)}) than this data's ({_describe(tokenizer_json)})"
    elif vocab_size > model_vocab:
        problem = f"this data has {vocab_size} token ids, its embedding only {model_vocab}"
    else:
        return
    fix = {"resume": "resume with the data it was trained on (the data.* settings of its run), or start a new "
                     f"run from these weights with init_from={path} on data prepared with its tokenizer",
           "init_from": "prepare the data with the model's tokenizer (data.tokenizer=pretrained "
                        "data.tokenizer_path=...)"}.get(use, "use a checkpoint that holds its own tokenizer")
    raise CheckpointError(f"checkpoint {path} does not fit this data: {problem}; {fix}")


def same_vocabulary(a: str, b: str) -> bool:
    """Whether two tokenizer JSONs map text to the same ids: equal, or the same `tokenizers` model
    (vocabulary and merges) and special tokens, whatever the formatting of the files."""
    if a == b:
        return True
    ja, jb = json.loads(a), json.loads(b)
    return "model" in ja and all(ja.get(k) == jb.get(k) for k in ("model", "added_tokens", "pre_tokenizer", "normalizer"))


def _describe(tokenizer_json: str) -> str:
    """A tokenizer JSON in a few words: its kind and vocabulary size."""
    obj = json.loads(tokenizer_json)
    if obj.get("kind") == "char":
        return f"char, {len(obj['chars']) + bool(obj.get('unk'))} tokens"
    model = obj.get("model") or {}
    return f"{str(model.get('type', 'tokenizers')).lower()}, {len(model.get('vocab') or {})} tokens"


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

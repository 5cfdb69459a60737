"""Loading a model from anywhere, and our pickle-free export format.

`load_pretrained(path)` tells apart, by what is on disk, our checkpoint or run directory (source
"checkpoint"), our export directory (config.json with "format": "causalgpt"; "export") and a local
Hugging Face GPT-2 directory (model_type gpt2; "hf"), and returns one checkpoint-like dict for all.

The export format, for sharing (loading it runs no pickle):
    model.safetensors   the state dict (the tied LM head stored once, as wte.weight)
    config.json         {"format": "causalgpt", "format_version": 1, "model_config": {...}}
    tokenizer.json      the checkpoint's tokenizer JSON as is, absent when it has none

Writing survives kills: `save_export` writes each file atomically, config.json last; `write_dir`
builds a directory beside its target and renames it into place, or replaces an existing one's files
under a marker file (`.causalgpt-incomplete`) that makes a reader stop with one line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write, exclusive_lock, fsync_dir, make_temp_dir, remove_temps, temp_prefix
from model import GPT, ModelConfig

from ..checkpoint import CheckpointError, check_weights, disk_reason, model_from_checkpoint, open_checkpoint
from .hf import load_hf_dir, read_weights

EXPORT_FORMAT = "causalgpt"
EXPORT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
# Present in a directory only while write_dir replaces its files: a reader that finds it stops.
INCOMPLETE_MARKER = ".causalgpt-incomplete"


def save_export(ckpt: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write ckpt's model, model_config and tokenizer in the export format; returns the file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**ckpt["model_config"])  # validates before anything is written
    from safetensors.torch import save_file
    # safetensors refuses two names for one tensor: a tied head is stored once, the loader ties it again
    sd = {k: v.detach().contiguous() for k, v in ckpt["model"].items() if not (cfg.tie_weights and k == "lm_head.weight")}
    weights = out_dir / WEIGHTS_FILE
    tmp = out_dir / f"{temp_prefix(weights)}{secrets.token_hex(4)}"  # save_file takes a path, not a file
    try:
        save_file(sd, tmp, metadata={"format": "pt", "causalgpt_format_version": str(EXPORT_VERSION)})
        _fsync_file(tmp)
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    if ckpt.get("tokenizer"):
        atomic_write(out_dir / TOKENIZER_FILE, ckpt["tokenizer"])
    config = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model_config": cfg.to_dict()}
    atomic_write(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")  # last: it marks an export
    return sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))


def load_export(path: Path, config: dict, device: str | torch.device = "cpu") -> dict[str, Any]:
    """An export directory (config: its config.json) as a checkpoint-like dict."""
    if config.get("format_version") != EXPORT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE} has format_version {config.get('format_version')}, "
                              f"this code reads version {EXPORT_VERSION}; use the causalgpt release that wrote it")
    model_config = ModelConfig(**config["model_config"]).to_dict()
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"export {path} has no {WEIGHTS_FILE}")
    sd = read_weights(weights, device)
    if model_config["tie_weights"] and "wte.weight" in sd:
        sd["lm_head.weight"] = sd["wte.weight"]
    check_weights({"model": sd, "model_config": model_config}, weights)
    tok = path / TOKENIZER_FILE
    try:
        tokenizer = tok.read_text(encoding="utf-8") if tok.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{tok} is unreadable or not UTF-8 ({type(e).__name__}); export again") from e
    return {"model": sd, "model_config": model_config, "tokenizer": tokenizer, "source": "export"}


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Our checkpoint or run dir, our export dir, or a local HF GPT-2 dir, as a checkpoint-like dict:
    {"model": state dict, "model_config": dict, "tokenizer": JSON string or None, "source": ...}.
    Raises CheckpointError (a ValueError) naming the path when it is none of these."""
    path = Path(path).expanduser()
    if not path.exists() and _HUB_NAME.fullmatch(str(path)):
        path = _from_hub(str(path))
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; {_ACCEPTED}")
    if (path / INCOMPLETE_MARKER).exists():
        raise CheckpointError(f"{path} was being overwritten when its writer stopped ({INCOMPLETE_MARKER} is "
                              "still there), so its files may come from two different models: export again "
                              "(overwrite=true)")
    try:  # {} when there is none: a run directory
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")) if path.is_dir() \
            and (path / CONFIG_FILE).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG_FILE} is not a JSON object (truncated or corrupt): export again, "
                              "or restore the file")
    if config.get("format") == EXPORT_FORMAT:
        return load_export(path, config, device)
    if config.get("model_type") == "gpt2":
        return load_hf_dir(path, config, device)
    if "model_type" in config:
        raise CheckpointError(f"{path / CONFIG_FILE}: model_type={config['model_type']!r}; of Hugging Face models "
                              "only GPT-2 (model_type 'gpt2') loads")
    try:
        file, ckpt = open_checkpoint(path, map_location=device)  # a run dir: its first one that loads
    except CheckpointError as e:
        if path.is_dir():  # say what else a directory could have been
            raise CheckpointError(f"{e}; {_ACCEPTED}") from e
        raise
    return {**ckpt, "tokenizer": ckpt.get("tokenizer"), "source": "checkpoint", "path": str(file)}


# A hub model name ("gpt2", "openai-community/gpt2"), tried when no local path has that name.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _from_hub(name: str) -> Path:
    """The hub model `name` downloaded (or already in the Hugging Face cache), as nanoGPT's and litgpt's
    init_from=gpt2 does; one line when it cannot come."""
    from data.hub import HubUnreachable, download_model
    try:
        return download_model(name)
    except HubUnreachable as e:
        raise CheckpointError(
            f"{name} is no local file or directory, and the Hugging Face hub could not give model {name!r} "
            f"({e}); offline, download it where there is internet (huggingface-cli download {name} "
            f"--local-dir {name.split('/')[-1]}) and pass that directory") from None


_ACCEPTED = ("pass a checkpoint (.pt), a run directory, an export directory (scripts/export.py) "
             "or a Hugging Face GPT-2 directory")


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> GPT:
    """The GPT at path (anything load_pretrained accepts), in eval mode. Overrides change how it runs
    (attn="explicit", dropout=0.1 for a fine-tune), not its weights. The tokenizer JSON comes along
    as `model.tokenizer_json` (data.tokenizer.tokenizer_from_json turns it into a tokenizer)."""
    ckpt = load_pretrained(path, device)
    model = model_from_checkpoint(ckpt, device, **overrides)
    model.tokenizer_json = ckpt["tokenizer"]
    return model.eval()


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check that out may be written: absent, empty, or overwrite=True. Raises ValueError otherwise."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out={out} exists and is not empty; pick another directory or pass overwrite=true")
    return out


def write_dir(out: Path, write: Any) -> list[str]:
    """Call write(tmp_dir) on a fresh directory beside out, then put its files into out: a new out
    appears whole (one rename); an existing one has our files replaced by name, others kept, under
    the incomplete-marker. A disk error is a CheckpointError naming out, unchanged or marked incomplete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", waiting_for=f"another export into {out}"):
        remove_temps(out)
        tmp = make_temp_dir(out)
        try:
            write(tmp)
            for f in tmp.iterdir():
                _fsync_file(f)
            fsync_dir(tmp)
            if not out.exists():
                os.replace(tmp, out)
            else:
                marker = out / INCOMPLETE_MARKER
                atomic_write(marker, "files are being replaced; a reader that finds this stops\n")
                for f in tmp.iterdir():
                    os.replace(f, out / f.name)
                fsync_dir(out)
                marker.unlink()
            fsync_dir(out.parent)
        except OSError as e:
            state = "is marked incomplete" if (out / INCOMPLETE_MARKER).exists() else "is unchanged"
            raise CheckpointError(f"cannot write {out}: {disk_reason(e)}; {out} {state}: free space or fix "
                                  "permissions there, then export again (overwrite=true)") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _fsync_file(path: Path) -> None:
    """Flush a file written by another library (safetensors, transformers) to disk."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())

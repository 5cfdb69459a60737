"""Hugging Face GPT-2 directories on disk: read one as a checkpoint-like dict, write one.

Reading (config.json + model.safetensors, a weights-only pytorch_model.bin or their sharded indexes;
tokenizer.json, else GPT-2's vocab.json + merges.txt) needs no transformers; writing uses its own
save_pretrained (imported lazily: the extra stays optional). The in-memory mapping is model/gpt2.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from data.tokenizer import EOT_TOKENS as _EOT_TOKENS
from model.gpt2 import (
    check_gpt2_expressible,
    from_hf_state_dict,
    model_config_from_hf,
    to_hf_config,
    to_hf_state_dict,
)

from ..checkpoint import CheckpointError

log = logging.getLogger(__name__)


# ---- reading an HF GPT-2 directory (no transformers needed) ----------------------------------------
def load_hf_dir(path: Path, hf_config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """A local HF GPT-2 directory (hf_config: its config.json) as a checkpoint-like dict (model,
    model_config, tokenizer, source)."""
    model_config = model_config_from_hf(hf_config, where=str(path / "config.json"))
    files = _weight_files(path)
    hf_sd = {k: v for f in files for k, v in read_weights(f, device).items()}
    try:
        sd = from_hf_state_dict(hf_sd, model_config, where=str(files[0] if len(files) == 1 else path))
    except ValueError as e:  # weights that do not fit the config: a bad file, named in the message
        raise CheckpointError(str(e)) from e
    return {"model": sd, "model_config": model_config, "tokenizer": tokenizer_json_from_hf_dir(path),
            "source": "hf"}


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, else its sharded index, else pytorch_model.bin (or its index)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{path} has a GPT-2 config.json but no model.safetensors or pytorch_model.bin")


def read_weights(f: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a weights-only torch file, as a state dict; CheckpointError naming it."""
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(f, device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from e
    try:  # weights_only: a .bin is a pickle, and must not run code on load
        sd = torch.load(f, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{f} is not a loadable weights-only torch file ({type(e).__name__})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f} does not hold a state dict")
    return sd


# ---- tokenizers -----------------------------------------------------------------------------------
def tokenizer_json_from_hf_dir(path: Path) -> str | None:
    """The directory's tokenizer.json, else one built from GPT-2's vocab.json + merges.txt, else None;
    in `tokenizers`' canonical form (to_str), the string data/ stores for a run prepared with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if (path / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()
        except Exception as e:  # the Rust binding raises plain Exception for any parse error
            raise CheckpointError(f"{path / 'tokenizer.json'} is not a valid tokenizer.json ({e})") from e
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()
    log.warning("%s has no tokenizer.json (nor vocab.json + merges.txt): loading the model without one", path)
    return None


def hf_tokenizer_files(tokenizer_json: str, model_max_length: int) -> tuple[dict[str, str], int | None]:
    """tokenizer.json and tokenizer_config.json contents that AutoTokenizer loads, and the eot id.
    Our char vocabulary becomes a WordLevel model over its characters with a pre-tokenizer that
    isolates each ([\\s\\S]: "." skips newlines) and a Fuse decoder: the same ids, the same text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    obj = json.loads(tokenizer_json)
    if isinstance(obj, dict) and obj.get("kind") == "char":
        vocab = {c: i for i, c in enumerate(obj["chars"])}
        if obj.get("unk"):
            vocab["<unk>"] = len(obj["chars"])  # our CharTokenizer puts <unk> last
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # not in vocab: unknown chars fail to encode
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok = Tokenizer.from_str(tokenizer_json)
    eot = next((t for t in _EOT_TOKENS if tok.token_to_id(t) is not None), None)
    # tokenizer_class must be explicit: with model_type gpt2 AutoTokenizer would otherwise pick
    # GPT2Tokenizer, which re-applies GPT-2's own pre-tokenizer and breaks other vocabularies.
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
    if eot is not None:
        tok_config.update(bos_token=eot, eos_token=eot)
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(tok_config, indent=2)}
    return files, None if eot is None else tok.token_to_id(eot)


# ---- writing an HF directory (needs transformers) --------------------------------------------------
def require_transformers() -> Any:
    """Import transformers, or raise ImportError with the one-line install hint."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("transformers is not installed; install the optional extra: pip install -e '.[hf]'") from e
    return transformers


def save_hf(ckpt: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write ckpt (model, model_config, tokenizer) as an HF GPT-2 directory with transformers' own
    writer, so the files fit its loader in any version; returns the file names. A model GPT-2 cannot
    express is refused (ValueError) before transformers is imported."""
    cfg = check_gpt2_expressible(ckpt["model_config"])
    transformers = require_transformers()
    out_dir = Path(out_dir)
    tok_files, eot_id = hf_tokenizer_files(ckpt["tokenizer"], cfg.block_size) if ckpt.get("tokenizer") else ({}, None)
    hf_config = transformers.GPT2Config(**to_hf_config(cfg, eot_id))
    with torch.device("meta"):  # skip a random init that the weights below replace (minutes for gpt2-xl)
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    if any(True for _ in hf_model.buffers()):  # older versions keep a mask buffer: it must be real
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    sd = to_hf_state_dict(ckpt["model"], cfg.n_layer)
    result = hf_model.load_state_dict(sd, strict=False, assign=True)
    hf_model.tie_weights()
    # Only those mask buffers (absent from our dict) may be missing; anything else is a mismatch.
    missing = [k for k in result.missing_keys if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit GPT2LMHeadModel: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
    hf_model.save_pretrained(out_dir, max_shard_size="1000GB")  # one model.safetensors, not shards
    for name, text in tok_files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return sorted(p.name for p in out_dir.iterdir())

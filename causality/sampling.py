"""Sampling: the runtime, the model under study, its prompt, and text streamed as it is made.

The model is a checkpoint file or run directory (the newest run by default), our export, a Hugging
Face GPT-2 directory, or a random-init preset (the leakage and attention modes need no training); a
checkpoint carries its tokenizer, so sampling needs no data directory. Prompt problems are one-line
DataError or ValueError; the recoverable ones (empty, longer than the context) are warnings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from data.config import DataError
from data.tokenizer import CharTokenizer, Tokenizer, tokenizer_from_json
from engine.checkpoint import CHECKPOINT_GLOBS, CheckpointError, check_fits_data, model_from_checkpoint
from engine.formats.pretrained import load_pretrained
from engine.runtime import Runtime, pick_device, pick_precision
from model import GPT, ModelConfig
from model.generate import generate_tokens

log = logging.getLogger(__name__)

# A random-init model has no data to take its vocabulary size from: tiny Shakespeare's 65
# characters keep it the same shape as the default trained model.
DEFAULT_RANDOM_VOCAB = 65
_VISIBLE = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "\u00b7"})  # whitespace in labels


def inference_runtime(device: str = "auto", precision: str = "auto", compile: bool = False) -> Runtime:
    """engine.runtime's Runtime for one process, device and precision chosen as the trainer chooses
    them; no process group, and no thread or allocator tuning (the caller sets threads)."""
    dev = pick_device(device)
    return Runtime(rank=0, local_rank=0, world_size=1, device=dev, precision=pick_precision(precision, dev),
                   compile=compile)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock timing covers it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


# ---- the model -----------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer | None  # None for a random-init preset (or a checkpoint saved without one)
    source: str  # for reports: the checkpoint path, or "random-init <preset>"
    run_dir: Path | None  # the training run the checkpoint belongs to (None for random init)


def find_latest_run(root: str | os.PathLike) -> Path:
    """The run directory under root with the most recently written checkpoint; under a root named
    outputs/ (train.py's single runs), the sweeps' multirun/ beside it counts too."""
    root = Path(root)
    roots = [root, root.parent / "multirun"] if root.name == "outputs" else [root]
    found = [p for r in roots if r.is_dir() for name in CHECKPOINT_GLOBS for p in r.rglob(name) if p.is_file()]
    if not found:
        raise CheckpointError(
            f"no checkpoint given and none found under {' or '.join(f'{r}/' for r in roots)}; train one first with "
            "`python train.py`, then `python sample.py`, or pass ckpt=<file or run dir> (mode=leakage and "
            "mode=attention also work untrained: model=tiny)")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def load_from_checkpoint(ckpt: str | os.PathLike | None, outputs_dir: str | os.PathLike,
                         device: torch.device) -> Loaded:
    """A checkpoint file or run directory (None: the newest run under outputs_dir), our safetensors
    export (scripts/export.py) or a local Hugging Face GPT-2 directory."""
    target = Path(ckpt) if ckpt else find_latest_run(outputs_dir)
    payload = load_pretrained(target, device="cpu")
    is_checkpoint = payload["source"] == "checkpoint"
    path = Path(payload["path"]) if is_checkpoint else target  # a run directory -> the file chosen
    tokenizer = tokenizer_from_json(payload["tokenizer"]) if payload.get("tokenizer") else None
    if tokenizer is not None:
        check_fits_data(payload, path, None, tokenizer.vocab_size, use="sample")
    model = model_from_checkpoint(payload, device=device).eval()
    log.info("loaded %s (%s, step %s)", path, payload["source"], payload.get("step"))
    return Loaded(model, tokenizer, str(path), path.parent if is_checkpoint else None)


def random_init(config: ModelConfig, seed: int, device: torch.device) -> Loaded:
    """An untrained, seeded model of the given config (vocab_size defaults to 65)."""
    if config.vocab_size is None:
        config = dataclasses.replace(config, vocab_size=DEFAULT_RANDOM_VOCAB)
    torch.manual_seed(seed)
    model = GPT(config).to(device).eval()
    name = config.preset or "custom"
    log.info("random-init model %s (vocab %d, %d layers, %d heads, %d wide, context %d): no checkpoint",
             name, config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.block_size)
    return Loaded(model, None, f"random-init {name}", None)


# ---- the prompt ----------------------------------------------------------------------------------
def read_prompt(prompt: str, prompt_file: str | None, stdin: TextIO) -> str:
    """The prompt text: `prompt`, or the contents of `prompt_file`, or standard input for prompt="-"."""
    if not prompt_file:
        return stdin.read() if prompt == "-" else prompt
    if prompt:
        raise ValueError("give prompt=... or prompt_file=..., not both")
    path = Path(prompt_file).expanduser()
    if not path.is_file():
        raise ValueError(f"prompt_file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt_file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def start_token(tokenizer: Tokenizer, fallback: int | None = None) -> int:
    """What a generation without a prompt starts from: the end-of-text token, else the newline token
    (char vocabularies), else `fallback` (the trainer's eval samples take 0), else a DataError."""
    if tokenizer.eot_id is not None:
        return tokenizer.eot_id
    with contextlib.suppress(DataError):  # a char vocabulary without "\n"
        if len(ids := tokenizer.encode("\n")) == 1:
            return ids[0]
    if fallback is not None:
        return fallback
    raise DataError("the prompt is empty and this tokenizer has neither an end-of-text nor a newline token "
                    "to start from; give a prompt")


def encode_prompt(tokenizer: Tokenizer, text: str, block_size: int) -> list[int]:
    """Prompt text -> 1 to block_size ids: an empty prompt is the start token; a longer one than the
    context keeps its last block_size tokens, all the model can see."""
    if text == "":
        tok = start_token(tokenizer)
        log.warning("empty prompt: starting from token %d (%s)", tok, label(tokenizer, tok))
        return [tok]
    if isinstance(tokenizer, CharTokenizer) and (bad := sorted(set(text) - set(tokenizer.chars))):
        if tokenizer.unk_id is None:  # name every character the vocabulary lacks, not just the first
            names = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in bad)
            raise DataError(f"the prompt has {len(bad)} character(s) outside the model's char vocabulary: {names}; "
                            "remove or replace them")
        log.warning("%d prompt character(s) are outside the char vocabulary and were read as <unk>",
                    sum(map(text.count, bad)))
    ids = tokenizer.encode(text)
    if len(ids) > block_size:
        log.warning("the prompt is %d tokens, longer than the model's context of %d: keeping the last %d",
                    len(ids), block_size, block_size)
    return ids[-block_size:]


def study_prompt(loaded: Loaded, text: str, seq_len: int, seed: int) -> torch.Tensor:
    """The prompt (1, T) of the leakage and attention modes: the user's text, else seq_len tokens (cut
    to the context) sampled from the model from its start token, or random ones with no tokenizer."""
    model, tok = loaded.model, loaded.tokenizer
    device = model.wte.weight.device
    if text:
        if tok is None:
            raise ValueError(f"{loaded.source} has no tokenizer to encode the prompt; leave prompt empty")
        return torch.tensor([encode_prompt(tok, text, model.config.block_size)], device=device)  # (1, T)
    n = min(seq_len, model.config.block_size)
    g = torch.Generator(device=device).manual_seed(seed)
    if tok is None:
        return torch.randint(0, model.config.vocab_size, (1, n), generator=g, device=device)  # (1, n)
    start = torch.tensor([[start_token(tok)]], device=device)  # (1, 1)
    return model.generate(start, n - 1, temperature=1.0, generator=g, vocab_limit=vocab_limit(tok, model))  # (1, n)


def vocab_limit(tokenizer: Tokenizer, model: GPT) -> int | None:
    """The ids generation may draw: the tokenizer's, where the model's vocabulary is padded past it
    (GPT-2's 50257 ids in a 50304-row table, whose extra ids have no text); None (all) otherwise."""
    return tokenizer.vocab_size if tokenizer.vocab_size < model.config.vocab_size else None


def label(tokenizer: Tokenizer | None, token_id: int, max_len: int = 10) -> str:
    """A short, visible label for one token (plot axes, warnings): whitespace shown, long tokens cut;
    the id itself when there is no tokenizer."""
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([token_id]).translate(_VISIBLE)
    return text if len(text) <= max_len else text[: max_len - 1] + "\u2026"


# ---- streaming -----------------------------------------------------------------------------------
@dataclass
class Sample:
    new_ids: list[int]
    text: str  # tokenizer.decode(new_ids)
    streamed: str  # the pieces written while generating, joined (equals text)
    seconds: float  # wall time from the prefill to the last token


def stream_sample(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], *, max_new_tokens: int,
                  write: Callable[[str], None] = lambda s: None, **sampling: Any) -> Sample:
    """Generate one continuation of prompt_ids, calling write(piece) with each completed piece of text
    as soon as its token is made (Tokenizer.decode_stream holds back half a UTF-8 character). Mixed
    precision is the caller's. sampling: generate_tokens' settings (temperature, top_k, top_p,
    use_cache, generator, vocab_limit; stop_id ends at that token, neither written nor kept)."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=model.wte.weight.device)  # (1, T)
    new_ids: list[int] = []
    pieces: list[str] = []

    def ids() -> Iterator[int]:
        for tok in generate_tokens(model, idx, max_new_tokens, **sampling):
            new_ids.append(int(tok[0, 0]))  # waits for the GPU: the token is needed to print it
            yield new_ids[-1]

    synchronize(idx.device)
    start = time.perf_counter()
    for piece in tokenizer.decode_stream(ids()):
        pieces.append(piece)
        write(piece)
    synchronize(idx.device)
    return Sample(new_ids, tokenizer.decode(new_ids), "".join(pieces), time.perf_counter() - start)

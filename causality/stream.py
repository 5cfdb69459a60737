"""Generation that streams text to the terminal as the tokens are made, and times it.

Text is written through data.tokenizer.StreamDecoder, so a byte-level BPE token that holds half of
a UTF-8 character is held back until the character is complete: no broken characters reach the
terminal, and the pieces joined equal decode(all new ids).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from data.tokenizer import StreamDecoder, Tokenizer
from model import GPT
from model.generate import check_sampling_args, generate_tokens

from .runtime import synchronize

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One generated continuation."""
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # tokenizer.decode(new_ids)
    streamed: str  # the pieces written while generating, joined (equals text)
    seconds: float  # wall time from the prefill to the last token

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else float("inf")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> int | None:
    """Validate the sampling settings (ValueError naming the bad one); a top_k above the vocabulary
    is clamped to it, with a warning. Returns the top_k to use."""
    check_sampling_args(temperature, top_k, top_p)
    if top_k is not None and top_k > vocab_size:
        log.warning("top_k=%d is larger than the vocabulary (%d tokens): using top_k=%d",
                    top_k, vocab_size, vocab_size)
        return vocab_size
    return top_k


def stream_sample(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  use_cache: bool = True, generator: torch.Generator | None = None,
                  write: Callable[[str], None] = lambda s: None,
                  autocast: contextlib.AbstractContextManager | None = None) -> Sample:
    """Generate one continuation of prompt_ids, calling write(piece) with each newly completed
    piece of text as soon as its token is made."""
    device = model.wte.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    decoder = StreamDecoder(tokenizer)
    new_ids: list[int] = []
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            write(piece)

    synchronize(device)
    start = time.perf_counter()
    with autocast or contextlib.nullcontext():
        for tok in generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, use_cache=use_cache, generator=generator):
            token_id = int(tok[0, 0])  # .item() waits for the GPU: the token is needed to print it
            new_ids.append(token_id)
            emit(decoder.push(token_id))
    emit(decoder.flush())
    synchronize(device)
    seconds = time.perf_counter() - start
    return Sample(list(prompt_ids), new_ids, tokenizer.decode(new_ids), "".join(pieces), seconds)

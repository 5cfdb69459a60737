"""Autoregressive generation as small pure functions: sample one token from logits, and a generator
that prefills a KV cache with the prompt and then decodes one token at a time.

Past block_size tokens the context is cropped to the last block_size tokens and the cache is filled
again, which is exactly what recomputing the cropped sequence sees (the model never attends further
back than it was trained to). With RoPE the refilled positions restart at 0; attention scores see
only distances between tokens, so that changes nothing.

Shapes: B batch, T time, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy when temperature is 0; returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate_tokens(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                    generator: torch.Generator | None = None,
                    with_logits: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield max_new_tokens new tokens, each (B, 1), continuing the prompt idx (B, T); with
    with_logits, yield (token, logits (B, V) it was picked from) pairs instead."""
    check_sampling_args(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
    block_size = model.config.block_size

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_logits(logits, temperature, top_k, top_p, generator)

    tokens = idx
    if not use_cache:  # recompute the whole (cropped) sequence for every new token
        for _ in range(max_new_tokens):
            logits, _ = model(tokens[:, -block_size:])  # (B, T, V)
            nxt = pick(logits[:, -1, :])
            tokens = torch.cat([tokens, nxt], dim=1)
            yield (nxt, logits[:, -1, :]) if with_logits else nxt
        return

    caches = model.new_caches(idx.shape[0])
    context = tokens[:, -block_size:]
    logits = model.step(context, caches, start_pos=0)  # prefill: (B, V)
    pos = context.shape[1]
    for i in range(max_new_tokens):
        nxt = pick(logits)
        tokens = torch.cat([tokens, nxt], dim=1)
        yield (nxt, logits) if with_logits else nxt
        if i == max_new_tokens - 1:
            break
        if pos < block_size:
            logits = model.step(nxt, caches, start_pos=pos)  # decode one token: (B, V)
            pos += 1
        else:  # the context is full: refill the cache with the last block_size tokens
            for cache in caches:
                cache.length = 0
            logits = model.step(tokens[:, -block_size:], caches, start_pos=0)

"""Leakage test 3, by generation: greedy decoding with the KV cache must give the same tokens as
recomputing the whole sequence for every new token.

The cache stores the keys and values of each position as they were computed when that position
was the newest, i.e. without any later token. Recomputation rebuilds them with the whole sequence
present. The two can only agree if no position ever uses what comes after it: with the mask off
the recomputed states of earlier positions see later tokens, and the two decodings drift apart.

Besides the greedy tokens (what a user sees) we compare the next-token logits of both paths on the
same prefixes, which shows a disagreement even when it is too small to flip an argmax.

Shapes: T prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model import GPT


@dataclass
class ConsistencyResult:
    prompt_len: int
    cached: list[int]  # greedy new tokens, KV cache
    recomputed: list[int]  # greedy new tokens, full recomputation
    max_logit_diff: float  # over the N steps, on the cached tokens' prefixes

    @property
    def first_mismatch(self) -> int | None:
        return next((i for i, (a, b) in enumerate(zip(self.cached, self.recomputed, strict=True)) if a != b), None)

    @property
    def equal(self) -> bool:
        return self.cached == self.recomputed


@torch.no_grad()
def cache_consistency(model: GPT, idx: torch.Tensor, max_new_tokens: int,
                      autocast: contextlib.AbstractContextManager | None = None) -> ConsistencyResult:
    """Greedy-decode max_new_tokens after idx (1, T) both ways and compare. T + max_new_tokens must
    fit in the context, so that both paths see exactly the same positions."""
    model.eval()
    T = idx.shape[1]
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"cache consistency: {T} prompt + {max_new_tokens} new tokens exceed the context "
                         f"of {model.config.block_size}; use a shorter prompt or fewer tokens")
    with autocast or contextlib.nullcontext():
        cached = model.generate(idx, max_new_tokens, temperature=0.0, use_cache=True)  # (1, T + N)
        recomputed = model.generate(idx, max_new_tokens, temperature=0.0, use_cache=False)  # (1, T + N)

        # Next-token logits both ways on the same (cached) prefixes.
        caches = model.new_caches(1)
        step_logits = [model.step(cached[:, :T], caches, start_pos=0)]  # prefill: (1, V)
        for i in range(T, T + max_new_tokens - 1):
            step_logits.append(model.step(cached[:, i:i + 1], caches, start_pos=i))  # (1, V)
        full_logits = [model(cached[:, :i])[0][:, -1, :] for i in range(T, T + max_new_tokens)]  # N x (1, V)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(step_logits, full_logits, strict=True))
    return ConsistencyResult(T, cached[0, T:].tolist(), recomputed[0, T:].tolist(), diff)

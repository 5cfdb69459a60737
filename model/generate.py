"""Autoregressive generation as small pure functions: sample one token from logits, and a generator
that prefills a KV cache with the prompt and then decodes one token at a time.

Two ways to run the same steps:
  - eager (the default): the prefill and each decode step are `GPT.step`, which appends to the
    cache and attends over its valid positions only (the least work per token in eager mode);
  - compiled (`compile_for_generation(model)`, then generate as usual): the prefill is `GPT.step`
    compiled with a dynamic prompt length, and each decode step is `GPT.decode`, the static-shape
    form (position as a tensor, attention over the whole cache under a length mask), compiled once
    with fixed shapes; on CUDA it is replayed as a CUDA graph.
Both give the same tokens as recomputing the whole sequence, which `use_cache=False` does, eagerly
(tests/test_model_parts.py, tests/test_generate_static.py).

Past block_size tokens the context is cropped to the last block_size tokens and the cache is filled
again, which is exactly what recomputing the cropped sequence sees (the model never attends further
back than it was trained to). With RoPE the refilled positions restart at 0; attention scores see
only distances between tokens, so that changes nothing.

Shapes: B batch, T time, V vocab.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None,
                        vocab_limit: int | None = None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if vocab_limit is not None and vocab_limit < 1:
        raise ValueError(f"vocab_limit must be >= 1 (or None for the whole vocabulary), got {vocab_limit}")


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


@dataclass
class CompiledSteps:
    """What compile_for_generation installs on a model (as `model.compiled_steps`)."""
    prefill: Callable  # GPT.step compiled for any prompt length: (idx (B, T), caches, start_pos) -> (B, V)
    decode: Callable  # GPT.decode compiled for T = 1: (idx (B, 1), caches, positions (1,)) -> (B, V)
    cudagraphs: bool  # decode is replayed as a CUDA graph
    # One set of caches per (batch, device, dtype), reused by every generation: CUDA graphs replay
    # fixed addresses, and fresh caches would make them record again.
    caches: dict[tuple, list[KVCache]] = field(default_factory=dict)
    in_use: set[tuple] = field(default_factory=set)  # held by a generation still running

    def acquire(self, model: nn.Module, batch_size: int) -> tuple[tuple | None, list[KVCache]]:
        """Emptied caches for one generation and the key to release them with; a generation that
        runs while another holds the shared set (two interleaved generators) gets its own."""
        fresh = model.new_caches(batch_size)
        key = (batch_size, fresh[0].k.device, fresh[0].k.dtype)
        if key in self.in_use:
            return None, fresh
        if key not in self.caches:
            if self.cudagraphs:
                for cache in fresh:  # the graph reads and writes them in place, at fixed addresses
                    torch._dynamo.mark_static_address(cache.k)
                    torch._dynamo.mark_static_address(cache.v)
            self.caches[key] = fresh
        for cache in self.caches[key]:
            cache.length = 0
        self.in_use.add(key)
        return key, self.caches[key]

    def release(self, key: tuple | None) -> None:
        self.in_use.discard(key)


def compile_isa_safe(fn: Callable, **kwargs) -> Callable:
    """torch.compile, without Inductor's on-disk graph caches when ATEN_CPU_CAPABILITY is set: their
    key leaves out the vector ISA that variable makes Inductor generate for (torch 2.13), and a graph
    cached under another ISA then runs and returns garbage (a 6-layer model's greedy margins of 1e16)."""
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    return torch.compile(fn, **kwargs)


def compile_for_generation(model: nn.Module, cudagraphs: bool | None = None) -> nn.Module:
    """Compile what generation runs and install it as `model.compiled_steps`: generate_tokens (and
    so GPT.generate) then uses it, in eval mode; the weights are shared, nothing is copied, and
    model(...) and model.step stay eager. cudagraphs (default: on CUDA) replays the decode step as a
    CUDA graph, what torch.compile's mode="reduce-overhead" does. The first generation compiles: a
    prefill (again for a prompt that fills the context), and one decode step for every position.
    Without CUDA graphs, Inductor's C++ wrapper replaces its Python one around the decode step,
    which runs once per token (about 0.13 ms a token less on a 6-layer model on CPU)."""
    if cudagraphs is None:
        cudagraphs = next(model.parameters()).device.type == "cuda"
    # (A CUDA graph replay bypasses the wrapper anyway.)
    options = {"triton.cudagraphs": True} if cudagraphs else {"cpp_wrapper": True}
    model.compiled_steps = CompiledSteps(
        prefill=compile_isa_safe(model.step, dynamic=True),
        decode=compile_isa_safe(model.decode, fullgraph=True, dynamic=False, options=options),
        cudagraphs=cudagraphs,
    )
    return model


@torch.no_grad()
def generate_tokens(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                    generator: torch.Generator | None = None, with_logits: bool = False,
                    vocab_limit: int | None = None,
                    stop_id: int | None = None) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield max_new_tokens new tokens, each (B, 1), continuing the prompt idx (B, T); with
    with_logits, yield (token, logits (B, V) it was picked from) pairs instead.

    vocab_limit: pick only ids below it (the logits are cut to (B, vocab_limit)), for a model whose
    vocabulary is padded past the tokenizer's (GPT-2's 50257 ids in a 50304-row table): the padding
    rows are never trained, and their ids would have no text.
    stop_id: end as soon as that token is drawn, without yielding it (the end-of-text token: the text
    is over). One sequence only (B = 1), and each token is read back to compare: a host sync a token."""
    check_sampling_args(temperature, top_k, top_p, vocab_limit)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
    if stop_id is not None:
        if idx.shape[0] != 1:
            raise ValueError(f"stop_id ends one sequence; the prompt is a batch of {idx.shape[0]} (rows would end apart)")
        tokens = generate_tokens(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 use_cache=use_cache, generator=generator, with_logits=with_logits,
                                 vocab_limit=vocab_limit)
        for out in tokens:
            if int((out[0] if with_logits else out)[0, 0]) == stop_id:
                tokens.close()  # releases a compiled model's caches now
                return
            yield out
        return
    block_size = model.config.block_size
    # Compiled for eval: in train mode (dropout) the eager steps run.
    compiled: CompiledSteps | None = None if model.training else getattr(model, "compiled_steps", None)

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]  # (B, vocab_limit)
        return sample_logits(logits, temperature, top_k, top_p, generator), logits

    if not use_cache:  # recompute the whole (cropped) sequence for every new token, eagerly
        tokens = idx
        for _ in range(max_new_tokens):
            logits, _ = model(tokens[:, -block_size:])  # (B, T, V)
            nxt, logits = pick(logits[:, -1, :])
            tokens = torch.cat([tokens, nxt], dim=1)
            yield (nxt, logits) if with_logits else nxt
        return

    if compiled:
        key, caches = compiled.acquire(model, idx.shape[0])
        try:
            yield from _cached(model, idx, max_new_tokens, caches, compiled, pick, with_logits)
        finally:  # also when the caller stops early (the generator is closed)
            compiled.release(key)
    else:
        yield from _cached(model, idx, max_new_tokens, model.new_caches(idx.shape[0]), None, pick, with_logits)


def _cached(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, caches: list[KVCache],
            compiled: CompiledSteps | None, pick: Callable, with_logits: bool) -> Iterator:
    """generate_tokens with the KV cache: prefill with the prompt, then one decode step per token."""
    block_size = model.config.block_size
    prefill = compiled.prefill if compiled else model.step
    # A fresh contiguous tensor (not a view): the compiled prefill guards on strides and on being a
    # view, so one compiled prefill then serves every prompt and every refill.
    context = idx[:, -block_size:].clone(memory_format=torch.contiguous_format)  # (B, T)
    logits = prefill(context, caches, start_pos=0)  # (B, V)
    pos = context.shape[1]  # where the next token goes
    if compiled:  # the decode step's position, kept on the device and advanced there: no host sync
        positions = torch.tensor([pos], device=idx.device)  # (1,)
    history = [idx]  # every token so far, concatenated only when the context must be refilled
    for i in range(max_new_tokens):
        nxt, logits = pick(logits)
        # A CUDA graph's next replay overwrites its outputs: hand out a copy of the logits.
        yield (nxt, logits.clone() if compiled and compiled.cudagraphs else logits) if with_logits else nxt
        if i == max_new_tokens - 1:
            break
        history.append(nxt)
        if pos < block_size and compiled:
            if compiled.cudagraphs:  # the last step's outputs are dead: let the graph reuse them
                torch.compiler.cudagraph_mark_step_begin()
            logits = compiled.decode(nxt, caches, positions)  # (B, V)
            positions += 1
            pos += 1
        elif pos < block_size:
            logits = model.step(nxt, caches, start_pos=pos)  # decode one token: (B, V)
            pos += 1
        else:  # the context is full: refill the cache with the last block_size tokens
            tokens = torch.cat(history, dim=1)
            history = [tokens]
            for cache in caches:
                cache.length = 0
            logits = prefill(tokens[:, -block_size:].clone(memory_format=torch.contiguous_format), caches,
                             start_pos=0)

"""Autoregressive generation as small pure functions: sample one token from logits, and a generator
that prefills a KV cache with the prompt and then decodes one token at a time, in one of two ways:
  - eager (the default): the prefill and each decode step are `GPT.step`, which appends to the
    cache and attends over its valid positions only (the least work per token in eager mode);
  - compiled (`compile_for_generation(model)`): the prefill is `GPT.step` compiled with a dynamic
    prompt length, and each decode step is `GPT.decode`, the static-shape form, compiled once with
    fixed shapes (and replayed as a CUDA graph on CUDA).
Both give the same tokens as recomputing the whole sequence (`use_cache=False`).

Past block_size tokens the context is cropped to the last block_size tokens and the cache is filled
again, which is exactly what recomputing the cropped sequence sees. With RoPE the refilled positions
restart at 0; attention scores see only distances between tokens, so that changes nothing.

Shapes: B batch, T time, V vocab.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
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
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # drop, in vocabulary order
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)  # (B, 1)


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

    @contextmanager
    def borrow(self, model: nn.Module, batch_size: int) -> Iterator[list[KVCache]]:
        """The shared caches for one generation; one that runs while another holds them (two
        interleaved generators) gets its own."""
        fresh = model.new_caches(batch_size)
        key = (batch_size, fresh[0].k.device, fresh[0].k.dtype)
        if key in self.in_use:
            yield fresh
            return
        if key not in self.caches:
            if self.cudagraphs:
                for cache in fresh:  # the graph reads and writes them in place, at fixed addresses
                    torch._dynamo.mark_static_address(cache.k)
                    torch._dynamo.mark_static_address(cache.v)
            self.caches[key] = fresh
        self.in_use.add(key)
        try:
            yield self.caches[key]
        finally:  # also when the caller stops early (the generator is closed)
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
    """Compile the prefill and the decode step and install them as `model.compiled_steps`, which
    generation then uses in eval mode (weights shared; model(...) and model.step stay eager).
    cudagraphs (default: on CUDA) replays the decode step as a CUDA graph, as mode="reduce-overhead"
    does; without them, Inductor's C++ wrapper replaces its Python one around the decode step, which
    runs once per token (about 0.13 ms a token less on a 6-layer model on CPU)."""
    if cudagraphs is None:
        cudagraphs = next(model.parameters()).device.type == "cuda"
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

    vocab_limit: pick only ids below it, for a vocabulary padded past the tokenizer's (GPT-2's 50257
    ids in a 50304-row table): the padding rows are never trained, and their ids have no text.
    stop_id: end as soon as that token is drawn, without yielding it (the end-of-text token). One
    sequence only (B = 1), and each token is read back to compare: a host sync a token."""
    check_sampling_args(temperature, top_k, top_p, vocab_limit)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}")
    if stop_id is not None and idx.shape[0] != 1:
        raise ValueError(f"stop_id ends one sequence; the prompt is a batch of {idx.shape[0]} (rows would end apart)")
    block_size = model.config.block_size
    # Compiled for eval: in train mode (dropout) the eager steps run.
    compiled: CompiledSteps | None = None if model.training else getattr(model, "compiled_steps", None)
    prefill = compiled.prefill if compiled else model.step
    if not use_cache:
        borrowed = nullcontext(None)
    else:
        borrowed = compiled.borrow(model, idx.shape[0]) if compiled else nullcontext(model.new_caches(idx.shape[0]))
    history = [idx]  # every token so far, concatenated only when the context must be (re)filled
    pos = None  # where the next token goes in the cache; None: the cache must be (re)filled first
    with borrowed as caches:
        for _ in range(max_new_tokens):
            if not use_cache:  # recompute the whole (cropped) sequence for every new token, eagerly
                history = [torch.cat(history, dim=1)]
                logits = model(history[0][:, -block_size:])[0][:, -1, :]  # (B, V)
            elif pos is None or pos == block_size:  # (re)fill the cache with the last block_size tokens
                history = [torch.cat(history, dim=1)]
                for cache in caches:
                    cache.length = 0
                # A fresh contiguous tensor (not a view): the compiled prefill guards on strides and
                # on being a view, so one compiled prefill serves every prompt and every refill.
                context = history[0][:, -block_size:].clone(memory_format=torch.contiguous_format)  # (B, T)
                logits = prefill(context, caches, start_pos=0)  # (B, V)
                pos = context.shape[1]
                if compiled:  # the decode step's position, kept on the device and advanced there: no host sync
                    positions = torch.tensor([pos], device=idx.device)  # (1,)
            elif compiled:
                if compiled.cudagraphs:  # the last step's outputs are dead: let the graph reuse them
                    torch.compiler.cudagraph_mark_step_begin()
                logits = compiled.decode(history[-1], caches, positions)  # the last token (B, 1) -> (B, V)
                positions += 1
                pos += 1
            else:
                logits = model.step(history[-1], caches, start_pos=pos)  # (B, V)
                pos += 1
            if vocab_limit is not None:
                logits = logits[:, :vocab_limit]  # (B, vocab_limit)
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if stop_id is not None and int(nxt[0, 0]) == stop_id:
                return
            # A CUDA graph's next replay overwrites its outputs: hand out a copy of the logits.
            yield (nxt, logits.clone() if compiled and compiled.cudagraphs else logits) if with_logits else nxt
            history.append(nxt)

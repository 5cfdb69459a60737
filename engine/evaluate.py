"""Evaluation: the loss over fixed batches, the tokenizer-independent bits per byte, and a short
generated sample.

The batches are drawn once, before training, with a fixed seed, so every eval of a run (and of a
resumed run) scores the same tokens: the curve moves because the model changes, not the data.
Under torchrun each rank scores its share of the batches and the sums are all-reduced, which gives
the number one process would get. Evaluation touches no training RNG, so it cannot change what a
run learns (exact resume relies on that).

Loss is in nats per token, so it depends on the tokenizer: a char model and a BPE model cannot be
compared by it. Bits per byte can (nanochat reports it): the same total surprise, divided by the
UTF-8 bytes of the text scored instead of its tokens,

    bpb = (mean loss in nats per token) * tokens / bytes / ln 2,

with tokens and bytes counted once over the eval targets (`target_bytes`). Perplexity is exp(loss).

Progress: on a terminal an eval shows a bar; elsewhere an eval that takes longer than
PROGRESS_EVERY_S logs a line every PROGRESS_EVERY_S seconds (batches done, seconds left) and one
when it ends, so a long whole-split eval in a batch job is not mistaken for a hang.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data.loader import val_batches
from data.progress import Progress

from .runtime import Runtime

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # the fixed batches' seed, independent of the training seed
PROGRESS_EVERY_S = 30.0  # log-line progress of a long eval outside a terminal
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def fixed_batches(prepared_dir: Path, split: str, batch_size: int, block_size: int, n_batches: int,
                  rt: Runtime) -> Batches:
    """This rank's share of the fixed eval batches, each (x, y) of shape (B, T): n_batches random
    windows batches (the same for any world size), or with n_batches=-1 the whole split in order."""
    if n_batches == 0:
        return []
    if n_batches < 0:
        return list(val_batches(prepared_dir, split, batch_size, block_size, None, device=rt.device,
                                rank=rt.rank, world_size=rt.world_size))
    batches = list(val_batches(prepared_dir, split, batch_size, block_size, n_batches, device=rt.device,
                               seed=EVAL_SEED))
    return batches[rt.rank::rt.world_size]


@torch.no_grad()
def estimate_loss(model: nn.Module, batches: Batches, rt: Runtime, lockstep: bool = False,
                  desc: str | None = None) -> float:
    """Mean per-token loss over every rank's batches; call on every rank. lockstep: every rank must
    run the same number of forward passes (FSDP all-gathers weights in each), so ranks with fewer
    batches run extra ones whose loss is discarded. desc: show progress under that name (rank 0)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # (loss * tokens, tokens)
    n_passes = len(batches)
    if lockstep and rt.distributed:
        n = torch.tensor([len(batches)], device=rt.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n_passes = int(n.item())
    dummy = torch.zeros((1, 1), dtype=torch.long, device=rt.device)  # (B, T) for a rank with no batch
    progress = Progress(f"eval {desc}", n_passes, unit="batches", enabled=desc is not None and rt.is_main,
                        every_s=PROGRESS_EVERY_S, logger=log)
    for i in range(n_passes):
        x, y = batches[i] if i < len(batches) else batches[0] if batches else (dummy, dummy)
        with rt.autocast():
            _, loss = model(x, y)
        if i < len(batches):
            sums += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=rt.device)])
        progress.update(1)
    if rt.distributed:
        dist.all_reduce(sums)
    progress.close()
    model.train(was_training)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


def target_bytes(batches: Batches, decode: Callable[[list[int]], str], rt: Runtime) -> tuple[int, int]:
    """(tokens, UTF-8 bytes) of the targets of every rank's batches, each row decoded as one text:
    the denominators of bits per byte. Call on every rank (under torchrun the counts are summed)."""
    tokens = n_bytes = 0
    for _, y in batches:
        for row in y.tolist():  # (T,) ids each
            tokens += len(row)
            n_bytes += len(decode(row).encode("utf-8"))
    if rt.distributed:
        counts = torch.tensor([tokens, n_bytes], device=rt.device, dtype=torch.float64)
        dist.all_reduce(counts)
        tokens, n_bytes = (int(v) for v in counts.tolist())
    return tokens, n_bytes


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """bpb = (mean loss in nats per token) * tokens / bytes / ln 2: the bits the model needs per byte
    of the text it scored, whatever its tokenizer. nan when there are no bytes."""
    return loss * tokens / n_bytes / math.log(2) if n_bytes > 0 else float("nan")


def perplexity(loss: float) -> float:
    """exp(mean loss in nats per token); inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def generate_sample(model: nn.Module, prompt: list[int], n_tokens: int, rt: Runtime, seed: int,
                    vocab_limit: int | None = None) -> list[int]:
    """Token ids continuing prompt, drawn with a generator of its own (the global RNG stays untouched).
    vocab_limit: draw only ids below it, the tokenizer's size when model.vocab_size is padded past it."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=rt.device)  # (1, T)
    unshard = getattr(model, "unshard", None)  # FSDP2: step() bypasses the root's forward hook
    if unshard is not None:
        unshard()
    with rt.autocast():
        out = model.generate(idx, n_tokens, temperature=1.0, generator=gen, vocab_limit=vocab_limit)  # (1, T + n)
    if unshard is not None:
        model.reshard()
    model.train(was_training)
    return out[0, len(prompt):].tolist()

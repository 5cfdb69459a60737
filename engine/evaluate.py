"""Evaluation: the loss over fixed batches, and a short generated sample.

The batches are drawn once, before training, with a fixed seed, so every eval of a run (and of a
resumed run) scores the same tokens: the curve moves because the model changes, not the data.
Under torchrun each rank scores its share of the batches and the sums are all-reduced, which gives
the number one process would get. Evaluation touches no training RNG, so it cannot change what a
run learns (exact resume relies on that).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data.loader import val_batches

from .runtime import Runtime

EVAL_SEED = 1234  # the fixed batches' seed, independent of the training seed
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
def estimate_loss(model: nn.Module, batches: Batches, rt: Runtime, lockstep: bool = False) -> float:
    """Mean per-token loss over every rank's batches; call on every rank. lockstep: every rank must
    run the same number of forward passes (FSDP all-gathers weights in each), so ranks with fewer
    batches run extra ones whose loss is discarded."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # (loss * tokens, tokens)
    n_passes = len(batches)
    if lockstep and rt.distributed:
        n = torch.tensor([len(batches)], device=rt.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n_passes = int(n.item())
    dummy = torch.zeros((1, 1), dtype=torch.long, device=rt.device)  # (B, T) for a rank with no batch
    for i in range(n_passes):
        x, y = batches[i] if i < len(batches) else batches[0] if batches else (dummy, dummy)
        with rt.autocast():
            _, loss = model(x, y)
        if i < len(batches):
            sums += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=rt.device)])
    if rt.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


@torch.no_grad()
def generate_sample(model: nn.Module, prompt: list[int], n_tokens: int, rt: Runtime, seed: int) -> list[int]:
    """Token ids continuing prompt, drawn with a generator of its own (the global RNG stays untouched)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=rt.device)  # (1, T)
    unshard = getattr(model, "unshard", None)  # FSDP2: step() bypasses the root's forward hook
    if unshard is not None:
        unshard()
    with rt.autocast():
        out = model.generate(idx, n_tokens, temperature=1.0, generator=gen)  # (1, T + n)
    if unshard is not None:
        model.reshard()
    model.train(was_training)
    return out[0, len(prompt):].tolist()

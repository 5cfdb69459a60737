"""Evaluation: the loss over fixed batches, the tokenizer-independent bits per byte, and a short sample.

The batches are drawn once, with a fixed seed, so every eval of a run (resumed or not) scores the same
tokens; under torchrun each rank scores its share and the sums are all-reduced: one process's number.
Evaluation touches no training RNG (exact resume relies on that). Loss is in nats per target token, so
it depends on the tokenizer; bits per byte (nanochat's) does not: the nats of the targets that stand for
text over ln 2 times their UTF-8 bytes, read from `Tokenizer.token_bytes` (a special token has 0 bytes
and is left out; a token holding part of a character counts its own bytes). Perplexity is exp(loss).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.loader import val_batches
from data.progress import Progress

from .runtime import Runtime

log = logging.getLogger(__name__)

EVAL_SEED = 1234  # the fixed batches' seed, independent of the training seed
# Off a terminal, a long eval logs its progress this often (and at its end): a batch job's eval is no "hang".
PROGRESS_EVERY_S = 30.0
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def fixed_batches(prepared_dir: Path, split: str, batch_size: int, block_size: int, n_batches: int,
                  rt: Runtime) -> Batches:
    """This rank's share of the fixed eval batches, each (x, y) (B, T): n_batches of random windows (the
    same for any world size), or with n_batches=-1 the whole split in order."""
    if n_batches == 0:
        return []
    if n_batches < 0:
        return list(val_batches(prepared_dir, split, batch_size, block_size, None, device=rt.device,
                                rank=rt.rank, world_size=rt.world_size))
    return list(val_batches(prepared_dir, split, batch_size, block_size, n_batches, device=rt.device,
                            seed=EVAL_SEED))[rt.rank::rt.world_size]


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per target token, over every target (nan without batches)
    bpb: float | None  # bits per byte of the targets with bytes; None without a byte table

    def metrics(self, prefix: str) -> dict[str, float | None]:
        """{prefix + "loss", "ppl", "bpb"}: the metrics.jsonl / W&B keys (val/loss, val/final_loss, ...).
        Perplexity: exp(loss), inf where that overflows a float."""
        ppl = math.exp(self.loss) if self.loss < 700 else math.inf
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": ppl, f"{prefix}bpb": self.bpb}


@torch.no_grad()
def estimate_loss(model: nn.Module, batches: Batches, rt: Runtime, lockstep: bool = False,
                  desc: str | None = None, token_bytes: torch.Tensor | None = None) -> EvalResult:
    """Mean per-token loss over every rank's batches, and with token_bytes (Tokenizer.token_bytes as a
    (vocab,) tensor on rt.device) bits per byte; call on every rank. lockstep: every rank runs as many
    forwards (FSDP all-gathers weights in each), a rank short of batches discarding the extra ones'
    loss. desc: show progress under that name (rank 0)."""
    was_training = model.training
    model.eval()
    # (nats of all targets, targets, nats of the targets with bytes, their bytes)
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)
    n_passes = int(rt.max_over_ranks(len(batches))) if lockstep else len(batches)
    dummy = torch.zeros((1, 1), dtype=torch.long, device=rt.device)  # (B, T) for a rank with no batch
    with Progress(f"eval {desc}", n_passes, unit="batches", enabled=desc is not None and rt.is_main,
                  every_s=PROGRESS_EVERY_S, logger=log) as progress:
        for i in range(n_passes):
            x, y = batches[i] if i < len(batches) else batches[0] if batches else (dummy, dummy)
            with rt.autocast():
                logits, loss = model(x, y) if token_bytes is None else model(x)  # logits (B, T, V)
            if i < len(batches):
                sums += _batch_sums(logits, loss, y, token_bytes)
            progress.update(1)
    if rt.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    total, tokens, counted, n_bytes = sums.tolist()
    loss = total / tokens if tokens > 0 else float("nan")
    return EvalResult(loss, None if token_bytes is None else bits_per_byte(counted, n_bytes))


def _batch_sums(logits: torch.Tensor, loss: torch.Tensor | None, y: torch.Tensor,
                token_bytes: torch.Tensor | None) -> torch.Tensor:
    """estimate_loss's four float64 sums for a batch: from the model's mean loss, or each target's (byte table)."""
    n = torch.tensor(float(y.numel()), device=y.device, dtype=torch.float64)
    if token_bytes is None:
        return torch.stack([loss.double() * n, n, n.new_zeros(()), n.new_zeros(())])
    nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").double()  # (B*T,)
    n_bytes = token_bytes[y.flatten()]  # (B*T,)
    return torch.stack([nats.sum(), n, nats[n_bytes > 0].sum(), n_bytes.sum().double()])


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """bpb = nats / (ln 2 * bytes), the nats summed over the targets that stand for text; nan without bytes."""
    return nats / (math.log(2) * n_bytes) if n_bytes > 0 else float("nan")


@torch.no_grad()
def generate_sample(model: nn.Module, prompt: list[int], n_tokens: int, rt: Runtime, seed: int,
                    vocab_limit: int | None = None, stop_id: int | None = None) -> list[int]:
    """Token ids continuing prompt, drawn with a generator of its own (the global RNG stays untouched).
    vocab_limit: draw only ids below it (the tokenizer's size, under a padded vocabulary). stop_id: the
    sample ends before the first one, though all n_tokens are drawn: under FSDP every rank runs the same forwards."""
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
    ids = out[0, len(prompt):].tolist()
    return ids[:ids.index(stop_id)] if stop_id in ids else ids

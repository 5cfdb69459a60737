"""Batches of random token windows from prepared token files; DDP-aware and resumable.

`BatchLoader.next_batch()` returns (x, y), both (B, T) int64, y being x shifted by one token, from
windows at random offsets (as nanoGPT's get_batch). Batch i's offsets come from a generator seeded
with (seed, rank, i), so DDP ranks draw different windows without talking, and the loader's whole
state is the batch counter, the same on every rank: rank 0's checkpoint resumes all of them.
`val_batches()` yields fixed evaluation batches (the same at every eval), or the whole split in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data.config import DataError
from data.prepared import REBUILD_HINT, SPLITS, read_meta, split_problem


def _open_split(prepared_dir: str | Path, split: str, block_size: int) -> tuple[Path, np.dtype, int]:
    """(path, dtype, n_tokens) of a split, checked to hold at least one window."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not valid; use train or val")
    if block_size < 1:
        raise DataError(f"block_size={block_size} must be at least 1")
    meta = read_meta(prepared_dir)  # DataError naming meta.json when it is cut short or corrupt
    # Its size must be what meta.json records: a cut-short file would otherwise be read as data.
    if problem := split_problem(Path(prepared_dir), split, meta):
        raise DataError(f"prepared data {problem}; {REBUILD_HINT}")
    n = meta["tokens"][split]
    if n == 0:
        raise DataError(f"the {split} split of {prepared_dir} is empty; raise data.val_fraction or add text")
    if n < block_size + 1:
        raise DataError(f"the {split} split of {prepared_dir} has {n} tokens but block_size={block_size} needs "
                        f"at least {block_size + 1}; use a smaller model.block_size or more data")
    return Path(prepared_dir) / f"{split}.bin", np.dtype(meta["dtype"]), n


def _seed(*parts: int) -> int:
    # SeedSequence mixes the parts well: (seed=1, rank=0) and (seed=0, rank=1) do not collide.
    lo, hi = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(hi) << 32 | int(lo)) & ((1 << 63) - 1)


def _batch(path: Path, dtype: np.dtype, n: int, starts: np.ndarray, block_size: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (B, T) int64 on device, from the windows of T+1 tokens at starts."""
    # A fresh memmap per batch, as nanoGPT: pages read through a long-lived memmap stay counted in
    # the process's memory (RSS grows towards the file size), which looks like a leak on large
    # corpora; opening one costs microseconds.
    data = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    buf = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    # Contiguous copies: callers flatten targets with .view(-1), which a strided slice refuses.
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T), (B, T)
    if device.type == "cuda":
        # Pinned host memory lets the copy run asynchronously with the previous step's compute.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BatchLoader:
    """Random (x, y) windows from one split of a prepared directory."""

    def __init__(self, prepared_dir: str | Path, split: str, batch_size: int, block_size: int, *,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.path, self.dtype, self.n_tokens = _open_split(prepared_dir, split, block_size)
        self.split = split
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = 0  # batches drawn so far (the whole resumable state)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, T) int64 on the loader's device."""
        g = torch.Generator().manual_seed(_seed(self.seed, self.rank, self.step))
        starts = torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=g)
        self.step += 1
        return _batch(self.path, self.dtype, self.n_tokens, starts.numpy(), self.block_size, self.device)

    def state_dict(self) -> dict[str, int]:
        """Plain ints (safe for torch.load(weights_only=True)); the same on every rank."""
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the loader that produced state stopped."""
        self.step = int(state["step"])
        self.seed = int(state["seed"])


def val_batches(prepared_dir: str | Path, split: str, batch_size: int, block_size: int, n_batches: int | None, *,
                device: str | torch.device = "cpu", seed: int = 1234, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches: n_batches fixed random batches (the same on every call, so eval losses
    compare across steps), or with n_batches=None the whole split in order as consecutive
    non-overlapping windows (the last batch may be smaller), every world_size-th batch per rank.
    Bad arguments raise DataError at the call, not at the first batch."""
    path, dtype, n = _open_split(prepared_dir, split, block_size)
    device = torch.device(device)
    if n_batches is None:
        starts = np.arange(0, n - block_size, block_size)  # every window has its T+1 tokens
        batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)][rank::world_size]
    else:
        if n_batches < 1:
            raise DataError(f"n_batches={n_batches} must be at least 1, or None for the whole split")
        g = torch.Generator().manual_seed(_seed(seed, rank))
        batches = list(torch.randint(n - block_size, (n_batches, batch_size), generator=g).numpy())
    return (_batch(path, dtype, n, b, block_size, device) for b in batches)

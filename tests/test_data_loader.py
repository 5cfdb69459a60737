"""BatchLoader and val_batches: shapes, shift, determinism, resume, DDP ranks, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig, DataError
from data.loader import BatchLoader, val_batches
from data.prepare import prepare

TEXT = "".join(f"{i:05d} the cat sat on the mat; ünïcode ok\n" for i in range(300))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return prepare(DataConfig(source="files", path=str(root / "corpus.txt"), cache_dir=str(root / "cache")),
                   progress=False)


def draw(loader: BatchLoader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(k)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


def test_batches_are_shifted_windows_of_the_split(prepared):
    data = np.fromfile(prepared / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = BatchLoader(prepared, "train", batch_size=6, block_size=16).next_batch()
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert y.is_contiguous()
    for row in x.numpy():  # every row is a real window of train.bin
        starts = np.flatnonzero(data[: len(data) - 16] == row[0])
        assert any(np.array_equal(data[s : s + 16], row) for s in starts)


def test_same_seed_same_batches_different_seed_different(prepared):
    a = draw(BatchLoader(prepared, "train", 4, 8, seed=3), 5)
    assert same(a, draw(BatchLoader(prepared, "train", 4, 8, seed=3), 5))
    assert not same(a, draw(BatchLoader(prepared, "train", 4, 8, seed=4), 5))


def test_resume_from_state_draws_the_uninterrupted_batches(prepared):
    straight = BatchLoader(prepared, "train", 4, 8, seed=7)
    expected = draw(straight, 10)
    first = BatchLoader(prepared, "train", 4, 8, seed=7)
    head = draw(first, 6)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as in a checkpoint
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = BatchLoader(prepared, "train", 4, 8, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert same(head + draw(resumed, 4), expected)


def test_ranks_draw_different_windows_and_resume_from_rank0_state(prepared):
    r0 = BatchLoader(prepared, "train", 4, 8, seed=1, rank=0, world_size=2)
    r1 = BatchLoader(prepared, "train", 4, 8, seed=1, rank=1, world_size=2)
    b0, b1 = draw(r0, 3), draw(r1, 3)
    assert not any(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(b0, b1, strict=True))
    # Only rank 0 saves; rank 1 restored from it continues its own stream.
    again = BatchLoader(prepared, "train", 4, 8, seed=1, rank=1, world_size=2)
    again.load_state_dict(r0.state_dict())
    assert same(draw(again, 2), draw(r1, 2))


def test_val_batches_fixed_and_whole_split(prepared):
    a = list(val_batches(prepared, "val", 4, 8, n_batches=3))
    assert len(a) == 3 and same(a, list(val_batches(prepared, "val", 4, 8, n_batches=3)))
    assert not same(a, list(val_batches(prepared, "val", 4, 8, n_batches=3, seed=99)))
    data = torch.from_numpy(np.fromfile(prepared / "val.bin", dtype=np.uint16).astype(np.int64))
    full = list(val_batches(prepared, "val", 5, 8, n_batches=None))
    xs = torch.cat([x for x, _ in full])
    n_windows = (len(data) - 1) // 8
    assert xs.shape == (n_windows, 8)
    assert torch.equal(xs.reshape(-1), data[: n_windows * 8])  # in order, no overlap, no gap
    shards = [list(val_batches(prepared, "val", 5, 8, None, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) + len(shards[1]) == len(full)


def test_split_shorter_than_block_is_an_error(prepared):
    n_val = (prepared / "val.bin").stat().st_size // 2
    with pytest.raises(DataError, match=f"has {n_val} tokens but block_size={n_val} needs at least {n_val + 1}; "
                                        "use a smaller model.block_size or more data"):
        BatchLoader(prepared, "val", 2, n_val)
    with pytest.raises(DataError, match="needs at least"):
        val_batches(prepared, "val", 2, n_val, n_batches=1)
    BatchLoader(prepared, "val", 2, n_val - 1).next_batch()  # one window fits exactly


def test_empty_split_and_bad_arguments(prepared, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    (broken / "val.bin").write_bytes(b"")
    # An emptied file that meta.json says holds tokens was cut short: the error names it.
    with pytest.raises(DataError, match=r"broken/val\.bin is truncated: 0 bytes, but meta\.json records \d+ uint16"):
        BatchLoader(broken, "val", 2, 8)
    meta = json.loads((broken / "meta.json").read_text())
    meta["tokens"]["val"] = 0
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="val split .* is empty"):
        BatchLoader(broken, "val", 2, 8)
    with pytest.raises(DataError, match="not valid; use train or val"):
        BatchLoader(prepared, "test", 2, 8)
    with pytest.raises(DataError, match="rank=2"):
        BatchLoader(prepared, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(DataError, match="not a prepared data directory"):
        BatchLoader(tmp_path, "train", 2, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(prepared):
    x, y = BatchLoader(prepared, "train", 4, 8, device="cuda").next_batch()
    assert x.is_cuda and y.is_cuda and torch.equal(x[:, 1:].cpu(), y[:, :-1].cpu())

"""Parallelism, kept apart from the model: wrap a built GPT for DDP or FSDP2, and make the ranks
fail together. (Full state dicts for checkpoints: engine/state.py; gradient-sync toggling:
engine/step.py.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.generate import compile_isa_safe

from .runtime import Runtime


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def wrap_model(model: nn.Module, rt: Runtime, distributed: str) -> tuple[nn.Module, nn.Module]:
    """(train_model, eval_model): what the training step calls (compiled, and wrapped in DDP, or
    sharded with FSDP2) and what evaluation calls (the same without the DDP wrapper, whose forward
    is for training). `model` itself stays the GPT (FSDP2 shards it in place) for sampling and saving."""
    if rt.distributed and distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # Shard each block, then the root (embeddings, head): one all-gather per block in forward,
        # freed after it. Gradients are reduced in fp32 whatever the compute dtype.
        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
        for block in model.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    eval_model = compile_isa_safe(model) if rt.compile else model
    train_model = eval_model
    if rt.distributed and distributed == "ddp":
        ids = [rt.local_rank] if rt.device_type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(eval_model, device_ids=ids)
    return train_model, eval_model


def gather_objects(obj: object, rt: Runtime) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in one process)."""
    if not rt.distributed:
        return [obj]
    out: list = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


# ---- failing together ----------------------------------------------------------------------------
# A rank that raises while the others wait in a collective would leave them waiting until the
# process-group timeout. Where one rank works alone (rank 0 saving, choosing the checkpoint to
# resume), the outcome is shared instead of a bare barrier: if any rank failed, every rank raises at
# once, the failed one its own error, the others RankFailed with its one-line message. Elsewhere a
# failed rank exits, and the others' next collective fails at once (gloo: "Connection closed by
# peer"): lost_peer recognises that, and train.py turns it into one line too.
class RankFailed(RuntimeError):
    """Another rank of this job failed; the message is its error, prefixed with its rank."""


def together(rt: Runtime, fn: Callable[[], Any], here: bool = True) -> Any:
    """fn() on the ranks where `here` holds (None elsewhere), then a collective that every rank calls,
    in place of a barrier: if fn raised on any rank, every rank raises, its own error where it has
    one, else RankFailed."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except Exception as e:  # raised again below, on this rank and (as RankFailed) on the others
            error = e
    messages = gather_objects(None if error is None else one_line(error), rt)  # [it] in one process
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RankFailed(f"rank {rank} failed: {message}")
    return result


def one_line(error: BaseException) -> str:
    """An error as the one line a user reads: the message of the errors we raise for users, the
    type and message of anything else."""
    text = " ".join(str(error).split())
    return text if isinstance(error, ValueError | RankFailed) else f"{type(error).__name__}: {text}"


def lost_peer(error: BaseException) -> str | None:
    """Why a collective failed, when it failed because another process of the job died, closed its
    connections or stopped answering (gloo: "Connection closed by peer", timeouts; NCCL errors);
    None for any other error."""
    text = str(error)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
            s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                "gloo/transport", "NCCL")))):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else type(error).__name__)
    return first.split(". ")[0][:160]

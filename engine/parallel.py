"""Parallelism, kept apart from the model: wrap a built GPT for DDP or FSDP2, and tell a lost peer
from other errors. (Full state dicts, and the ranks that fail together: engine/state.py; gradient-sync
toggling: engine/step.py.)
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from model.generate import compile_isa_safe

from .runtime import Runtime


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain GPT inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.parallel.DistributedDataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
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

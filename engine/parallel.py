"""Parallelism, kept apart from the model: wrap a built GPT for DDP or FSDP2, toggle gradient
synchronisation, and move full (unsharded) state dicts in and out.

Checkpoints always hold full, unsharded tensors keyed by parameter name (the optimizer state too),
gathered on save and scattered on load, so a checkpoint written by one process, DDP or FSDP loads
into any of the three.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from model.checkpoint import unwrap_model

from .runtime import Runtime


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
    eval_model = torch.compile(model) if rt.compile else model
    train_model = eval_model
    if rt.distributed and distributed == "ddp":
        ids = [rt.local_rank] if rt.device_type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(eval_model, device_ids=ids)
    return train_model, eval_model


def grad_sync(train_model: nn.Module, enabled: bool) -> None:
    """Gradient all-reduce on this backward or not. Accumulation micro-steps skip it and only the last
    one synchronises: the sum of local gradients is all-reduced once instead of every micro-step."""
    if isinstance(train_model, nn.parallel.DistributedDataParallel):
        train_model.require_backward_grad_sync = enabled
    elif hasattr(unwrap_model(train_model), "set_requires_gradient_sync"):  # FSDP2 module
        unwrap_model(train_model).set_requires_gradient_sync(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (a plain tensor, also under FSDP), clipping to max_norm when > 0."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full model and optimizer state dicts on CPU (collective under FSDP: call on every rank;
    rank 0 gets the tensors). The optimizer's state is keyed by parameter name, not position."""
    model = unwrap_model(model)
    msd = get_model_state_dict(model, options=_FULL)
    if optimizer is None:
        return msd, None
    if not optimizer.state:
        # Before the first step: get_optimizer_state_dict would initialise the state by running a
        # step with lr=0, which bumps Adam's step counter (its bias correction) in the live optimizer.
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                  for g in optimizer.param_groups]
        return msd, {"state": {}, "param_groups": groups}
    return msd, get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load a full, name-keyed optimizer state (from full_state) into this rank's optimizer (its
    shards under FSDP). Weights are loaded into the plain model before wrapping, with load_state_dict."""
    if not optim_sd["state"]:  # saved before the first step: the fresh optimizer is that state already
        return
    set_optimizer_state_dict(unwrap_model(model), optimizer, optim_sd,
                             options=StateDictOptions(full_state_dict=True))


def gather_objects(obj: object, rt: Runtime) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in one process)."""
    if not rt.distributed:
        return [obj]
    out: list = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first(rt: Runtime):
    """Rank 0 runs the body first (e.g. prepares the data), the other ranks after it (a cache hit)."""
    if not rt.is_main:
        rt.barrier()
    yield
    if rt.is_main:
        rt.barrier()

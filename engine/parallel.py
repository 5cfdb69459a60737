"""Parallelism, kept apart from the model: wrap a built GPT for DDP or FSDP2, toggle gradient
synchronisation, move full (unsharded) state dicts in and out, and make the ranks fail together.

Checkpoints always hold full, unsharded tensors keyed by parameter name (the optimizer state too),
gathered on save and scattered on load, so a checkpoint written by one process, DDP or FSDP loads
into any of the three.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

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


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2-sharded model (its parameters are DTensors)."""
    return any(hasattr(p, "full_tensor") for p in unwrap_model(model).parameters())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full model and optimizer state dicts on CPU, the optimizer's keyed by parameter name (not
    position), so that one process, DDP and FSDP read each other's checkpoints. An optimizer made of
    parts (engine/optim.py's MuonAdamW: `parts`, name -> optimizer) gives {part name: its state}.
    Under FSDP this is a collective (call on every rank) that gathers the shards."""
    model = unwrap_model(model)
    sharded = is_sharded(model)
    if sharded:
        # torch.distributed.checkpoint is imported only here: it costs ~0.7 s of start-up otherwise.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        model_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if optimizer is None:
        return model_sd, None
    parts = getattr(optimizer, "parts", None)
    if parts is not None:
        return model_sd, {name: _named_optim_state(model, part, sharded) for name, part in parts.items()}
    return model_sd, _named_optim_state(model, optimizer, sharded)


def _named_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """One optimizer's full state on CPU, keyed by parameter name (optimizer.state_dict() is keyed by
    position across its groups). Under FSDP a collective that gathers the shards."""
    if sharded and optimizer.state:
        # (Before the first step get_optimizer_state_dict would initialise the state by running a step
        # with lr=0, which bumps Adam's step counter (its bias correction) in the live optimizer.)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load a full, name-keyed optimizer state (from full_state) into this rank's optimizer (its
    shards under FSDP), part by part for an optimizer made of parts. A state written by another kind
    of optimizer (adamw vs muon) is refused. Weights are loaded into the plain model before wrapping."""
    parts = getattr(optimizer, "parts", None)
    mine = "+".join(sorted(parts)) if parts is not None else "adamw"
    saved = "adamw" if "state" in optim_sd else "+".join(sorted(optim_sd))
    if saved != mine:
        raise ValueError(f"the checkpoint holds {saved} optimizer state but this run's optimizer is {mine}: "
                         "resume with the optim= it was trained with, or use init_from=<checkpoint> to keep "
                         "its weights with a fresh optimizer")
    if parts is not None:
        for name, part in parts.items():
            load_optimizer_state(model, part, optim_sd[name])
        return
    if not optim_sd["state"]:  # saved before the first step: the fresh optimizer is that state already
        return
    model = unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    missing = set(index) - set(n for g in optim_sd["param_groups"] for n in g["params"])
    if missing:
        raise ValueError(f"the checkpoint's optimizer state lacks parameters {sorted(missing)[:3]}...; "
                         "it was written for another model")
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]})


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


def raise_together(rt: Runtime, error: Exception | None) -> None:
    """Every rank calls this with its own error or None (a collective, in place of a barrier); if any
    rank failed, every rank raises: its own error where it has one, else RankFailed."""
    if not rt.distributed:
        if error is not None:
            raise error
        return
    messages = gather_objects(None if error is None else one_line(error), rt)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RankFailed(f"rank {rank} failed: {message}")


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

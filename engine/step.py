"""The optimisation step, defined once: train.py's loop, scripts/bench_train.py and the GPU tests run it.

A step whose loss is NaN/inf (or, without a GradScaler, whose gradient norm is) changes nothing: not
the weights, the optimizer's moments nor its step count. Asking the host every step would stall a GPU,
so the decision stays a tensor: fused AdamW takes it as `found_inf` (GradScaler's hook); with a
GradScaler (fp16) a bad loss poisons the gradients, so the scaler's inf check skips the step; any
other optimizer (foreach AdamW, Muon) reads it on the host. The norm comes from the synchronised
gradients, the same on every rank; the loss flag is all-reduced. The loop counts skips on the device
and reads the count only when it logs, as `log_values` reads the loss averaged over the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .optim import set_lr
from .runtime import Runtime
from .state import TrainState


def train_step(state: TrainState, train_model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               lr: float | None, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step over the micro-batches (x, y), each (B, T); train_model is what
    engine/parallel.py's wrap_model made of state.model. lr: set on every group first (None: keep).
    Returns (mean loss, gradient norm, skipped) as device tensors: nothing here waits for the device."""
    rt, model, optimizer, scaler = state.rt, state.model, state.optimizer, state.scaler
    if lr is not None:
        set_lr(optimizer, lr)
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(batches):
        grad_sync(train_model, model, micro == len(batches) - 1)  # all-reduce on the last micro-step only
        with rt.autocast():
            _, loss = train_model(x, y)
        loss_sum += loss.detach()
        scaler.scale(loss / len(batches)).backward()
    loss = loss_sum / len(batches)
    loss_flag = (~torch.isfinite(loss)).float()  # 1.0: NaN/inf on any rank
    if rt.distributed:
        dist.all_reduce(loss_flag, op=dist.ReduceOp.MAX)
    if scaler.is_enabled():
        poison_grads_if(loss_flag, list(model.parameters()))  # the scaler's inf check then skips
    scaler.unscale_(optimizer)  # so the norm and clipping see true gradients (fp16)
    norm = clip_grad_norm(model, grad_clip)
    skipped = step_guarded(optimizer, scaler, loss_flag, norm)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.pending_bad += skipped
    state.step += 1
    state.tokens_seen += sum(y.numel() for _, y in batches) * rt.world_size
    return loss, norm, skipped


def grad_sync(train_model: nn.Module, model: nn.Module, enabled: bool) -> None:
    """Gradient all-reduce on this backward or not (once, on the last micro-step). model: the GPT itself,
    which FSDP2's fully_shard turned into an FSDP module in place."""
    if isinstance(train_model, nn.parallel.DistributedDataParallel):
        train_model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (a plain tensor, also under FSDP), clipping to max_norm when > 0."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def poison_grads_if(flag: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Turn every gradient into NaN where flag is set (multiply by NaN or by 1), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.where(flag > 0, torch.nan, 1.0).to(grads[0].dtype))


def step_guarded(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_flag: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
    """Apply the update unless the step is bad; returns the skip flag (1.0 = skipped). With a scaler the
    gradients were poisoned already and it decides; without one a non-finite gradient norm counts too."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        return loss_flag
    bad = torch.maximum(loss_flag, (~torch.isfinite(norm)).float().to(loss_flag.device))
    if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused"):
        optimizer.grad_scale, optimizer.found_inf = None, bad
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bad.item():  # optimizers without a found_inf input: one host read decides
        optimizer.step()
    return bad


def log_values(loss: torch.Tensor, norm: torch.Tensor, rt: Runtime) -> tuple[float, float]:
    """(train loss, gradient norm) as numbers: a log step's host sync; call on every rank. The mean of the
    ranks' mean losses is the global batch's (each rank's micro-batches hold as many tokens)."""
    loss = loss.detach().float().clone()  # a fresh tensor: the all-reduce writes into it
    if rt.distributed:
        dist.all_reduce(loss)  # a sum (gloo has no AVG), then / world_size
        loss /= rt.world_size
    return tuple(torch.stack([loss, norm.detach().float().to(loss.device)]).tolist())

"""The optimisation step, defined once: train.py's loop, scripts/bench_train.py and the GPU tests run it.

`train_step` runs every accumulation micro-batch (forward under autocast, backward of the scaled loss,
gradient all-reduce on the last micro-batch only), unscales, clips, and applies the update guarded
against non-finite losses, then counts the step in the TrainState.

A step whose loss is NaN/inf (or, without a GradScaler, whose gradient norm is) must change nothing:
not the weights, not the optimizer's moments, not its step count. Asking the host "is it finite?"
every step would stall a GPU on a device-to-host copy per step, so the decision stays a tensor:
- fused AdamW takes a `found_inf` tensor (the hook GradScaler uses): the kernel leaves parameters
  and moments alone and takes the step count back when it is set;
- with a GradScaler (fp16), a non-finite loss poisons the gradients before `unscale_`, so the
  scaler's own inf check skips the step (and backs its scale off, as for any overflow);
- any other optimizer (foreach AdamW, Muon): one host read per step decides.
Under DDP/FSDP the gradient norm is computed from the synchronised gradients, so it is the same on
every rank; the loss is per rank, so the flag is all-reduced. The loop adds the flag (1.0 = skipped)
to a counter on the device and reads the counter only when it logs; `log_values`, at log steps
only, averages the ranks' losses, so under torchrun the logged loss is the global batch's.
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
    loss_flag = nonfinite_flag(loss, rt)
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
    """Gradient all-reduce on this backward or not: the sum of the micro-steps' local gradients is
    all-reduced once, on the last, instead of every micro-step. model: the GPT itself, which FSDP2's
    fully_shard turned into an FSDP module in place."""
    if isinstance(train_model, nn.parallel.DistributedDataParallel):
        train_model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (a plain tensor, also under FSDP), clipping to max_norm when > 0."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def nonfinite_flag(loss: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """1.0 where the mean loss is NaN/inf on any rank, else 0.0 (a 0-dim float32 tensor)."""
    flag = (~torch.isfinite(loss)).float()
    if rt.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def poison_grads_if(flag: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Turn every gradient into NaN where flag is set (multiply by NaN or by 1), without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.where(flag > 0, torch.nan, 1.0).to(grads[0].dtype))


def step_guarded(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_flag: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
    """Apply the update unless the step is bad; returns the skip flag (float tensor, 1.0 = skipped).
    With a scaler the gradients were poisoned by loss_flag already and the scaler decides; without
    one a non-finite gradient norm counts too."""
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
    """(train loss, gradient norm) of a step as numbers: the host sync of a log step; call on every
    rank. The mean over ranks of their mean losses is the global batch's (every rank's micro-batches
    hold as many tokens); the norm is the same on every rank already."""
    loss = loss.detach().float().clone()  # a fresh tensor: the all-reduce writes into it
    if rt.distributed:
        dist.all_reduce(loss)  # a sum (gloo has no AVG), then / world_size
        loss /= rt.world_size
    train_loss, grad_norm = torch.stack([loss, norm.detach().float().to(loss.device)]).tolist()
    return train_loss, grad_norm

"""The optimiser update, guarded against non-finite losses, decided on the device.

A step whose loss is NaN/inf (or, without a GradScaler, whose gradient norm is) must change nothing:
not the weights, not the optimizer's moments, not its step count. Asking the host "is it finite?"
every step would stall a GPU on a device-to-host copy per step, so the decision stays a tensor:

- fused AdamW takes a `found_inf` tensor (the hook GradScaler uses): the kernel leaves parameters
  and moments alone and takes the step count back when it is set. No host sync.
- with a GradScaler (fp16), a non-finite loss poisons the gradients before `unscale_`, so the
  scaler's own inf check skips the step (and backs its scale off, as for any overflow). No host sync
  with a fused optimizer.
- any other optimizer (foreach AdamW, Muon): one host read per step decides, as before.

Under DDP/FSDP the gradient norm is computed from the synchronised gradients, so it is the same on
every rank; the loss is per rank, so the flag is all-reduced (an asynchronous collective on NCCL).
`step_guarded` returns the flag as a float tensor (1.0 = skipped); the loop adds it to a counter on
the device and reads the counter only when it logs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime import Runtime


def nonfinite_flag(loss: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """1.0 where the mean loss is NaN/inf on any rank, else 0.0 (a 0-dim float32 tensor)."""
    flag = (~torch.isfinite(loss)).float()
    if rt.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def poison_grads_if(flag: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    """Turn every gradient into NaN where flag is set (multiply by NaN or by 1), without a host sync.
    Used before GradScaler.unscale_, whose inf check then skips the step."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.where(flag > 0, torch.nan, 1.0).to(grads[0].dtype))


def step_guarded(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss_flag: torch.Tensor,
                 norm: torch.Tensor) -> torch.Tensor:
    """Apply the update unless the step is bad; returns the skip flag (float tensor, 1.0 = skipped).

    loss_flag: nonfinite_flag(loss). With a scaler the gradients were already poisoned by it
    (poison_grads_if) and the scaler decides; without one a non-finite gradient norm counts too."""
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

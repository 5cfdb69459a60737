"""AdamW with weight decay on 2-D weights only, and the learning-rate schedules.

Decay applies to tensors with two or more dimensions (matmul weights and embeddings); biases and
LayerNorm gains are left alone, as in GPT-2/nanoGPT. The schedule is a pure function of the step,
so a resumed run needs only the step to be back on the curve.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .config import OptimConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed 2-D+ weights and undecayed 1-D parameters. Tied parameters
    (wte / lm_head) appear once, since named_parameters() skips duplicates."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    log.info("optimizer: %d decayed tensors (%d params), %d undecayed (%d params)", len(decay),
             sum(p.numel() for p in decay), len(no_decay), sum(p.numel() for p in no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over param_groups(model). fused=None picks the fused kernel: one kernel for all
    parameters on CUDA; on CPU it measured the same as foreach (BENCHMARKS.md) and is used too."""
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """The learning rate of optimisation step `step` (0-based)."""
    if step < cfg.warmup_iters:  # linear warmup; never exactly 0, so step 0 still learns
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    match cfg.schedule:
        case "constant":
            return cfg.lr
        case "cosine":
            decay_iters = cfg.decay_iters or max_iters
            if step >= decay_iters:
                return cfg.min_lr
            progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
            return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
        case "wsd":
            decay_start = max(cfg.warmup_iters, round(max_iters * (1.0 - cfg.decay_fraction)))
            if step < decay_start:
                return cfg.lr
            progress = min(1.0, (step - decay_start) / max(1, max_iters - decay_start))
            return cfg.lr + progress * (cfg.min_lr - cfg.lr)
        case _:
            raise ValueError(f"optim.schedule={cfg.schedule!r} is not valid; choose cosine, wsd or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

"""The optimizers and the learning-rate schedules: AdamW (optim=adamw), or Muon for the hidden
matrices with AdamW for the rest (optim=muon), driven by the loop as one optimizer.

AdamW decays tensors of two or more dimensions only (matmul weights, embeddings), as GPT-2/nanoGPT.
Muon (torch.optim.Muon) orthogonalises each update of a weight matrix (Newton-Schulz), which suits the
blocks' hidden linear maps; the split is nanochat's and modded-nanogpt's. Muon: the 2-D weights inside
the blocks (`h.*`), c_attn (3C x C) as the three C x C matrices W_q, W_k, W_v it stacks (as one matrix
they would mix). AdamW: wte, wpe and lm_head (lookup tables and the logit map train better with it in
those repositories' experiments), norms and biases (no matrix to orthogonalise). Muon follows AdamW's
schedule scaled by muon_lr / lr. Under DDP Muon sees the all-reduced gradients; under FSDP2 its
matmuls run as DTensor ops on the whole matrices: one process's update up to bf16 rounding.

The schedule is a pure function of the step, so a resumed run needs only the step to be back on the curve.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from .config import OptimConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float,
                 params: list[tuple[str, nn.Parameter]] | None = None) -> list[dict]:
    """Two AdamW groups, decayed 2-D+ weights and undecayed 1-D parameters, of `params` (name, parameter)
    or else of the whole model (a tied wte / lm_head once: named_parameters() skips duplicates)."""
    trainable = [p for _, p in (params if params is not None else model.named_parameters()) if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    log.info("AdamW: %d decayed tensors (%d params), %d undecayed (%d params)", len(decay),
             sum(p.numel() for p in decay), len(no_decay), sum(p.numel() for p in no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(muon, adamw): (name, parameter) pairs, each trainable parameter in exactly one list."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if name.startswith("h.") and p.dim() == 2 else adamw).append((name, p))
    return muon, adamw


class Unguarded:
    """torch.optim.Optimizer's methods without their torch.compile guards (torch._dynamo.disable, graph
    breaks): each guard imports the compiler on its first call, ~1 s of a short run on 2 cores, and these
    optimizers only ever run eagerly, where the guards do nothing. inspect.unwrap reaches the method a
    guard wraps (functools.wraps); should a later torch wrap otherwise, it returns the guarded one: slower,
    never different."""

    def add_param_group(self, param_group: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        inspect.unwrap(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return inspect.unwrap(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        inspect.unwrap(torch.optim.Optimizer.load_state_dict)(self, state_dict)


class AdamW(Unguarded, torch.optim.AdamW):
    """torch.optim.AdamW, unguarded: the same update and state dict (tests/test_numbers.py compares)."""

    @torch.no_grad()  # what the guard set: grad mode = defaults["differentiable"], False here
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return inspect.unwrap(torch.optim.AdamW.step)(self, closure)


# torch.optim.Muon where torch has it (>= 2.9); build_optimizer refuses optim=muon otherwise.
_MuonBase = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class Muon(Unguarded, _MuonBase):
    """torch.optim.Muon, where a parameter may be a stack of k matrices by rows (split: {id(param): k}),
    its update orthogonalised block by block with each block's own lr adjustment; the others get torch's
    update exactly (tests/test_numbers.py compares). State and state dict are torch.optim.Muon's."""

    def __init__(self, params, split: dict[int, int] | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.split = dict(split or {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                blocks = update.chunk(self.split.get(id(param), 1))  # k x (rows / k, cols): c_attn's q, k, v
                update = torch.cat([newton_schulz(b, group["ns_coefficients"], group["ns_steps"], group["eps"])
                                    for b in blocks])  # (rows, cols)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], blocks[0].shape))
        return loss


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration in bf16 (written here: torch keeps it private):
    g (m, n) -> an approximately orthogonal matrix of the same shape, U S' V^T with S' near 1."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (n, m): the Gram matrix below is the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix lr (optim.muon_adjust_lr)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class MuonAdamW:
    """Muon and AdamW behind one optimizer's interface, so the loop, the GradScaler (unscale_ walks
    param_groups; step calls step() when the gradients are finite) and set_lr drive both at once.
    `parts` names the two optimizers: checkpoints save and load one name-keyed state per part."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer, muon_lr_scale: float) -> None:
        self.parts: dict[str, torch.optim.Optimizer] = {"muon": muon, "adamw": adamw}
        self.muon_lr_scale = muon_lr_scale  # Muon's lr = the scheduled (AdamW) lr * muon_lr / lr

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW over param_groups(model) (optim.name=adamw), or MuonAdamW over muon_split(model) (muon)."""
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")

    def adamw(params: list[tuple[str, nn.Parameter]] | None = None) -> AdamW:
        return AdamW(param_groups(model, cfg.weight_decay, params), lr=cfg.lr, betas=tuple(cfg.betas),
                     eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        return adamw()
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optim=muon needs torch.optim.Muon (torch >= 2.9); the installed torch "
                         f"{torch.__version__} lacks it: upgrade torch, or use optim=adamw")
    hidden, rest = muon_split(model)
    log.info("Muon: %d matrices (%d params)", len(hidden), sum(p.numel() for _, p in hidden))
    qkv = {id(p): 3 for name, p in hidden if name.endswith("attn.c_attn.weight")}  # (3C, C): W_q, W_k, W_v
    muon = Muon([p for _, p in hidden], split=qkv, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr)
    return MuonAdamW(muon, adamw(rest), cfg.muon_lr / cfg.lr)


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """The learning rate of step `step` (0-based; the last is max_iters - 1): AdamW's, Muon's is it times
    muon_lr / lr. wsd reaches min_lr on the last step, cosine on step decay_iters - 1 and after it
    (unless the warmup lasts that long); the first step after the warmup runs at the peak lr."""
    if step < cfg.warmup_iters:  # linear warmup; never exactly 0, so step 0 still learns
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    match cfg.schedule:
        case "constant":
            return cfg.lr
        case "cosine":
            end = cfg.decay_iters or max_iters
            if step >= end - 1:
                return cfg.min_lr
            progress = (step - cfg.warmup_iters) / (end - 1 - cfg.warmup_iters)  # 0 at the peak, 1 on the last step
            return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
        case "wsd":
            decay_start = max(cfg.warmup_iters, round(max_iters * (1.0 - cfg.decay_fraction)))
            if step >= max_iters - 1:
                return cfg.min_lr
            if step < decay_start:
                return cfg.lr
            progress = (step - decay_start) / (max_iters - 1 - decay_start)  # 0 at decay_start, 1 on the last step
            return cfg.lr + progress * (cfg.min_lr - cfg.lr)
        case _:
            raise ValueError(f"optim.schedule={cfg.schedule!r} is not valid; choose cosine, wsd or constant")


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set the scheduled lr: on every AdamW group, and scaled by muon_lr / lr on Muon's."""
    parts = optimizer.parts if isinstance(optimizer, MuonAdamW) else {"adamw": optimizer}
    for name, opt in parts.items():
        for group in opt.param_groups:
            group["lr"] = lr * (optimizer.muon_lr_scale if name == "muon" else 1.0)

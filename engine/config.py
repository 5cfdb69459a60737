"""Schemas of the training configs: `TrainConfig` (configs/train.yaml), `OptimConfig` (optim/) and
`LoggerConfig` (logger/), each field documented where declared. cli.py registers them with Hydra's
ConfigStore, so a typo or a wrong type is refused before anything runs; `__post_init__` checks values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from data.config import DataConfig
from model import ModelConfig

MISSING = "???"  # omegaconf.MISSING, spelled out: nothing below the entry points imports OmegaConf

NO_RESUME = ("", "none", "null", "false", "never")  # resume= values that start a fresh run (any case)


def _validate(cfg: object, prefix: str, choices: dict[str, tuple[str, ...]],
              errors: Sequence[tuple[bool, str]] = ()) -> None:
    """Lower-case each choice field (refusing one not among its choices), then raise the first failed error."""
    for name, valid in choices.items():
        value = str(getattr(cfg, name)).lower()
        if value not in valid:
            raise ValueError(f"{prefix}{name}={getattr(cfg, name)!r} is not valid; choose one of {list(valid)}")
        setattr(cfg, name, value)
    for failed, message in errors:
        if failed:
            raise ValueError(message)


@dataclass
class OptimConfig:
    # adamw: AdamW everywhere; muon: torch.optim.Muon for the blocks' 2-D weights, AdamW (lr..eps) for the rest.
    name: str = "adamw"
    lr: float = 1e-3  # peak lr, reached at the end of warmup (muon: the AdamW parameters')
    min_lr: float = 1e-4  # lr at the end of the decay (nanoGPT's min_lr, usually lr / 10)
    weight_decay: float = 0.1  # AdamW's, on 2-D weights only, never biases or norms
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    warmup_iters: int = 100  # linear warmup from ~0 to lr over this many steps
    # cosine: cosine decay to min_lr on step decay_iters - 1; wsd: constant, then a linear decay over the
    # last decay_fraction of the run to min_lr on its last step; constant: lr. All after the warmup.
    schedule: str = "cosine"
    decay_iters: int | None = None  # cosine's planned length (nanoGPT's lr_decay_iters); null: max_iters
    decay_fraction: float = 0.2  # wsd only: the fraction of max_iters spent in the final decay
    fused: bool | None = None  # fused AdamW kernel; null: on CUDA and CPU (on CPU no faster than foreach: BENCHMARKS.md)
    muon_lr: float = 0.02  # muon only: Muon's peak lr (its schedule is the one above, scaled by muon_lr / lr)
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled decay: the matrices shrink by lr * decay a step
    # Per-matrix lr: original (Keller Jordan's, lr * sqrt(max(1, rows / cols))) or match_rms_adamw
    # (Moonshot's, lr * 0.2 * sqrt(max(rows, cols)): takes AdamW-sized lrs).
    muon_adjust_lr: str = "original"

    def __post_init__(self) -> None:
        _validate(self, "optim.", {"name": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"),
                                   "muon_adjust_lr": ("original", "match_rms_adamw")}, [
            (self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0 or self.muon_weight_decay < 0,
             f"optim.muon_lr={self.muon_lr}, optim.muon_momentum={self.muon_momentum} and optim.muon_weight_decay="
             f"{self.muon_weight_decay} need lr > 0, 0 <= momentum < 1, decay >= 0"),
            (self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr,
             f"optim.lr={self.lr} and optim.min_lr={self.min_lr} need 0 <= min_lr <= lr, lr > 0"),
            (len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas),
             f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
            (self.warmup_iters < 0 or self.weight_decay < 0 or self.eps <= 0,
             "optim.warmup_iters and optim.weight_decay must be >= 0 and optim.eps > 0"),
            (self.decay_iters is not None and self.decay_iters <= 0,
             f"optim.decay_iters={self.decay_iters} must be positive, or null for max_iters"),
            (not 0.0 < self.decay_fraction <= 1.0, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")])


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb (W&B plus metrics.jsonl) or none (metrics.jsonl and the console)
    # W&B project, entity (team or user), run name and group; null: WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME,
    # WANDB_RUN_GROUP, else project causalgpt, your default entity, `<experiment or preset>-<stamp>` (plus
    # a sweep's overrides: cli.name_wandb_run; a resumed run keeps its name) and a sweep's directory.
    project: str | None = None
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    # auto: online when logged in (WANDB_API_KEY or ~/.netrc), else offline; WANDB_MODE, when set, wins.
    mode: str = "auto"
    # W&B tags besides exp:, model:, data:, tok: (added to every run) and WANDB_TAGS (comma-separated).
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = False  # upload best.pt (else last.pt) as a W&B model artifact at the end

    def __post_init__(self) -> None:
        _validate(self, "logger.", {"name": ("wandb", "none"), "mode": ("auto", "online", "offline", "disabled")})


@dataclass
class TrainConfig:
    # The config groups, filled by the defaults list: these typed fields check every file of them.
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    # ---- where ------------------------------------------------------------------------------------
    out_dir: str | None = None  # run directory (checkpoints, metrics.jsonl, wandb/); null: Hydra's
    # null: start fresh; auto: out_dir's last.pt when there is one; or a checkpoint file or run directory
    # (its last.pt) to continue from, writing into out_dir.
    resume: str | None = None
    # A fresh run refuses an out_dir holding another run's last.pt, best.pt or metrics.jsonl; true deletes them.
    overwrite: bool = False
    # Fine-tune: the weights of a checkpoint (file or run dir), a fresh optimizer, step 0. Ignored when resuming.
    init_from: str | None = None

    # ---- the loop (nanoGPT's names) ---------------------------------------------------------------
    # Optimisation steps (0: only evaluate); each sees batch_size * gradient_accumulation_steps * world_size sequences.
    max_iters: int = 2000
    eval_only: bool = False  # evaluate init_from's model: max_iters=0 (the step-0 eval and the final eval)
    batch_size: int = 16  # sequences per micro-batch per process (of model.block_size tokens)
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0  # clip the gradient norm to this (0: no clipping; the norm is logged either way)
    eval_interval: int = 250  # train and val loss every eval_interval steps (and at the end) ...
    eval_iters: int = 20  # ... on this many fixed batches
    # At the end, val loss on this many fixed batches (steadier than eval_iters); -1: the whole split; 0: off.
    final_eval_iters: int = 100
    log_interval: int = 10  # a console/metrics.jsonl/W&B line every log_interval steps
    ckpt_interval: int | None = None  # last.pt every N steps (0: at the end and on a signal only); null: eval_interval
    # Step-numbered checkpoints (ckpt-000250.pt, ...) kept beside last.pt, the newest a hard link to it;
    # resume=auto falls back to them, newest first, when last.pt does not load. 0: last.pt only.
    keep_last: int = 2
    sample_tokens: int = 200  # tokens generated at each eval (W&B and metrics.jsonl); 0: no samples
    max_bad_steps: int = 5  # fail after this many steps with a NaN/inf loss or gradient (each is skipped)
    seed: int = 1337

    # ---- the runtime ------------------------------------------------------------------------------
    device: str = "auto"  # auto: cuda > mps > cpu
    precision: str = "auto"  # auto: bf16 on CUDA that has it, else fp16 (GradScaler) on CUDA, fp32 elsewhere
    compile: str = "auto"  # torch.compile the model; auto: on CUDA only (on CPU it rarely pays off)
    distributed: str = "ddp"  # under torchrun: ddp (replicate, all-reduce gradients) or fsdp (FSDP2 fully_shard)
    threads: int = 0  # CPU threads for torch; 0: the cores this process may use, divided among local ranks
    peak_flops: float | None = None  # the device's peak FLOP/s for MFU; null: by GPU name (no MFU on CPU)
    # Under torchrun: how long a collective waits for the other ranks before the run fails; longer than
    # the longest time one rank works alone (rank 0 preparing data or saving a checkpoint).
    dist_timeout_s: float = 1800

    def __post_init__(self) -> None:
        if self.ckpt_interval is None:
            self.ckpt_interval = self.eval_interval
        positive = ("eval_interval", "batch_size", "gradient_accumulation_steps", "log_interval")
        counts = ("max_iters", "eval_iters", "ckpt_interval", "sample_tokens", "max_bad_steps", "threads", "keep_last")
        _validate(self, "", {"device": ("auto", "cpu", "cuda", "mps"), "precision": ("auto", "bf16", "fp16", "fp32"),
                             "compile": ("auto", "true", "false"), "distributed": ("ddp", "fsdp")}, [
            *((getattr(self, n) <= 0, f"{n}={getattr(self, n)} must be a positive integer") for n in positive),
            *((getattr(self, n) < 0, f"{n}={getattr(self, n)} must be >= 0") for n in counts),
            (self.eval_only and not self.init_from,
             "eval_only=true evaluates a trained model: give init_from=<run dir or checkpoint>"),
            (self.final_eval_iters < -1,
             f"final_eval_iters={self.final_eval_iters}: use N batches, 0 (off) or -1 (whole val split)"),
            (self.dist_timeout_s <= 0, f"dist_timeout_s={self.dist_timeout_s} must be a positive number of seconds"),
            (self.grad_clip < 0, f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")])
        if self.eval_only:
            self.max_iters = 0

"""Schemas of the training configs: `TrainConfig` (configs/train.yaml), `OptimConfig` (optim/) and
`LoggerConfig` (logger/). Each field is documented where it is declared; the YAML files only choose
values. cli.py registers these with Hydra's ConfigStore, so a typo (`optim.lrr=1`) or a wrong type
(`optim.lr=fast`) is refused before anything runs; train.py's one `OmegaConf.to_object` runs the
`__post_init__` checks. No Hydra import here: engine code takes plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from data.config import DataConfig
from model import ModelConfig

# OmegaConf's marker for a value the config must supply (omegaconf.MISSING is this string; spelled
# out so that nothing below the entry points imports Hydra or OmegaConf).
MISSING = "???"


def _validate(cfg: object, prefix: str, choices: dict[str, tuple[str, ...]],
              errors: Sequence[tuple[bool, str]] = ()) -> None:
    """Lower-case each choice field, refusing a value not among its choices with a ValueError naming
    the valid ones; then raise the message of the first (failed, message) error that failed."""
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
    # adamw: AdamW for every parameter; muon: torch.optim.Muon (torch >= 2.9) for the 2-D weights
    # inside the blocks, AdamW (the fields lr..eps below) for embeddings, head, norms and biases.
    name: str = "adamw"
    # Peak learning rate, reached at the end of warmup (with name=muon: of the AdamW parameters).
    lr: float = 1e-3
    # Learning rate at the end of the decay (nanoGPT's min_lr, usually lr / 10).
    min_lr: float = 1e-4
    # AdamW weight decay; applied to 2-D weights (matmuls, embeddings) only, never biases or norms.
    weight_decay: float = 0.1
    # AdamW (beta1, beta2).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # AdamW epsilon.
    eps: float = 1e-8
    # Linear warmup from ~0 to lr over this many steps.
    warmup_iters: int = 100
    # cosine: warmup, then cosine decay to min_lr on step decay_iters - 1; wsd: warmup, constant lr,
    # then a linear decay to min_lr over the last decay_fraction of the run, min_lr on its last step
    # (max_iters - 1); constant: warmup then lr.
    schedule: str = "cosine"
    # The run length cosine's decay is planned for (nanoGPT's lr_decay_iters): min_lr on step
    # decay_iters - 1 and after it; null means max_iters, so the last step runs at min_lr.
    decay_iters: int | None = None
    # wsd only: the fraction of max_iters spent in the final decay.
    decay_fraction: float = 0.2
    # Fused AdamW kernel; null = fused on CUDA and CPU (on CPU no faster than foreach: BENCHMARKS.md).
    fused: bool | None = None
    # name=muon only. Muon's peak lr: its schedule is the one above, scaled by muon_lr / lr.
    muon_lr: float = 0.02
    # Muon's momentum (Nesterov) and decoupled weight decay (the matrices shrink by lr * decay a step).
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # Per-matrix lr adjustment: original (Keller Jordan's, lr * sqrt(max(1, rows / cols))) or
    # match_rms_adamw (Moonshot's, lr * 0.2 * sqrt(max(rows, cols)): takes AdamW-sized lrs).
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
    # wandb (Weights & Biases, plus metrics.jsonl) or none (metrics.jsonl and the console only).
    name: str = "wandb"
    # W&B project and entity (team or user). A value set here wins; null: the WANDB_PROJECT and
    # WANDB_ENTITY environment variables as W&B documents them, else project causalgpt and your
    # default entity.
    project: str | None = None
    entity: str | None = None
    # W&B run name; null: WANDB_NAME, else `<experiment or preset>-<run stamp>`, plus the swept
    # overrides in a sweep (cli.name_wandb_run). A resumed run keeps its name.
    run_name: str | None = None
    # W&B group; null: WANDB_RUN_GROUP, else the sweep directory for the jobs of a sweep (-m).
    group: str | None = None
    # auto: online when logged in (WANDB_API_KEY or ~/.netrc), offline otherwise (`wandb sync`
    # later); the WANDB_MODE environment variable, when set, wins over auto.
    mode: str = "auto"
    # W&B tags, besides those added to every run (exp:<experiment>, model:<preset>, data:<source>,
    # tok:<tokenizer>) and those in WANDB_TAGS (comma-separated).
    tags: list[str] = field(default_factory=list)
    # Upload best.pt (else last.pt) as a W&B model artifact when the run ends. Off: checkpoints can be
    # large, and they stay in the run directory either way.
    log_checkpoints: bool = False

    def __post_init__(self) -> None:
        _validate(self, "logger.", {"name": ("wandb", "none"), "mode": ("auto", "online", "offline", "disabled")})


@dataclass
class TrainConfig:
    # The config groups: these typed fields check every file of configs/model/, configs/data/, ...
    model: ModelConfig = MISSING  # filled by the defaults list (model/, data/ groups)
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    # ---- where ------------------------------------------------------------------------------------
    # Run directory (checkpoints, metrics.jsonl, wandb/); null = Hydra's output directory.
    out_dir: str | None = None
    # null: start fresh; auto: continue from out_dir's last.pt when there is one; or a path to a
    # checkpoint file or run directory (its last.pt) to continue from, writing into out_dir.
    resume: str | None = None
    # A fresh run (no resume) refuses an out_dir that holds another run's last.pt, best.pt or
    # metrics.jsonl; overwrite=true deletes them and starts over there.
    overwrite: bool = False
    # Start from the weights of a checkpoint (file or run dir), with a fresh optimizer and step 0:
    # fine-tuning. Ignored when resuming.
    init_from: str | None = None

    # ---- the loop (nanoGPT's names) ---------------------------------------------------------------
    # Optimisation steps (0: only evaluate, e.g. with init_from); each sees batch_size * gradient_accumulation_steps * world_size sequences.
    max_iters: int = 2000
    # nanoGPT's name for evaluating a trained model: needs init_from, sets max_iters=0 (the eval at
    # step 0 and the final eval; the run directory records them with the weights evaluated).
    eval_only: bool = False
    # Sequences per micro-batch per process. The context length is model.block_size.
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    # Clip the gradient norm to this (0 = no clipping; the norm is logged either way).
    grad_clip: float = 1.0
    # Evaluate train and val loss every eval_interval steps (and at the end) on eval_iters fixed batches.
    eval_interval: int = 250
    eval_iters: int = 20
    # At the end, also report val loss on this many fixed batches (a larger, steadier number than
    # eval_iters gives); -1 = the whole val split in order; 0 = off.
    final_eval_iters: int = 100
    # Console/metrics.jsonl/W&B line every log_interval steps.
    log_interval: int = 10
    # Write last.pt every ckpt_interval steps (0 = only at the end and on SIGTERM/Ctrl-C); null =
    # every eval_interval steps.
    ckpt_interval: int | None = None
    # Keep this many step-numbered checkpoints (ckpt-000250.pt, ...) beside last.pt, the newest
    # being a hard link to last.pt (no extra disk); resume=auto falls back to them, newest first,
    # when last.pt does not load. 0 = last.pt only.
    keep_last: int = 2
    # Generate this many tokens at each eval (logged to W&B and metrics.jsonl); 0 = no samples.
    sample_tokens: int = 200
    # Stop with an error after this many steps with a NaN/inf loss or gradient (each is skipped).
    max_bad_steps: int = 5
    seed: int = 1337

    # ---- the runtime ------------------------------------------------------------------------------
    # auto picks cuda > mps > cpu.
    device: str = "auto"
    # auto: bf16 on CUDA that supports it, fp16 (with a GradScaler) on older CUDA, fp32 elsewhere.
    precision: str = "auto"
    # torch.compile the model: auto = on CUDA only (on CPU its compile time rarely pays off).
    compile: str = "auto"
    # Under torchrun: ddp (replicate, all-reduce gradients) or fsdp (FSDP2 fully_shard).
    distributed: str = "ddp"
    # CPU threads for torch (0 = the cores available to this process, divided among local ranks).
    threads: int = 0
    # Peak FLOP/s of the device for MFU; null = looked up by GPU name (none on CPU: no MFU logged).
    peak_flops: float | None = None
    # Under torchrun: seconds a collective waits for the other ranks before the run fails. It must
    # exceed the longest stretch one rank works alone (rank 0 preparing data or saving a checkpoint).
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

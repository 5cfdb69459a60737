"""The training state: one object holding everything a bit-identical resume needs, saved and chosen
by the ranks together.

`TrainState` holds the model (sharded in place under FSDP2), the optimizer (AdamW, or Muon + AdamW
as named parts), the GradScaler, the loop's counters, the data position, every rank's RNG states and
the W&B run id, and speaks torch.distributed.checkpoint's `Stateful` protocol. Model and optimizer
go through full, CPU-offloaded state dicts keyed by parameter name, so one process, DDP and FSDP2
read each other's checkpoints. A resume onto another precision, device or world size puts back what
it can and says once what was reset; only one that changes none is bit-identical.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import candidates, open_checkpoint, save_checkpoint
from .config import NO_RESUME
from .runtime import Runtime

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN); the message says why and what to try."""


def grad_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """The loss scaler: torch's GradScaler, enabled for fp16 only, under FSDP2 too. DTensor runs its
    inf check on each rank's gradient shards and all-reduces the flag (max), so every rank skips the
    same steps (tests/test_train_distributed.py). FSDP1's ShardedGradScaler is not used: on FSDP2 it
    all-reduces the flag again, as a sum, and fused AdamW skips only on exactly 1, so an overflow on
    two ranks was applied and turned the weights into NaN (measured, torch 2.13)."""
    return torch.amp.GradScaler(rt.device_type, enabled=rt.precision == "fp16")


@dataclass
class TrainState:
    """Everything a resume needs; `static` holds the payload keys that do not change in a run
    (model_config, tokenizer, config, data)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rt: Runtime
    loaders: list = field(default_factory=list)  # data.loader.BatchLoader streams, one per micro-step
    static: dict = field(default_factory=dict)
    seed: int = 0
    step: int = 0  # optimisation steps done
    tokens_seen: int = 0  # training tokens consumed, all ranks together
    best_val: float = math.inf  # best val loss at an eval so far
    bad_steps: int = 0  # steps skipped for a NaN/inf loss or gradient, as read at log steps
    last_eval_step: int = -1  # the step of the latest eval (a resumed run does not redo it)
    wandb_id: str | None = None
    # Skipped steps not yet read: a device tensor the step adds to without a host sync.
    pending_bad: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.pending_bad = torch.zeros((), device=self.rt.device)

    def read_bad_steps(self) -> int:
        """Move the skipped steps counted on the device into bad_steps; returns how many were new."""
        n = int(self.pending_bad.item())
        self.pending_bad.zero_()
        self.bad_steps += n
        return n

    # ---- Stateful -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint payload. A collective: call on every rank (FSDP gathers the shards, every
        rank's RNG state is gathered)."""
        model, optim = named_states(self.model, _parts(self.optimizer), self.rt.distributed)
        return {**self.static, "step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "loop": {"bad_steps": self.bad_steps + int(self.pending_bad.item()),
                         "last_eval_step": self.last_eval_step},
                "model": model,
                "optimizer": optim if len(optim) > 1 else optim["adamw"], "scaler": self.scaler.state_dict(),
                "loader_state": self.loaders[0].state_dict() if self.loaders else {},
                "rng": gather_objects(rng_state(), self.rt), "world_size": self.rt.world_size,
                "precision": self.rt.precision, "device": self.rt.device_type, "wandb_run_id": self.wandb_id}

    def load_state_dict(self, ckpt: dict) -> None:
        """Put a checkpoint back: weights, optimizer, counters, data position, scaler, RNG. Call it last
        in the set-up: after it nothing may draw random numbers."""
        mine, saved = _parts(self.optimizer), ckpt["optimizer"]
        saved = {"adamw": saved} if "state" in saved else saved
        if saved.keys() != mine.keys():
            raise ValueError(f"the checkpoint holds {'+'.join(sorted(saved))} optimizer state but this run's "
                             f"optimizer is {'+'.join(sorted(mine))}: resume with the optim= it was trained with, "
                             "or use init_from=<checkpoint> to keep its weights with a fresh optimizer")
        load_named_states(self.model, mine, ckpt["model"], saved, self.rt.distributed)
        loop = ckpt.get("loop", {})
        self.step, self.tokens_seen = int(ckpt["step"]), int(ckpt.get("tokens_seen", 0))
        self.best_val = float(ckpt.get("best_val", math.inf))
        self.bad_steps, self.last_eval_step = int(loop.get("bad_steps", 0)), int(loop.get("last_eval_step", -1))
        self.wandb_id = ckpt.get("wandb_run_id")
        for loader in self.loaders:
            loader.load_state_dict(ckpt["loader_state"])
        self._restore_runtime(ckpt)

    def save(self, path: Path, keep_last: int = 0) -> None:
        """Write a full checkpoint (call on every rank). Only rank 0 writes, atomically; when the write
        fails every rank raises (rank 0 the CheckpointError naming the file), so none waits for a
        save that will not come; nor does any run ahead before the file is complete."""
        payload = self.state_dict()
        together(self.rt, lambda: save_checkpoint(path, payload, keep_last=keep_last), here=self.rt.is_main)

    def _restore_runtime(self, ckpt: dict) -> None:
        """The GradScaler and this rank's RNG states, mapped onto this run's precision, device and
        world size; what had to be reset is said once, by rank 0."""
        rt, scaler, notes = self.rt, self.scaler, []
        saved_scaler = ckpt.get("scaler") or {}
        was = ckpt.get("precision") or ("fp16" if saved_scaler else None)
        if scaler.is_enabled() and saved_scaler:
            scaler.load_state_dict(saved_scaler)
        elif scaler.is_enabled():
            notes.append(f"the checkpoint was trained with precision={was or 'bf16 or fp32'}, this run uses "
                         f"fp16: its GradScaler starts fresh (scale {scaler.get_scale():g})")
        elif saved_scaler:
            notes.append(f"the checkpoint was trained with precision=fp16, this run uses {rt.precision}: its "
                         f"GradScaler state (scale {saved_scaler.get('scale')}) is dropped, none is needed")
        elif was and was != rt.precision:
            notes.append(f"precision changes from {was} to {rt.precision}")
        if (device := ckpt.get("device")) and device != rt.device_type:
            notes.append(f"the checkpoint was written on {device}, this run is on {rt.device_type}"
                         + (": its CUDA RNG states are not used" if device == "cuda" else ""))

        rngs = ckpt["rng"]
        mine = rngs[rt.rank] if rt.rank < len(rngs) else None
        seed = int(np.random.SeedSequence([self.seed, self.step, rt.rank]).generate_state(1)[0])  # what it lacks
        if mine is None:  # a rank the checkpoint has no state of (torch.manual_seed seeds CUDA's too)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        else:
            set_rng_state(mine)
            if rt.device_type == "cuda" and len(mine["cuda"]) != torch.cuda.device_count():
                torch.cuda.manual_seed_all(seed)
                notes.append(f"the checkpoint holds CUDA RNG states for {len(mine['cuda'])} GPU(s), this "
                             f"machine has {torch.cuda.device_count()}: the CUDA generators are seeded from seed")
        if len(rngs) != rt.world_size:
            notes.append(f"the checkpoint was written by {len(rngs)} process(es), this run has {rt.world_size}: "
                         f"ranks beyond {len(rngs) - 1} get RNG states derived from seed and step")
        saved_streams = int(ckpt.get("world_size", 1)) * int(ckpt.get("config", {}).get("gradient_accumulation_steps", 1))
        if self.loaders and saved_streams != rt.world_size * len(self.loaders):
            notes.append(f"the global batch changes from {saved_streams} to {rt.world_size * len(self.loaders)} "
                         "micro-batches per step, so the data order differs too")
        if notes and rt.is_main:
            log.warning("resuming on another runtime: %s. The run goes on from the checkpoint, but it cannot be "
                        "bit-identical to an uninterrupted one", "; ".join(notes))


def find_resume(resume: str | None, out_dir: Path, rt: Runtime) -> tuple[Path, dict] | None:
    """The checkpoint `resume=` means, loaded: None (start fresh); `auto` (out_dir's first checkpoint
    that loads, in engine/checkpoint.py's order; none there: start fresh); a run directory (the
    same, but none is an error); or a file. Rank 0 chooses and the others load its choice, so every
    rank resumes from the same file; when rank 0 finds nothing usable, every rank raises."""
    if resume is None or str(resume).lower() in NO_RESUME:
        return None
    auto = str(resume).lower() == "auto"
    target = Path(out_dir) if auto else Path(resume).expanduser()

    def choose() -> tuple[Path, dict] | None:
        if auto and not candidates(target):
            log.warning("resume=auto: no checkpoint in %s yet, starting fresh (to continue an earlier run, "
                        "pass out_dir=<its run directory> or resume=<its last.pt>)", target)
            return None
        return open_checkpoint(target, training_state=True)

    chosen = together(rt, choose, here=rt.is_main)
    path = gather_objects(None if chosen is None else str(chosen[0]), rt)[0]
    loaded = together(rt, lambda: open_checkpoint(path, training_state=True), here=path is not None and not rt.is_main)
    return chosen or loaded


def _parts(optimizer: Any) -> dict[str, torch.optim.Optimizer]:
    """The optimizers whose states a checkpoint holds, by name: MuonAdamW's parts, or {"adamw": AdamW}."""
    return getattr(optimizer, "parts", None) or {"adamw": optimizer}


def named_states(model: nn.Module, parts: dict[str, torch.optim.Optimizer], distributed: bool) -> tuple[dict, dict]:
    """The model's and each optimizer part's full state dicts, keyed by parameter name, on the CPU. Under
    torchrun torch.distributed.checkpoint makes them (it gathers FSDP2's shards). One process holds every
    tensor whole and names them itself, in DCP's format (tests/test_model_checkpoint.py compares): DCP's
    helpers import torch._dynamo, ~1 s of a short run on 2 cores, only to look for a compiled wrapper.
    An optimizer before its first step has no state: {"state": {}, "param_groups": []} (DCP would make
    one by running a step with lr=0, which bumps Adam's step count in the live optimizer)."""
    empty = {"state": {}, "param_groups": []}
    if distributed:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        opts = _full(cpu_offload=True)
        return get_model_state_dict(model, options=opts), {
            name: get_optimizer_state_dict(model, opt, options=opts) if opt.state else empty
            for name, opt in parts.items()}
    optim = {name: _rekeyed(opt.state_dict() if opt.state else empty, _param_names(model, opt))
             for name, opt in parts.items()}  # torch numbers the parameters in _param_names' order
    return {k: _cpu(v) for k, v in model.state_dict().items()}, optim


def load_named_states(model: nn.Module, parts: dict[str, torch.optim.Optimizer], model_state: dict,
                      optim_states: dict[str, dict], distributed: bool) -> None:
    """Put named_states' dicts back (an optimizer saved before its first step stays fresh)."""
    if distributed:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        set_model_state_dict(model, model_state, options=_full(cpu_offload=False))
    else:
        model.load_state_dict(model_state)
    for name, opt in parts.items():
        saved = optim_states[name]
        if not saved["state"]:  # the fresh optimizer is that state already
            continue
        if distributed:
            set_optimizer_state_dict(model, opt, saved, options=_full(cpu_offload=False))
            continue
        opt.load_state_dict(_rekeyed(saved, {n: i for i, n in enumerate(_param_names(model, opt))}))


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in opt.param_groups for p in g["params"]]


def _rekeyed(sd: dict, key: Any) -> dict:
    """An optimizer state dict with each parameter's key mapped through key (index -> name, or back),
    its tensors on the CPU."""
    return {"state": {key[i]: {k: _cpu(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [key[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _full(cpu_offload: bool):
    """Full (unsharded) state dicts, on the CPU when saving."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as plain data."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Put back the generators of rng_state(); CUDA's only where this machine has the same GPUs."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- failing together ----------------------------------------------------------------------------
# A rank that raises while the others wait in a collective would leave them waiting until the
# process-group timeout. Where one rank works alone (rank 0 saving, choosing the checkpoint to
# resume), the outcome is shared instead of a bare barrier: if any rank failed, every rank raises at
# once, the failed one its own error, the others RankFailed with its one-line message. Elsewhere a
# failed rank exits and the others' next collective fails: engine/parallel.py's lost_peer names that.
class RankFailed(RuntimeError):
    """Another rank of this job failed; the message is its error, prefixed with its rank."""


def gather_objects(obj: object, rt: Runtime) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] in one process)."""
    if not rt.distributed:
        return [obj]
    out: list = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def together(rt: Runtime, fn: Callable[[], Any], here: bool = True) -> Any:
    """fn() on the ranks where `here` holds (None elsewhere), then, in place of a barrier, the
    collective that shares its outcome (above): every rank returns, or every rank raises."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except Exception as e:  # raised again below, on this rank and (as RankFailed) on the others
            error = e
    messages = gather_objects(None if error is None else one_line(error), rt)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RankFailed(f"rank {rank} failed: {message}")
    return result


def one_line(error: BaseException) -> str:
    """An error as the one line a user reads: the message of a user error, else type and message."""
    text = " ".join(str(error).split())
    return text if isinstance(error, ValueError | RankFailed) else f"{type(error).__name__}: {text}"

"""Where a run lives and what it is called: run stamps (unique on this machine, shared by the
processes of a torchrun job), the run-directory check and lock, and the W&B name, group and tags.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from .errors import RUN_LOG, log_files
from .sweeps import _shown_overrides, _sweep_plan

log = logging.getLogger("cli")


def run_stamp(base: str | None = None) -> str:
    """`YYYY-MM-DD/HH-MM-SS`, the name of a run directory under base (outputs/ or multirun/).

    Unique on this machine: `<base>/<stamp>` is created here, and a launch that finds it taken (a
    second one in the same second) takes `<stamp>-2`, `-3`, .... All processes of a torchrun job share
    the first one's stamp through torchrun's key-value store (compare-and-set), so a restart of failed
    workers gets the same directory, as `resume=auto` needs. CAUSALGPT_RUN_STAMP, when set, is used as is.
    """
    if stamp := os.environ.get("CAUSALGPT_RUN_STAMP"):
        return stamp
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _claim_stamp(base)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        raise ValueError("several processes without torchrun's store: set CAUSALGPT_RUN_STAMP (or "
                         "hydra.run.dir) to the same value in every process so they share one run directory")
    from torch.distributed import TCPStore
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=60))
    key = f"causalgpt/run_stamp/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    if store.check([key]):
        return store.get(key).decode()
    mine = _claim_stamp(base)
    stamp = store.compare_set(key, "", mine).decode()
    if stamp != mine and base is not None:  # another process was first: give back the directory taken
        with contextlib.suppress(OSError):
            (Path(base) / mine).rmdir()
    return stamp


def _claim_stamp(base: str | None) -> str:
    now = time.strftime("%Y-%m-%d/%H-%M-%S")
    if base is None:
        return now
    (Path(base) / now).parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        stamp = now if n == 1 else f"{now}-{n}"
        with contextlib.suppress(FileExistsError):
            (Path(base) / stamp).mkdir()  # fails when another launch holds it: try the next suffix
            return stamp


_FRESH: list[Path] = []  # the run directory of this launch when it found it empty (remove_if_unstarted)


def run_dir(out_dir: str | None, base: str) -> str:
    """hydra.run.dir: out_dir when given (.hydra/ and train.log beside the checkpoints), else `<base>/<stamp>`."""
    return str(out_dir or Path(base) / run_stamp(base))


def mark_fresh(path: Path) -> None:
    """Hydra made the run directory before the launch could check it: when empty, a launch that fails
    before its run starts removes it again (remove_if_unstarted)."""
    path = Path(path).resolve()
    if path.is_dir() and not any(path.iterdir()):
        _FRESH.append(path)


def remove_if_unstarted(out_dir: Path) -> None:
    """A launch refused or failed before its run started leaves nothing behind: the run directory it
    found empty goes (with its lock file), and the `outputs/<date>/` above it when that is empty."""
    path = Path(out_dir).resolve()
    if path not in _FRESH or not path.is_dir() or any(p.name != LOCK_FILE for p in path.iterdir()):
        return
    with contextlib.suppress(OSError):
        (path / LOCK_FILE).unlink(missing_ok=True)
        path.rmdir()
        if _STAMP_RE.search(str(path)):
            path.parent.rmdir()  # the date directory, when no other run is in it


def start_run_files(out_dir: Path, dcfg: Any) -> None:
    """Once the run has started (directory locked and checked, data and model set up): write `.hydra/`
    as Hydra would and start `train.log` with everything logged so far (buffer_logs). Resumes rewrite
    .hydra/ and append to train.log."""
    hc = HydraConfig.get()
    saved = out_dir / ".hydra"
    saved.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(dcfg, [k for k in dcfg if k != "hydra"]) if "hydra" in dcfg else dcfg
    for name, node in (("config.yaml", task), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", OmegaConf.create(list(hc.overrides.task)))):
        OmegaConf.save(node, saved / name)
    root = logging.getLogger()
    handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for buffer in [h for h in root.handlers if isinstance(h, BufferingHandler)]:
        root.removeHandler(buffer)
        for record in buffer.buffer:
            handler.handle(record)
    root.addHandler(handler)
    RUN_LOG.append(handler)


def summarise(lines: list[str]) -> None:
    """The closing lines of a run, on the console as plain text and at the end of train.log."""
    print("\n" + "\n".join(lines), flush=True)
    for handler in log_files():
        handler.stream.write("\n".join(lines) + "\n")
        handler.flush()


def buffer_logs() -> None:
    """Keep what is logged from now on for train.log, written once the run directory is known to be
    this run's (start_run_files)."""
    logging.getLogger().addHandler(BufferingHandler(capacity=sys.maxsize))  # never flushes by itself


# A directory holding any of these holds a run. ckpt-<step>.pt: the step-numbered checkpoints kept
# beside last.pt (keep_last), which resume=auto falls back to.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
STEP_CHECKPOINTS = "ckpt-*.pt"
LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold_run_dir(out_dir: Path, resume: str | None, overwrite: bool, enabled: bool = True) -> Iterator[None]:
    """Hold out_dir for the run in this block: lock it (`<out_dir>/.lock`, an OS file lock, released
    however the process dies), then refuse a fresh run into a directory holding another run's files,
    unless overwrite=true, which deletes them (as resume=auto does with no checkpoint to continue).
    enabled=False (every torchrun rank but 0) does nothing."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"{out_dir} is in use by another training run that is still running: wait for it to "
                         "end, or choose another out_dir") from None
    try:
        _check_run_dir(out_dir, resume, overwrite)
        yield
    finally:
        lock.release()


def _starts_fresh(resume: str | None) -> bool:
    from engine.config import NO_RESUME  # here, not at the top: `import cli` stays free of torch
    return str(resume).lower() in NO_RESUME


def _resuming(resume: str | None, out_dir: Path) -> bool:
    """Whether resume= continues a checkpoint (resume=auto only when out_dir has one to continue)."""
    value, out_dir = str(resume).lower(), Path(out_dir)
    return not _starts_fresh(resume) and (value != "auto" or (out_dir / "last.pt").exists()
                                       or any(out_dir.glob(STEP_CHECKPOINTS)))


def _check_run_dir(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    auto = str(resume).lower() == "auto"
    if overwrite and not _starts_fresh(resume):
        raise ValueError(f"resume={resume} continues a run and overwrite=true starts over: give one of them")
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    found += sorted(p.name for p in out_dir.glob(STEP_CHECKPOINTS))
    if not found or _resuming(resume, out_dir):
        return
    if not (overwrite or auto):
        raise ValueError(f"{out_dir} already holds a run ({', '.join(found)}); continue it with resume=auto, "
                         "or start over in it with overwrite=true")
    log.warning("%s: starting over (%s), deleting the earlier run's %s", out_dir,
                "overwrite=true" if overwrite else "resume=auto found no checkpoint", ", ".join(found))
    for name in found:
        (out_dir / name).unlink()


# ---- W&B names -----------------------------------------------------------------------------------
_STAMP_RE = re.compile(r"(\d{4}-\d\d-\d\d)[/\\](\d\d-\d\d-\d\d(?:-\d+)?)$")


def name_wandb_run(cfg: Any) -> None:
    """Fill cfg.logger's unset run_name, group and tags in place, so a W&B page of many runs reads: name
    `<experiment or preset>-<run stamp>` (plus the swept overrides), group = the sweep directory
    (sweeps only), tags experiment, preset, data source and tokenizer. WANDB_NAME / WANDB_RUN_GROUP win
    over these defaults; a resumed run keeps the name it has in W&B."""
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    experiment = hc.runtime.choices.get("experiment") or None
    preset = cfg.model.preset or hc.runtime.choices.get("model")
    lg = cfg.logger
    base = str(hc.sweep.dir if sweep else hc.run.dir).rstrip("/\\")
    m = _STAMP_RE.search(base)  # <date>/<time> of outputs/ or multirun/, wherever it lies
    if lg.run_name is None and not os.environ.get("WANDB_NAME") and not _resuming(cfg.resume, Path(cfg.out_dir)):
        lg.run_name = f"{experiment or preset or 'custom'}-{f'{m[1]}_{m[2]}' if m else Path(base).name}"
        if sweep:  # the swept keys, from the multirun.yaml that Hydra's sweeper writes in its directory
            plan = Path(base) / "multirun.yaml"
            swept = _sweep_plan(OmegaConf.load(plan))[0] if plan.is_file() else None
            lg.run_name += " " + (_shown_overrides(hc.overrides.task, swept) or f"#{hc.job.num}")
    if lg.group is None and sweep and not os.environ.get("WANDB_RUN_GROUP"):
        lg.group = (f"multirun/{m[1]}/{m[2]}" if m else Path(base).name)[-128:]  # W&B's limit
    auto = [f"exp:{experiment}" if experiment else None, f"model:{preset}" if preset else None,
            f"data:{cfg.data.source}", f"tok:{cfg.data.tokenizer}"]
    lg.tags = list(dict.fromkeys([*lg.tags, *(t for t in auto if t)]))


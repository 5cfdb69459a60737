"""Where the numbers go: metrics.jsonl in the run directory, and Weights & Biases when asked for; and
the run's timings (tokens/s, where the wall time went).

One `RunLogger` per run, active on rank 0. W&B is imported only for logger=wandb, so logger=none or
WANDB_MODE=disabled needs neither the package nor a network; a resumed run continues its W&B run.
metrics.jsonl survives a kill at any moment: each record is one write of a complete line (O_APPEND),
and `read_metrics` drops, with a warning, a line that a kill cut short.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from data.atomic import atomic_write

from .config import LoggerConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DEFAULT_PROJECT = "causalgpt"  # when neither logger.project nor WANDB_PROJECT names one


def wandb_mode(cfg: LoggerConfig) -> str:
    """disabled | offline | online, from logger.name/mode and WANDB_MODE (no wandb import for disabled)."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if cfg.name == "none" or cfg.mode == "disabled" or env == "disabled":
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if env in ("online", "offline"):
        return env
    if env == "dryrun":
        return "offline"
    import wandb
    # login(prompt=False, verify=False) only looks for a key (env var, settings, ~/.netrc): no network.
    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class RunLogger:
    """Appends one JSON object per log step and per eval to metrics.jsonl, and mirrors it to W&B."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, *, enabled: bool,
                 wandb_id: str | None = None, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb = self.wandb_id = None  # the W&B run and its id: None without W&B
        self.samples: list[list] = []
        self.last_step: int | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Records after the checkpoint's step came from the part of a killed run replayed now.
            keep = [r for r in read_metrics(self.path) if (r.get("step") or 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        import wandb
        self.wandb = wandb.init(**wandb_init_args(cfg, run_dir, resuming=wandb_id is not None), id=wandb_id,
                                resume="allow" if wandb_id else None, config=config, mode=mode,
                                dir=os.environ.get("WANDB_DIR") or str(run_dir))
        # Plot everything against our own step: a resumed run re-logs steps after its checkpoint, which
        # W&B's internal, strictly increasing step would drop.
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")
        self.wandb_id = self.wandb.id
        log.info("W&B run %s (%s)", self.wandb_id, mode)

    def log(self, record: dict) -> None:
        """Write one record; it must hold "step". Non-finite floats become null (valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        append_line(self.path, json.dumps(clean))
        self.last_step = record["step"]
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)})

    def log_samples(self, step: int, texts: list[str]) -> None:
        """Rows (step, text) of the W&B samples table, logged once at the end (one logged at every eval
        would be a new artifact version each time); metrics.jsonl gets each via log."""
        self.samples.extend([step, t] for t in texts)

    def finish(self, exit_code: int = 0, preempted: bool = False, checkpoint: Path | None = None,
               summary: dict | None = None) -> None:
        """End the W&B run: the summary values, the samples table, the checkpoint as a model artifact when
        given, then finished (exit_code 0) or failed; preempted (stopped by a signal after a clean save) tells W&B so."""
        if self.wandb is not None:
            import wandb
            if summary:
                self.wandb.summary.update(summary)
            if self.samples:
                self.wandb.log({"samples": wandb.Table(columns=["step", "text"], data=self.samples)})
            if checkpoint is not None and checkpoint.is_file():
                artifact = wandb.Artifact(f"model-{self.wandb.id}", type="model",
                                          metadata={"file": checkpoint.name, "step": self.last_step})
                artifact.add_file(str(checkpoint))
                self.wandb.log_artifact(artifact, aliases=[checkpoint.stem, "latest"])
            if preempted:
                self.wandb.mark_preempting()
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


def wandb_init_args(cfg: LoggerConfig, run_dir: Path, resuming: bool = False) -> dict:
    """project, entity, name, group and tags for wandb.init. Null in the config: None, so that W&B reads
    WANDB_PROJECT, ... itself; unset there too: project causalgpt, the run directory's name (a resumed run
    keeps its own). Tags add up: the config's and WANDB_TAGS, which W&B drops when tags are passed."""
    env = os.environ
    name = cfg.run_name or (None if env.get("WANDB_NAME") or resuming else Path(run_dir).name)
    tags = [*cfg.tags, *(t.strip() for t in env.get("WANDB_TAGS", "").split(","))]
    return {"project": cfg.project or (None if env.get("WANDB_PROJECT") else DEFAULT_PROJECT),
            "entity": cfg.entity, "name": name, "group": cfg.group,
            "tags": list(dict.fromkeys(t for t in tags if t))}


def append_line(path: Path, line: str) -> None:
    """Append line + newline as one write(2) on an O_APPEND descriptor: a kill can cut only that write."""
    data = memoryview((line + "\n").encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        while data:  # a regular file takes it in one go; a short write only on a full disk or a signal
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a line that is no complete JSON object (cut short by a kill) is
    dropped with a warning naming the file and the line."""
    path = Path(path)
    records, torn = [], []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        with contextlib.suppress(json.JSONDecodeError):
            if isinstance(record := json.loads(line), dict):
                records.append(record)
                continue
        if line.strip():
            torn.append(n)
    if torn:
        log.warning("%s: dropped %d incomplete line(s) (line %s; cut short by a kill mid-write)", path, len(torn),
                    ", ".join(map(str, torn)))
    return records


class StepMeter:
    """Tokens/s and ms per step since the last log line, without the warm-up steps (compilation, first
    allocations): `with meter: step()` times one. The step does not wait for the device: `read()`
    counts the log step's wait for it."""

    def __init__(self, tokens_per_step: int, warmup_steps: int = 1) -> None:
        self.tokens_per_step = tokens_per_step
        self.warmup_left = warmup_steps
        self.seconds, self.steps = 0.0, 0
        self._t0 = self._t_end = 0.0

    def __enter__(self) -> StepMeter:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._t_end = time.perf_counter()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return
        self.seconds += self._t_end - self._t0
        self.steps += 1

    def read(self) -> dict[str, float]:
        """{"tokens_per_s", "step_ms"} since the last read (empty while only warm-up steps ran); resets.
        Call right after the host has waited for the device: that wait belongs to the counted steps."""
        if not self.steps:
            return {}
        self.seconds += time.perf_counter() - self._t_end
        out = {"tokens_per_s": self.tokens_per_step * self.steps / max(self.seconds, 1e-9),
               "step_ms": 1000 * self.seconds / self.steps}
        self.seconds, self.steps = 0.0, 0
        return out


class Phases:
    """Where a run's wall time goes, for its closing line: `with phases("eval"): ...` adds to "eval"."""

    ORDER = ("start-up", "set-up", "data", "compile", "train", "eval", "save")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.created = time.perf_counter()
        self.startup = process_age_s()  # the interpreter and the imports, before anything here ran

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """`time: start-up 1.9 s, set-up 0.2 s, ..., other 0.1 s; 5.6 s in all`, the phases that ran.
        set-up excludes data (the prepared-data step within it); other: the rest (logging, the loop)."""
        seconds = dict(self.seconds)
        if "set-up" in seconds:
            seconds["set-up"] -= seconds.get("data", 0.0)
        if self.startup is not None:
            seconds["start-up"] = self.startup
        total = time.perf_counter() - self.created + (self.startup or 0.0)
        parts = [f"{name} {seconds[name]:.2f} s" for name in self.ORDER if name in seconds]
        other = total - sum(seconds.values())
        return f"time: {', '.join(parts)}, other {max(other, 0.0):.2f} s; {total:.2f} s in all"


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat); None where that cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None

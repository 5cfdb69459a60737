"""Where the numbers go: metrics.jsonl in the run directory, and Weights & Biases when asked for.

One `RunLogger` per run, active on rank 0 only. W&B is imported lazily, only for logger=wandb, so
a run with logger=none or WANDB_MODE=disabled needs neither the package nor a network. Online when
the user is logged in, offline otherwise (`wandb sync <run_dir>/wandb/offline-run-*` later). A
resumed run passes the W&B run id stored in its checkpoint and continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from .config import LoggerConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def wandb_mode(cfg: LoggerConfig) -> str:
    """disabled | offline | online, from logger.name/mode and the WANDB_MODE environment variable,
    without importing wandb when the answer is disabled."""
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
        self.wandb = None
        self.samples: list[list] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return
        import wandb
        self.wandb = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name or Path(run_dir).name,
            id=wandb_id, resume="allow" if wandb_id else None, config=config, mode=mode,
            tags=list(cfg.tags), dir=os.environ.get("WANDB_DIR") or str(run_dir))
        # Plot everything against our own step: a resumed run re-logs steps after its checkpoint, which
        # W&B's internal, strictly increasing step would drop.
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")
        log.info("W&B run %s (%s)", self.wandb.id, mode)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def _truncate_after(self, step: int) -> None:
        """Drop records after `step`: they came from the part of a killed run that is replayed now."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        """Write one record; it must hold "step". Non-finite floats become null (valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)})

    def log_samples(self, step: int, texts: list[str]) -> None:
        """A growing W&B table of generated text, one row per eval (metrics.jsonl gets it via log)."""
        if self.wandb is None:
            return
        import wandb
        self.samples.extend([step, t] for t in texts)
        self.wandb.log({"step": step, "samples": wandb.Table(columns=["step", "text"], data=self.samples)})

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class StepMeter:
    """Tokens/s and ms per step over the steps since the last log line, warm-up steps left out.

    The first steps of a run (compilation, first allocations) are not what the run will sustain, so
    they are not counted. The step itself does not wait for the device; the log step's read of the
    loss does, and `synced()` adds that wait, so on a GPU the figures cover the device's work too.
    """

    def __init__(self, tokens_per_step: int, warmup_steps: int = 1) -> None:
        self.tokens_per_step = tokens_per_step
        self.warmup_left = warmup_steps
        self.seconds, self.steps = 0.0, 0
        self._t0 = self._t_end = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._t_end = time.perf_counter()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return
        self.seconds += self._t_end - self._t0
        self.steps += 1

    def synced(self) -> None:
        """Call right after the host has waited for the device: that wait belongs to the counted steps."""
        if self.steps:
            self.seconds += time.perf_counter() - self._t_end

    def read(self) -> dict[str, float]:
        """{"tokens_per_s", "step_ms"} since the last read (empty while only warm-up steps ran); resets."""
        if not self.steps:
            return {}
        out = {"tokens_per_s": self.tokens_per_step * self.steps / max(self.seconds, 1e-9),
               "step_ms": 1000 * self.seconds / self.steps}
        self.seconds, self.steps = 0.0, 0
        return out

"""Sweeps that finish: the Hydra callback that prints one table of every job's result at the end of
a `-m` run (configs/train.yaml registers it), and exits non-zero when a job failed. Built on Hydra's
public API only: the Callback events, JobReturn, and the override parser that sweepers use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .errors import _one_line

log = logging.getLogger("cli")


class RunResult(float):
    """What train.py's main returns: the float a Hydra sweeper minimises (final val loss, else the
    best one), carrying the run's summary dict for the sweep table."""

    summary: dict

    def __new__(cls, value: float, summary: dict) -> RunResult:
        obj = super().__new__(cls, value)
        obj.summary = summary
        return obj


class SweepSummary(Callback):
    """The table once the last job has ended. The basic sweeper would re-raise the first failure after
    its batch, printing it again after the table, so this exits itself right after the table
    (HYDRA_FULL_ERROR=1 leaves it to Hydra); with other sweepers the table comes at on_multirun_end."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.sweep_dir = ""
        self.swept: set[str] | None = None  # the keys that take several values
        self.batch_ends: list[int] | None = None  # job count at the end of each batch (basic sweeper)
        self.printed = False

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.rows, self.printed = [], False
        self.sweep_dir = str(config.hydra.sweep.dir)
        self.swept, self.batch_ends = _sweep_plan(config)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        row = {"num": int(config.hydra.job.num), "overrides": _shown_overrides(job_return.overrides, self.swept),
               "run_dir": str(job_return.cfg.get("out_dir") or config.hydra.runtime.output_dir)}
        # The JobReturn field a launcher fills, read as Hydra's own LogJobReturnCallback reads it:
        # the .return_value property would print Hydra's error report and re-raise a failure.
        value = job_return._return_value
        if job_return.status == JobStatus.COMPLETED:
            summary = getattr(value, "summary", {})
            row.update(status="stopped" if summary.get("stopped") else "done", best=summary.get("best_val"),
                       final=summary.get("final_val"), run_dir=summary.get("run_dir", row["run_dir"]))
        else:
            row.update(status=f"error: {_one_line(value)}" if isinstance(value, BaseException) else "error")
        self.rows.append(row)
        done = len(self.rows)
        if self.batch_ends and done in self.batch_ends and (done == self.batch_ends[-1] or self.failed):
            self.end()  # the sweep ends here: complete, or a batch with a failure stops it

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self.end()

    def end(self) -> None:
        """Print the table (once); exit with status 1 when a job failed."""
        if self.printed or not self.rows:
            return
        self.printed = True
        print(format_sweep_table(self.rows, self.sweep_dir), flush=True)
        if self.failed and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {self.failed} of {len(self.rows)} jobs failed (table above; each job's error is also "
                  "in its run directory's train.log)", file=sys.stderr, flush=True)
            sys.exit(1)  # SystemExit passes Hydra's callback guard, which catches only Exception

    @property
    def failed(self) -> int:
        return sum(r["status"].startswith("error") for r in self.rows)


def format_sweep_table(rows: list[dict], sweep_dir: str) -> str:
    """The sweep summary: a header line, then one aligned line per job."""
    def num(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, int | float) and math.isfinite(v) else "-"

    def cut(text: str, width: int = 90) -> str:
        return text if len(text) <= width else text[:width - 3] + "..."

    failed = sum(r["status"].startswith("error") for r in rows)
    table = [("job", "overrides", "status", "best val", "final val", "run dir")]
    table += [(str(r["num"]), r["overrides"] or "-", cut(r["status"]), num(r.get("best")), num(r.get("final")),
               _shown_path(r["run_dir"])) for r in sorted(rows, key=lambda r: r["num"])]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    right = {0, 3, 4}  # numbers
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip() for line in table]
    head = f"\nsweep {_shown_path(sweep_dir)}: {len(rows)} job{'s' * (len(rows) != 1)}"
    head += f", {failed} failed" if failed else ", all done"
    return "\n".join([head, *lines])


def _sweep_plan(config: Any) -> tuple[set[str] | None, list[int] | None]:
    """The keys swept over and, for Hydra's basic sweeper, the job count at the end of each batch, as it
    counts: every combination of the keys' values (a key given twice takes its last override), in
    batches of hydra.sweeper.max_batch_size. (None, None) where the overrides cannot be read here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # e.g. glob() over a config group needs Hydra's config loader
        log.debug("sweep plan unknown: %s", e)
        return None, None
    swept = {_override_key(o.get_key_element()) for o in overrides if o.is_sweep_override()}  # +key: key
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper") or any(
            o.is_sweep_override() and not o.is_discrete_sweep() for o in overrides):  # interval(): not the basic's
        return swept, None
    try:
        values = {o.get_key_element(): len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
                  for o in overrides}
    except Exception as e:  # e.g. a glob() the parser alone cannot expand
        log.debug("sweep batches unknown: %s", e)
        return swept, None
    jobs = math.prod(values.values())
    size = config.hydra.sweeper.get("max_batch_size") or jobs
    return swept, [*range(size, jobs, size), jobs]


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _shown_overrides(overrides: Any, swept: set[str] | None) -> str:
    """A job's overrides, only the swept ones when known (the others are the same in every job)."""
    items = [str(o) for o in overrides or []]
    if swept is not None:
        items = [o for o in items if _override_key(o) in swept]
    return ",".join(items)


def _shown_path(path: str | os.PathLike) -> str:
    """path relative to the working directory when it lies below it, else as given."""
    p = Path(path)
    if p.is_absolute():
        with contextlib.suppress(ValueError):
            return str(p.relative_to(Path.cwd()))
    return str(p)

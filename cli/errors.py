"""User errors as one line: `main_guard` around a Hydra task function.

DataError, CheckpointError and other ValueErrors, and TrainingError end as `error: ...` on stderr and
in the job's log file, with exit status 2; in a sweep (-m) the guard raises instead, so that Hydra
records the job as failed and runs the next one. Every exit path finishes an open W&B run with its
exit code. HYDRA_FULL_ERROR=1 shows tracebacks.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

log = logging.getLogger("cli")
RUN_LOG: list[logging.FileHandler] = []  # train.log, once the run has started (cli.start_run_files)


class JobFailed(CompactHydraException):
    """A sweep job's failure, already reported in full: Hydra records the job as failed and, where it
    re-raises it, prints this message without a traceback."""


def main_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function as the module docstring says."""
    from engine.state import TrainingError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            user_error = isinstance(e, ValueError | TrainingError)  # DataError, CheckpointError: ValueErrors
            _finish_wandb(_exit_code(e, user_error))
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            full = os.environ.get("HYDRA_FULL_ERROR") == "1"
            if full or not user_error:  # a bug or a crash: its traceback, in the log file too
                text = "".join(traceback.format_exception(e)).rstrip()
                _to_log_files(text)
                if full or not sweep:
                    raise  # Hydra prints the traceback
                print(text, file=sys.stderr, flush=True)
                raise JobFailed(f"{type(e).__name__}: {_one_line(e)}") from e
            where = f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            line = f"error{where}: {_one_line(e)}"
            sys.stderr.write(line + "\n")  # one write: lines of two ranks never interleave
            sys.stderr.flush()
            _to_log_files(line)
            if sweep:
                raise JobFailed(_one_line(e)) from e
            sys.exit(2)
    return wrapper


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip() or type(e).__name__


def _exit_code(e: BaseException, user_error: bool) -> int:
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if user_error else 1


def _to_log_files(text: str) -> None:
    """text as an error in the open log files only: the console has already shown it on stderr."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in log_files():
        handler.handle(record)


def log_files() -> list[logging.FileHandler]:
    """The open log files: the root logger's and this run's train.log, which stays open after the
    console handlers are put back (tqdm's logging redirect restores the root logger's handler list)."""
    root = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return [h for h in dict.fromkeys(root + RUN_LOG) if h.stream is not None]


def _finish_wandb(exit_code: int) -> None:
    """Finish the W&B run this process still has open (a run that died), marked with exit_code."""
    run = getattr(sys.modules.get("wandb"), "run", None)
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except Exception as e:  # finishing must not hide the error that ended the run
        log.warning("could not finish the W&B run: %s", e)

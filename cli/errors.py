"""User errors as one line: `main_guard` around a Hydra task function; `run_and_exit`, the end of an
entry point's process.

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
from typing import Any, NoReturn

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


def run_and_exit(main: Callable[[], Any]) -> NoReturn:
    """Run an entry point's main, then end the process with its exit status but without the interpreter's
    teardown: freeing torch's modules one by one takes 0.4-0.7 s on 2 cores, a sixth of a short run.
    Nothing is lost: every file a run writes is closed by the time main returns, the log files are closed
    and the console flushed here, and W&B is torn down as its own exit hook would. An exception other than
    SystemExit, and a failed rank under torchrun, end the process the usual way."""
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # sys.exit("text"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    if code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A failed rank under torchrun ends the usual way: torchrun stops the others once it has gone,
        # and the teardown's moment lets them first report that they lost it (their own error line).
        sys.exit(code)
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left (`| head`), or a stream closed for that reason
            pass
    os._exit(code or 0)


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

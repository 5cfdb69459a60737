"""Hydra glue shared by the entry points (train.py, sample.py); nothing below them imports Hydra.

    import cli
    cli.register_configs()          # schemas of the config groups + the train root, once

    @hydra.main(config_path=cli.CONFIG_DIR, config_name="train", version_base="1.3")
    @cli.main_guard
    def main(cfg: DictConfig) -> None: ...

    if __name__ == "__main__":
        sys.argv = cli.quote_free_text(sys.argv, cli.TRAIN_TEXT)  # prompts, paths, names as typed
        main()

- `quote_free_text(argv, fields)`: free-text values (prompts, paths, W&B names and tags) are taken
  exactly as the shell hands them over: before Hydra parses argv they are quoted and escaped in its
  override grammar, so `prompt=To be, or not to be`, `prompt=日本語` or `data.path=a,b.txt` work.
  `as_typed()` turns such overrides back into shell arguments, for commands printed to be pasted.
- `register_configs()` stores each group's dataclass in Hydra's ConfigStore as `<group>/schema`
  (model, data, optim, logger; the group YAML files start with `defaults: [schema, _self_]`) and
  TrainConfig as `train_schema`, so typos and wrong types are refused by Hydra with its own message.
  It also registers the `${run_stamp:}` resolver that names run directories. Idempotent.
- `main_guard(fn)` turns the errors users cause (DataError, CheckpointError and other ValueErrors,
  TrainingError) into one line, `error: ...` on stderr and in the job's log file, and exit status 2;
  in a sweep (-m) it raises instead, so that Hydra records the job as failed and runs the next one.
  Every exit path finishes an open W&B run with its exit code. HYDRA_FULL_ERROR=1 shows tracebacks.
- `SweepSummary`: the Hydra callback (configs/train.yaml) that prints one table at the end of a sweep.
- `hold_run_dir()`: refuses to start a fresh run over another run's files and locks the directory.
- `run_stamp()`: `<date>/<time>` for the run directory, unique on this machine, identical in every
  process of a torchrun job. `name_wandb_run()`: W&B name, group and tags that say what ran.
- `parse_args()`, `fail()`: key=value arguments and one-line errors for the scripts that do without Hydra.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import logging
import math
import os
import re
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
_STAMP_KEY = "causalgpt/run_stamp"
_registered = False
log = logging.getLogger("cli")


def register_configs() -> None:
    """Register the config schemas and the run_stamp resolver with Hydra/OmegaConf (once)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from data.config import DataConfig
    from engine.config import LoggerConfig, OptimConfig, TrainConfig
    from model import ModelConfig

    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    _registered = True


# ---- free text on the command line ---------------------------------------------------------------
# How the value of each free-text field is read. TEXT: the text as given. OPTIONAL: the same, except
# that `null` alone stays null. LIST: items separated by commas, optionally inside [...], each taken
# as given (spaces around them dropped). TEXT_OR_LIST: [a, b] is a LIST, anything else OPTIONAL.
TEXT, OPTIONAL, LIST, TEXT_OR_LIST = "text", "optional", "list", "text_or_list"
_LOGGER_TEXT = {"logger.run_name": OPTIONAL, "logger.group": OPTIONAL, "logger.tags": LIST}
TRAIN_TEXT: dict[str, str] = {"data.path": TEXT_OR_LIST, "data.cache_dir": OPTIONAL, "data.tokenizer_path": OPTIONAL,
                              "out_dir": OPTIONAL, "resume": OPTIONAL, "init_from": OPTIONAL, **_LOGGER_TEXT}
SAMPLE_TEXT: dict[str, str] = {"prompt": TEXT, "prompt_file": OPTIONAL, "ckpt": OPTIONAL, "outputs_dir": TEXT,
                               "out_dir": OPTIONAL, **_LOGGER_TEXT}
# Hydra's options that take the next argument as their value (that argument is not an override).
_OPTIONS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                       "--package", "-p", "--info", "-i", "--experimental-rerun", "--shell-completion", "-sc"}
_OVERRIDE = re.compile(r"(\+{0,2})([A-Za-z_][\w.\-]*)=(.*)", re.DOTALL)


def quote_free_text(argv: list[str], fields: dict[str, str]) -> list[str]:
    """argv with the value of every `field=value` override named in fields (also `+field=`,
    `++field=`) rewritten as a quoted string of Hydra's override grammar that means exactly that
    text: commas, quotes, `=`, colons, brackets, `${...}`, non-ASCII, spaces. Everything else (-m,
    other overrides, sweeps, `~key`) is left for Hydra as it is."""
    out, value_of_option = list(argv[:1]), False
    for arg in argv[1:]:
        if value_of_option or arg.startswith("-"):
            value_of_option = arg in _OPTIONS_WITH_VALUE
            out.append(arg)
            continue
        m = _OVERRIDE.fullmatch(arg)
        if m and m[2] in fields:
            arg = f"{m[1]}{m[2]}={hydra_value(m[3], fields[m[2]])}"
        out.append(arg)
    return out


def hydra_value(text: str, kind: str = TEXT) -> str:
    """The override value (Hydra's grammar) that stands for text read as kind (TEXT, OPTIONAL, ...)."""
    if kind in (OPTIONAL, TEXT_OR_LIST) and text == "null":
        return "null"
    if kind == LIST or (kind == TEXT_OR_LIST and text.startswith("[") and text.endswith("]")):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        items = [item.strip() for item in inner.split(",")]
        return "[" + ",".join(hydra_quote(item) for item in items if item) + "]"
    return hydra_quote(text)


def as_typed(overrides: list[str], fields: dict[str, str]) -> list[str]:
    """Overrides as one types them in a shell: the inverse of quote_free_text for the free-text
    fields (Hydra's quoting and OmegaConf's escapes undone), then each argument shell-quoted where the
    shell needs it. For commands printed for the user to paste (e.g. train.py's resume line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    parser, out = OverridesParser.create(), []
    for arg in overrides:
        m = _OVERRIDE.fullmatch(arg)
        if m and m[2] in fields and m[3][:1] in ("'", "["):  # written by hydra_value()
            value = parser.parse_override(arg).value()
            texts = [OmegaConf.create({"v": v})["v"] for v in (value if isinstance(value, list) else [value])]
            arg = f"{m[1]}{m[2]}=" + (f"[{', '.join(texts)}]" if isinstance(value, list) else texts[0])
        out.append(shlex.quote(arg))
    return out


def hydra_quote(text: str) -> str:
    """text as a single-quoted string of Hydra's override grammar, which then hands OmegaConf a value
    that resolves to text. Two layers of escaping, inside out:
    - OmegaConf reads `${` as the start of an interpolation: written `\\${`, with the backslashes
      right before it doubled (only when the text holds a `${`; otherwise OmegaConf reads it as is);
    - in a quoted Hydra value only backslashes before a quote and at the end are escapes: a quote
      becomes `\\'` with the backslashes before it doubled, and trailing backslashes are doubled."""
    if "${" in text:
        text = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)
    text = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m[1] * 2, text)
    return f"'{text}'"


# ---- errors --------------------------------------------------------------------------------------
class JobFailed(CompactHydraException):
    """A sweep job's failure, already reported in full (its line, or its traceback): Hydra records the
    job as failed, and where it re-raises the failure it prints this message without a traceback."""


def main_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function: user errors end as one line and exit status 2 (in a sweep the
    job fails and the next one runs); any exit finishes an open W&B run with the exit code."""
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
            sweep = _in_sweep()
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                _to_log_files(logging.ERROR, "".join(traceback.format_exception(e)).rstrip())
                raise
            if not user_error:  # a bug or a crash: its traceback, in the log file too
                text = "".join(traceback.format_exception(e)).rstrip()
                _to_log_files(logging.ERROR, text)
                if not sweep:
                    raise  # Hydra prints the traceback
                print(text, file=sys.stderr, flush=True)
                raise JobFailed(f"{type(e).__name__}: {_one_line(e)}") from e
            rank = os.environ.get("RANK", "0")
            where = "" if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else f" (rank {rank})"
            message = _one_line(e)
            print(f"error{where}: {message}", file=sys.stderr, flush=True)
            _to_log_files(logging.ERROR, f"error{where}: {message}")
            if sweep:
                raise JobFailed(message) from e
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


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _to_log_files(level: int, text: str) -> None:
    """Write text to the log files of the root logger (Hydra's `<job>.log`), not to the console:
    the console has already shown it on stderr."""
    record = log.makeRecord(log.name, level, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _finish_wandb(exit_code: int) -> None:
    """Finish the W&B run this process still has open (a run that died), marked with exit_code."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except Exception as e:  # finishing must not hide the error that ended the run
        log.warning("could not finish the W&B run: %s", e)


# ---- sweeps --------------------------------------------------------------------------------------
class RunResult(float):
    """What train.py's main returns: the float a Hydra sweeper minimises (final val loss, else the
    best one), carrying the run's summary dict for the sweep table."""

    summary: dict

    def __new__(cls, value: float, summary: dict) -> RunResult:
        obj = super().__new__(cls, value)
        obj.summary = summary
        return obj


class SweepSummary(Callback):
    """With -m: one line per job (number, overrides, done/error, best and final val, run directory),
    printed as one table once the sweep's last job has ended; then, if a job failed, one line
    `error: N of M jobs failed` and exit status 1.

    Hydra's basic sweeper runs every job of a batch (all of them, unless hydra.sweeper.max_batch_size
    is set) and only then re-raises the first failure, which would print that job's overrides, its
    error again and a hint after the table. The sweep is over at that point, so this callback exits
    with status 1 itself, right after the table (HYDRA_FULL_ERROR=1 leaves Hydra's way, traceback
    included). With another sweeper the table comes from on_multirun_end.
    """

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
        value = job_return._return_value  # read without .return_value, which re-raises a failure
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
        self.print_table()
        if self.failed and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {self.failed} of {len(self.rows)} jobs failed (table above; each job's error is also "
                  "in its run directory's train.log)", file=sys.stderr, flush=True)
            sys.exit(1)  # SystemExit passes Hydra's callback guard, which catches only Exception

    @property
    def failed(self) -> int:
        return sum(r["status"].startswith("error") for r in self.rows)

    def print_table(self) -> None:
        if self.printed or not self.rows:
            return
        self.printed = True
        print(format_sweep_table(self.rows, self.sweep_dir), flush=True)


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
    """The keys swept over, and (for Hydra's basic sweeper) the job count at the end of each batch,
    computed the way the sweeper computes them; (None, None) where that is not possible."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # e.g. glob() over a config group needs Hydra's config loader
        log.debug("sweep plan unknown: %s", e)
        return None, None
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return swept, None
    try:
        batches = BasicSweeper.split_arguments(overrides, config.hydra.sweeper.get("max_batch_size"))
    except Exception as e:
        log.debug("sweep batches unknown: %s", e)
        return swept, None
    return swept, list(itertools.accumulate(len(b) for b in batches))


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


# ---- run directories -----------------------------------------------------------------------------
def run_stamp(base: str | None = None) -> str:
    """`YYYY-MM-DD/HH-MM-SS`, the name of a run directory under base (outputs/ or multirun/).

    Unique on this machine: the directory `<base>/<stamp>` is created here (mkdir, which fails when it
    exists), and a launch that finds it taken, e.g. a second one in the same second, takes
    `<stamp>-2`, `-3`, .... Every process of a torchrun job must write into the same directory, so the
    first process to ask stores its stamp in torchrun's rendezvous key-value store (compare-and-set:
    first writer wins) and all of them use the stored one. A torchrun restart of failed workers gets
    the same stamp, hence the same directory, which is what `resume=auto` needs.
    CAUSALGPT_RUN_STAMP, when set, is used as is (e.g. by a launcher other than torchrun).
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
    key = f"{_STAMP_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
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
    for n in itertools.count(1):
        stamp = now if n == 1 else f"{now}-{n}"
        path = Path(base) / stamp
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            return stamp
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# A directory holding any of these holds a run. ckpt-<step>.pt: the step-numbered checkpoints kept
# beside last.pt (keep_last), which resume=auto falls back to.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
STEP_CHECKPOINTS = "ckpt-*.pt"
LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold_run_dir(out_dir: Path, resume: str | None, overwrite: bool, enabled: bool = True) -> Iterator[None]:
    """Hold out_dir for the run in this block: lock it (`<out_dir>/.lock`: pid and host, created
    exclusively; a lock left by a run that no longer lives on this host is taken over), then refuse
    a fresh run (no resume) into a directory that holds another run's files (RUN_FILES, step
    checkpoints), unless overwrite=true, which deletes them. resume=auto with no checkpoint to
    continue starts over the same way. enabled=False (every torchrun rank but 0) does nothing."""
    if not enabled:
        yield
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(out_dir)
    try:
        _check_run_dir(out_dir, resume, overwrite)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _resuming(resume: str | None, out_dir: Path) -> bool:
    """Whether resume= continues a checkpoint (resume=auto only when out_dir has one to continue)."""
    value = str(resume).lower() if resume is not None else ""
    if value in ("", "none", "null", "false", "never"):
        return False
    out_dir = Path(out_dir)
    return value != "auto" or (out_dir / "last.pt").exists() or any(out_dir.glob(STEP_CHECKPOINTS))


def _check_run_dir(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    auto = str(resume).lower() == "auto"
    if overwrite and _resuming(resume, out_dir) and not auto:
        raise ValueError(f"resume={resume} continues a run and overwrite=true starts over: give one of them")
    if overwrite and auto:
        raise ValueError("resume=auto continues the run in out_dir and overwrite=true starts over: give one of them")
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


def _take_lock(out_dir: Path) -> Path:
    path, host = out_dir / LOCK_FILE, socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:
                continue  # gone since: try again
            pid, holder_host = holder
            if holder_host == host and pid > 0 and not _pid_alive(pid):
                log.warning("%s: taking over the lock of a run that is gone (pid %d)", out_dir, pid)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise ValueError(f"{out_dir} is in use by a running training run (pid {pid} on {holder_host}): wait "
                             f"for it to end or choose another out_dir (if that run is gone, delete {path})") from None
        try:
            os.write(fd, f"{os.getpid()} {host}\n".encode())
        finally:
            os.close(fd)
        return path
    raise ValueError(f"{out_dir}: another run is taking its lock at the same moment; choose another out_dir")


def _lock_holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) from a lock file; (-1, "an unknown host") when it cannot be read; None when gone."""
    try:
        fields = path.read_text().split()
    except FileNotFoundError:
        return None
    except OSError:
        return -1, "an unknown host"
    if len(fields) != 2 or not fields[0].isdigit():
        return -1, "an unknown host"
    return int(fields[0]), fields[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ---- W&B names -----------------------------------------------------------------------------------
_STAMP_RE = re.compile(r"(\d{4}-\d\d-\d\d)[/\\](\d\d-\d\d-\d\d(?:-\d+)?)$")


def name_wandb_run(cfg: Any) -> None:
    """Fill cfg.logger's run_name, group and tags, in place, so that a W&B project page of many runs
    reads: name `<experiment or preset>-<run stamp>` (plus the swept overrides in a sweep), group =
    the sweep directory (sweeps only), tags experiment, preset, data source and tokenizer. A value set
    in the config wins; where it is unset, WANDB_NAME / WANDB_RUN_GROUP win over these defaults (and
    WANDB_PROJECT, WANDB_ENTITY, WANDB_TAGS are honoured by engine/metrics.py). A resumed run keeps
    the name it has in W&B."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    choices = hc.runtime.choices
    experiment = choices.get("experiment") or None
    preset = cfg.model.preset or choices.get("model")
    lg = cfg.logger
    if lg.run_name is None and not os.environ.get("WANDB_NAME") and not _resuming(cfg.resume, Path(cfg.out_dir)):
        base = str(hc.sweep.dir if sweep else hc.run.dir)
        m = _STAMP_RE.search(base.rstrip("/\\"))
        stamp = f"{m[1]}_{m[2]}" if m else Path(base).name
        lg.run_name = f"{experiment or preset or 'custom'}-{stamp}"
        if sweep:
            swept = _swept_keys(Path(str(hc.sweep.dir)))
            lg.run_name += " " + (_shown_overrides(hc.overrides.task, swept) or f"#{hc.job.num}")
    if lg.group is None and sweep and not os.environ.get("WANDB_RUN_GROUP"):
        lg.group = _shown_path(str(hc.sweep.dir))[-128:]  # W&B's limit on a group name
    auto = [f"exp:{experiment}" if experiment else None, f"model:{preset}" if preset else None,
            f"data:{cfg.data.source}", f"tok:{cfg.data.tokenizer}"]
    lg.tags = list(dict.fromkeys([*lg.tags, *(t for t in auto if t)]))


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys a sweep varies, from the multirun.yaml that Hydra's sweeper writes in its directory."""
    from omegaconf import OmegaConf
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    return _sweep_plan(OmegaConf.load(path))[0]


# ---- the plain key=value scripts (scripts/export.py, scripts/export_hf.py) ---------------------------
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def fail(message: str) -> NoReturn:
    """Print one `error: ...` line and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str], defaults: dict[str, str | bool | None], usage: str) -> dict:
    """key=value arguments against defaults (None = required); bools accept true/false."""
    args = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")  # tolerate Hydra's "+key=value" habit
        if not sep or key not in defaults:
            fail(f"unexpected argument {arg!r}; usage: {usage}")
        if isinstance(defaults[key], bool):
            if value.lower() not in TRUE + FALSE:
                fail(f"{key}={value!r} must be true or false")
            args[key] = value.lower() in TRUE
        else:
            args[key] = value
    missing = [k for k, v in args.items() if v is None or v == ""]
    if missing:
        fail(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return args

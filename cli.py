"""Hydra glue shared by the entry points (train.py, sample.py); nothing below them imports Hydra.

    import cli
    cli.register_configs()          # schemas of the config groups + the train root, once

    @hydra.main(config_path=cli.CONFIG_DIR, config_name="train", version_base="1.3")
    @cli.main_guard
    def main(cfg: DictConfig) -> None: ...

- `register_configs()` stores each group's dataclass in Hydra's ConfigStore as `<group>/schema`
  (model, data, optim, logger; the group YAML files start with `defaults: [schema, _self_]`) and
  TrainConfig as `train_schema`, so typos and wrong types are refused by Hydra with its own message.
  It also registers the `${run_stamp:}` resolver that names run directories. Idempotent.
- `main_guard(fn)` turns the errors users cause (DataError, CheckpointError and other ValueErrors,
  TrainingError) into one line, `error: ...` on stderr, and exit status 2; HYDRA_FULL_ERROR=1 shows
  the traceback instead.
- `run_stamp()`: `<date>/<time>` for the run directory, identical in every process of a torchrun job.
- `parse_args()`, `fail()`: key=value arguments and one-line errors for the scripts that do without Hydra.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")
_STAMP_KEY = "causalgpt/run_stamp"
_registered = False


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


def run_stamp() -> str:
    """`YYYY-MM-DD/HH-MM-SS`, the name of a run directory under outputs/ or multirun/.

    Every process of a torchrun job must write into the same directory, but each one would read its
    own clock. So the first process to ask stores its stamp in torchrun's rendezvous key-value store
    (compare-and-set: first writer wins) and all of them use the stored one. A torchrun restart of
    failed workers gets the same stamp, hence the same directory, which is what `resume=auto` needs.
    CAUSALGPT_RUN_STAMP, when set, is used as is (e.g. by a launcher other than torchrun).
    """
    if stamp := os.environ.get("CAUSALGPT_RUN_STAMP"):
        return stamp
    now = time.strftime("%Y-%m-%d/%H-%M-%S")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return now
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        raise ValueError("several processes without torchrun's store: set CAUSALGPT_RUN_STAMP (or "
                         "hydra.run.dir) to the same value in every process so they share one run directory")
    from torch.distributed import TCPStore
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=60))
    key = f"{_STAMP_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    return store.compare_set(key, "", now).decode()


def main_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function so that user errors end as one line and exit status 2."""
    from engine.state import TrainingError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TrainingError) as e:  # DataError and CheckpointError are ValueErrors
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            rank = os.environ.get("RANK", "0")
            where = "" if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else f" (rank {rank})"
            message = " ".join(str(e).split("\n")).strip() or type(e).__name__
            print(f"error{where}: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
    return wrapper


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

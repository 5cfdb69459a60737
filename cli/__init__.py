"""Hydra glue shared by the entry points (train.py, sample.py); nothing below them imports Hydra.

    text.py     free text on the command line as typed (quote_free_text, as_typed)
    errors.py   main_guard: user errors as one line, W&B finished on every exit path
    sweeps.py   SweepSummary: one table of every job of a -m run
    runs.py     run stamps, the run-directory check and lock, W&B names
    scripts.py  key=value arguments for the scripts without Hydra
    presets.py  model_preset(name): a named size from configs/model/, outside Hydra

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
- `model_preset(name)`: the fields of configs/model/<name>.yaml, for `ModelConfig(**fields)` in scripts and tests.
"""

from __future__ import annotations

from pathlib import Path

from .errors import JobFailed, main_guard
from .presets import model_preset
from .runs import (
    LOCK_FILE,
    RUN_FILES,
    buffer_logs,
    hold_run_dir,
    mark_fresh,
    name_wandb_run,
    remove_if_unstarted,
    run_dir,
    run_stamp,
    start_run_files,
    summarise,
)
from .scripts import fail, parse_args
from .sweeps import RunResult, SweepSummary, format_sweep_table
from .text import (
    LIST,
    OPTIONAL,
    SAMPLE_TEXT,
    TEXT,
    TEXT_OR_LIST,
    TRAIN_TEXT,
    as_typed,
    check_added_keys,
    hydra_quote,
    hydra_value,
    quote_free_text,
)

__all__ = ["CONFIG_DIR", "LIST", "LOCK_FILE", "OPTIONAL", "RUN_FILES", "SAMPLE_TEXT", "TEXT", "TEXT_OR_LIST",
           "TRAIN_TEXT", "JobFailed", "RunResult", "SweepSummary", "as_typed", "buffer_logs", "check_added_keys",
           "fail", "format_sweep_table", "hold_run_dir", "hydra_quote", "hydra_value", "main_guard", "mark_fresh",
           "model_preset", "name_wandb_run", "parse_args", "quote_free_text", "register_configs",
           "remove_if_unstarted", "run_dir", "run_stamp", "start_run_files", "summarise"]

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
_registered = False


def register_configs() -> None:
    """Register the config schemas and the run_stamp resolver with Hydra/OmegaConf (once)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from engine.config import TrainConfig

    # The root schemas only: their typed fields (model: ModelConfig, ...) check every group file
    # merged into them, and no group offers a "schema" option.
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
        OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True)
    _registered = True

"""Hydra glue shared by the entry points (train.py, sample.py); nothing below them imports Hydra.

text.py: free text on the command line as typed, +key= typos; errors.py: user errors as one line;
sweeps.py: one table of every job of a -m run; runs.py: run stamps, the run directory, train.log, W&B
names; scripts.py: key=value arguments and the model presets for the scripts without Hydra.

An entry point calls cli.register_configs() once, wraps its task function in @cli.main_guard below
@hydra.main(config_path=cli.CONFIG_DIR, ...), passes argv through cli.quote_free_text first, and runs it
as cli.run_and_exit(main).
"""

from __future__ import annotations

from pathlib import Path

from .errors import main_guard, run_and_exit
from .runs import (
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
from .scripts import fail, model_preset, parse_args
from .sweeps import RunResult, SweepSummary
from .text import SAMPLE_TEXT, TRAIN_TEXT, as_typed, check_added_keys, quote_free_text

__all__ = ["CONFIG_DIR", "SAMPLE_TEXT", "TRAIN_TEXT", "RunResult", "SweepSummary", "as_typed", "buffer_logs",
           "check_added_keys", "fail", "hold_run_dir", "main_guard", "mark_fresh", "model_preset", "name_wandb_run",
           "parse_args", "quote_free_text", "register_configs", "remove_if_unstarted", "run_and_exit", "run_dir",
           "run_stamp", "start_run_files", "summarise"]

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def register_configs() -> None:
    """Register the train root schema (TrainConfig as `train_schema`: its typed fields check every group
    file merged into it, so Hydra refuses typos and wrong types) and the resolvers that name run
    directories. Idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from engine.config import TrainConfig

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)  # no group offers a "schema" option
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
        OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True)

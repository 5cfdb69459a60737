"""Shared fixtures for the training tests: a small corpus on disk, a private data cache, and the
real Hydra configs composed with small overrides (the model shrunk to a few thousand parameters).

Tests never touch ~/.cache, the network or files outside the repository: the corpus is generated here and the
prepared data lives in a session temp dir (prepared once, then a cache hit for every test).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cli
from engine.config import TrainConfig
from model import ModelConfig

ROOT = Path(__file__).resolve().parent.parent

_WORDS = ("the king and queen walk to the castle . a cat sat on the mat while the dog ran in the "
          "garden ; my lord , what news from rome ? none , good sir , but rain and wind .").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 kB of word salad with real structure (words, punctuation, lines): learnable in steps."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session", autouse=True)
def runs_outside_the_repository(tmp_path_factory: pytest.TempPathFactory):
    """Runs that a test starts without out_dir (Hydra's outputs/<date>/<time>, multirun/) go to a
    temporary folder, not the checkout's outputs/: $CAUSALGPT_RUNS, which configs/train.yaml reads."""
    before = os.environ.get("CAUSALGPT_RUNS")
    os.environ["CAUSALGPT_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    yield
    if before is None:
        os.environ.pop("CAUSALGPT_RUNS", None)
    else:
        os.environ["CAUSALGPT_RUNS"] = before


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def tiny_overrides(corpus: Path, data_cache: Path, tmp_path: Path) -> list[str]:
    """Overrides that make a run take a second or two: a 1-layer, 32-wide model, context 16,
    batch 4, the test corpus, no W&B, everything written under tmp_path/run."""
    return [
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "batch_size=4", "data=files", f"data.path={corpus}", f"data.cache_dir={data_cache}",
        "logger=none", "device=cpu", "max_iters=20", "eval_interval=10", "eval_iters=2",
        "log_interval=5", "sample_tokens=8", "final_eval_iters=0", "threads=1",
        f"out_dir={tmp_path / 'run'}",
    ]


def preset_config(name: str, **overrides) -> ModelConfig:
    """configs/model/<name>.yaml with overrides, as `model=<name> model.<key>=<value>` composes it."""
    return ModelConfig(**{**cli.model_preset(name), **overrides})


def compose_train(overrides: list[str]) -> TrainConfig:
    """configs/train.yaml composed with overrides, as train.py's main would get it."""
    cli.register_configs()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        dcfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(dcfg)


def run_script(args: list[str], env: dict | None = None, timeout: float = 120,
               **kwargs) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root (`torchrun <args>` when args[0] is "torchrun"),
    with W&B off and one thread per process."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, *(["-m", "torch.distributed.run", *args[1:]] if args[0] == "torchrun" else args)]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs)


def names_besides_locks(directory: Path) -> list[str]:
    """The sorted names in directory, less the lock files (`*.lock`): filelock leaves a released
    lock's empty file in place, and the next holder simply locks it again."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skip them cleanly on a machine without it (the figures of
    tests/test_gpu_figures.py decide for themselves: a dry run runs them on CPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and "figures" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module's tests: batch-1 decoding of models this small is fastest on one
    thread, and on a shared 2-core CI box two threads spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_run(tiny_overrides):
    """make(*overrides) -> train.Run: the tiny test recipe set up (train.set_up) without running the
    loop, for tests of the step itself; every run's logger and runtime are closed afterwards."""
    import train
    from engine.runtime import setup_runtime
    runs = []

    def make(*extra: str) -> train.Run:
        cfg = compose_train([*tiny_overrides, *extra])  # a later device=/threads= wins
        run = train.set_up(cfg, setup_runtime(cfg.device, cfg.precision, cfg.compile, cfg.threads))
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.logger.finish()
        run.rt.close()


def train_step(run, lr: float = 1e-3, clip: float = 1.0):
    """One step as train.py's loop runs it (engine/step.py's train_step on every stream's next batch)."""
    from engine.step import train_step as step
    return step(run.state, run.train_model, [s.next_batch() for s in run.streams], lr, clip)


def snapshot(run) -> tuple[dict, dict]:
    """Deep copies of a run's model and optimizer state dicts."""
    import copy
    return copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.state.optimizer.state_dict())


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """Two snapshots are equal bit for bit (raises AssertionError naming what changed)."""
    (model_a, opt_a), (model_b, opt_b) = a, b
    for name, tensor in model_a.items():
        assert torch.equal(tensor, model_b[name]), f"{name} changed"
    assert opt_a["state"].keys() == opt_b["state"].keys(), "optimizer state changed"
    for pid, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][pid][key]), f"optimizer state {pid}/{key} changed"

"""Configs and the command line: the real YAML files compose into typed dataclasses; typos and wrong
types are refused by Hydra with its own message; experiments hold the recipes they promise; the
model presets are written out in YAML, once (cli.model_preset reads them); the training schema has one
set of defaults; the learning-rate schedules, weight-decay groups, run-directory stamp and the
one-line error guard."""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_train, preset_config, run_script
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import cli
from engine.config import LoggerConfig, OptimConfig, TrainConfig
from engine.optim import lr_at, param_groups
from model import GPT, ModelConfig

CONFIGS = Path(cli.CONFIG_DIR)
PRESETS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def test_defaults_compose_to_typed_dataclasses():
    cfg = compose_train([])
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.model.preset == "tiny" and cfg.model.n_layer == 4
    assert cfg.data.source == "shakespeare_char" and cfg.logger.name == "wandb"
    assert cfg.device == "auto" and cfg.precision == "auto" and cfg.compile == "auto"
    assert cfg.ckpt_interval == cfg.eval_interval


def test_experiment_shakespeare_char_is_nanogpts_baseline():
    cfg = compose_train(["experiment=shakespeare_char"])
    m, o = cfg.model, cfg.optim
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
    assert (cfg.batch_size, cfg.max_iters, cfg.eval_interval, cfg.eval_iters) == (64, 5000, 250, 200)
    assert (o.lr, o.min_lr, o.warmup_iters, o.betas, o.weight_decay, cfg.grad_clip) == (
        1e-3, 1e-4, 100, [0.9, 0.99], 0.1, 1.0)
    # An override on the command line still wins over the experiment.
    assert compose_train(["experiment=shakespeare_char", "model.n_layer=8"]).model.n_layer == 8


@pytest.mark.parametrize("name", ["shakespeare_char_cpu", "tinystories", "gpt2_124m"])
def test_other_experiments_compose(name):
    cfg = compose_train([f"experiment={name}"])
    if name == "gpt2_124m":  # ~0.5 M tokens a step on one process
        assert cfg.batch_size * cfg.model.block_size * cfg.gradient_accumulation_steps == 524_288
        assert cfg.data.streaming and cfg.model.n_layer == 12
    if name == "tinystories":
        assert cfg.data.tokenizer == "bpe"


def test_typo_and_wrong_type_are_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="n_layr"):
        compose_train(["model.n_layr=3"])
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["optim.lr=fast"])
    assert "Value 'fast' of type 'str' could not be converted to Float" in str(e.value.__cause__)


def test_cli_typo_prints_hydras_message_without_running(tmp_path):
    r = run_script(["train.py", "model.n_layr=3", f"hydra.run.dir={tmp_path}/run"], timeout=60)
    assert r.returncode == 1
    assert "Could not override 'model.n_layr'" in r.stderr and "Key 'n_layr' not in 'ModelConfig'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_invalid_choices_name_the_field_and_the_valid_values():
    with pytest.raises(ValueError, match=r"precision='fp8' is not valid; choose one of \['auto', 'bf16'"):
        compose_train(["precision=fp8"])
    with pytest.raises(ValueError, match="model.n_embd=30 must be divisible by model.n_head=4"):
        compose_train(["model.n_embd=30"])


@pytest.mark.slow
def test_multirun_sweep_gives_each_run_its_own_directory(tiny_overrides, tmp_path):
    args = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    r = run_script(["train.py", "-m", *args, "max_iters=4", "optim.lr=1e-3,2e-3",
                    f"hydra.sweep.dir={tmp_path}/sweep"])
    assert r.returncode == 0, r.stderr[-2000:]
    table = r.stdout[r.stdout.index(f"sweep {tmp_path}/sweep: 2 jobs, all done"):].splitlines()
    assert [line.split()[:3] for line in table[2:]] == [["0", "optim.lr=0.001", "done"], ["1", "optim.lr=0.002", "done"]]
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/last.pt"))
    assert [p.name for p in runs] == ["0", "1"]
    lrs = [torch.load(p / "last.pt", weights_only=True)["config"]["optim"]["lr"] for p in runs]
    assert lrs == [1e-3, 2e-3]
    for run in runs:  # the end-of-run message says where the checkpoint is and how to sample from it
        assert f"python sample.py ckpt={run}" in r.stdout


def test_main_guard_turns_user_errors_into_one_line(capsys):
    @cli.main_guard
    def task():
        raise ValueError("data.path=/nope does not exist\nsecond line")

    with pytest.raises(SystemExit) as e:
        task()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.path=/nope does not exist second line\n"


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, schedule="cosine")
    lrs = [lr_at(s, cfg, max_iters=111) for s in range(120)]  # steps 0..110 run
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way from step 10 to the last, 110: (max + min) / 2
    assert lrs[109] > 0.1 and lrs[110] == lrs[119] == 0.1  # the last step runs at min_lr
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # monotone decay after warmup


def test_wsd_and_constant_schedules():
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=10, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, wsd, max_iters=100) for s in range(100)]  # steps 0..99 run; the decay from step 80
    assert all(v == 1.0 for v in lrs[10:81])  # stable phase
    assert lrs[80:] == pytest.approx([1 - k / 19 for k in range(20)])  # linear decay, min_lr on the last step
    assert lrs[99] == 0.0
    const = OptimConfig(lr=0.3, min_lr=0.0, warmup_iters=0, schedule="constant")
    assert {lr_at(s, const, 50) for s in range(50)} == {0.3}


def test_weight_decay_only_on_2d_weights():
    model = GPT(preset_config("tiny", n_layer=2, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # the tied embedding / LM head counted once
    with pytest.raises(ValueError, match="optim.schedule='linear' is not valid"):
        OptimConfig(schedule="linear")


def test_run_stamp_is_shared_by_all_torchrun_processes(monkeypatch, tmp_path):
    """Two 'ranks' whose clocks disagree get one stamp: the first stored in torchrun's store wins."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=10))
    for key, value in {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "t1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CAUSALGPT_RUN_STAMP", raising=False)
    clock = iter(["2030-01-01/00-00-00", "2030-01-01/00-00-07", "2030-01-01/00-00-09"])
    monkeypatch.setattr(time, "strftime", lambda fmt: next(clock))
    assert cli.run_stamp() == cli.run_stamp() == "2030-01-01/00-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t2")  # with the directory made: by the first process only
    base = tmp_path / "outputs"
    assert cli.run_stamp(str(base)) == cli.run_stamp(str(base)) == "2030-01-01/00-00-07"
    assert [p.name for p in base.glob("*/*")] == ["00-00-07"]
    monkeypatch.setenv("CAUSALGPT_RUN_STAMP", "mine")
    assert cli.run_stamp() == "mine"
    monkeypatch.delenv("CAUSALGPT_RUN_STAMP")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    with pytest.raises(ValueError, match="CAUSALGPT_RUN_STAMP"):
        cli.run_stamp()


def test_register_configs_is_idempotent():
    cli.register_configs()
    cli.register_configs()
    assert math.isfinite(compose_train(["optim.lr=3e-4"]).optim.lr)


def test_peak_flops_for_mfu_by_gpu_name(monkeypatch):
    from engine.runtime import Runtime
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "Tesla T4"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    gpu = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"), precision="bf16", compile=True)
    assert [gpu.peak_flops() for _ in range(5)] == [989e12, 756e12, 312e12, 362e12, None]
    assert gpu.peak_flops(override=1e12) == 1e12
    cpu = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)
    assert cpu.peak_flops() is None and cpu.peak_flops(override=2e11) == 2e11  # no MFU on CPU unless given


@pytest.mark.parametrize("name", PRESETS)
def test_model_yaml_lists_every_field_and_is_what_runs_and_scripts_get(name):
    """configs/model/<name>.yaml writes out every ModelConfig field, so a run trains exactly what
    the YAML says; Hydra's model=<name> and cli.model_preset(name) (scripts, tests) give the same."""
    raw = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())
    fields = dataclasses.fields(ModelConfig)
    assert set(raw) - {"defaults"} == {f.name for f in fields}
    expected = {k: v for k, v in raw.items() if k != "defaults"}
    assert expected["preset"] == name and all(expected[k] is not None for k in ("n_layer", "n_head", "n_embd"))
    assert cli.model_preset(name) == expected
    assert dataclasses.asdict(ModelConfig(**expected)) == expected  # valid as written, nothing filled in
    cli.register_configs()
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
        written = OmegaConf.to_container(compose("train", overrides=[f"model={name}"]).model)
    assert written == expected
    assert dataclasses.asdict(compose_train([f"model={name}"]).model) == expected


def test_an_unknown_preset_name_is_one_line_listing_the_valid_ones():
    for name in ("huge", "../train"):  # not a file of configs/model/, even where one exists elsewhere
        with pytest.raises(ValueError, match=rf"unknown model preset {name!r}; choose one of gpt2, gpt2-medium, "
                                             r"small, tiny \(configs/model/\)") as info:
            cli.model_preset(name)
        assert "\n" not in str(info.value)


def test_saved_config_shows_the_model_sizes(tmp_path):
    """--cfg job (what .hydra/config.yaml holds) names the sizes of the preset, not nulls."""
    r = run_script(["train.py", "model=small", "--cfg", "job"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    model = yaml.safe_load(r.stdout)["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["block_size"], model["norm"]) == (
        6, 6, 384, 256, "post")


def test_training_schema_has_one_set_of_defaults():
    """train.yaml picks groups and Hydra's settings only: every loop default lives in TrainConfig."""
    raw = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    assert set(raw) == {"defaults", "hydra"}
    cfg = compose_train([])
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("model", "data", "optim", "logger", "ckpt_interval"):
            assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.ckpt_interval == cfg.eval_interval and (cfg.batch_size, cfg.final_eval_iters) == (16, 100)
    for name in ("wandb", "none"):  # the logger group's YAML files agree with LoggerConfig
        raw = yaml.safe_load((CONFIGS / "logger" / f"{name}.yaml").read_text())
        defaults = dataclasses.asdict(LoggerConfig())
        assert {k: v for k, v in raw.items() if k not in ("defaults", "name")} == {
            k: defaults[k] for k in raw if k not in ("defaults", "name")}


@pytest.mark.parametrize(("flags", "warned"), [({"avx2", "avx512f"}, True), ({"avx512_fp16"}, False)])
def test_fp16_on_a_cpu_without_fp16_math_warns_once_and_names_bf16(monkeypatch, caplog, flags, warned):
    import engine.runtime
    monkeypatch.setattr(engine.runtime, "cpu_flags", lambda: flags)
    caplog.set_level("WARNING", logger="engine.runtime")
    engine.runtime.setup_runtime("cpu", "fp16", "false", threads=1)
    lines = [r.getMessage() for r in caplog.records if "fp16" in r.getMessage()]
    assert len(lines) == int(warned)
    assert not warned or ("slower than fp32" in lines[0] and "precision=bf16" in lines[0])
    caplog.clear()
    engine.runtime.setup_runtime("cpu", "fp32", "false", threads=1)
    assert not [r for r in caplog.records if "fp16" in r.getMessage()]

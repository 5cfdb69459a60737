"""Logging: W&B offline writes a run (and a resumed run continues it), disabled writes nothing, the
mode follows login state and WANDB_MODE; names, groups and tags (config first, then WANDB_*, then
ours); every exit path finishes the W&B run with its exit code (read back from the run's files);
metrics.jsonl drops the replayed part of a killed run and a line a kill cut short, and is appended
one complete line per write; eval records carry val/ppl, val/bpb and the parameter count; a long
eval shows progress.

W&B's offline run file (`run-<id>.wandb`) is a LevelDB-style log of protobuf records (W&B's own
`wandb.proto.wandb_internal_pb2.Record`); `wandb_runs` reads the run, exit and history records back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import cli
import train
from engine import evaluate as evaluate_mod
from engine import metrics as metrics_mod
from engine.config import LoggerConfig
from engine.evaluate import bits_per_byte, estimate_loss
from engine.metrics import RunLogger, read_metrics, wandb_init_args, wandb_mode
from engine.runtime import Runtime


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks, each (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_runs(home: Path, timeout: float = 20.0) -> list[dict]:
    """Each offline run under home/wandb/: name, project, group, tags, exit code and history rows.
    W&B's service process writes the files after finish() returns: read until every run has its
    run and exit records, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_wandb_runs(home)
        if all("name" in r and "exit_code" in r for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_wandb_runs(home: Path) -> list[dict]:
    runs = []
    for run_file in sorted(home.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict = {"history": []}
        for r in wandb_records(run_file):
            match r.WhichOneof("record_type"):
                case "run":
                    run.update(name=r.run.display_name, project=r.run.project, group=r.run.run_group,
                               tags=list(r.run.tags), id=r.run.run_id)
                case "exit":
                    run["exit_code"] = r.exit.exit_code
                case "history":
                    run["history"].append({i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                                           for i in r.history.item})
        runs.append(run)
    return runs


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    def set_mode(mode: str):
        monkeypatch.setenv("WANDB_MODE", mode)
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
        monkeypatch.setenv("WANDB_SILENT", "true")
        (tmp_path / "wandb_home").mkdir(exist_ok=True)
        return tmp_path / "wandb_home"
    return set_mode


def test_wandb_offline_writes_a_run_and_resume_continues_it(tiny_overrides, tmp_path, wandb_env):
    home = wandb_env("offline")
    overrides = [*tiny_overrides, "logger=wandb", "max_iters=4", "eval_interval=2", "log_interval=2"]
    train.train(compose_train(overrides))
    run_id = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"]
    runs = list(home.glob("wandb/offline-run-*"))
    assert run_id and len(runs) == 1 and runs[0].name.endswith(run_id)
    assert (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0  # the logged data, for `wandb sync`
    [run] = wandb_runs(home)  # read back: the run directory's name (no Hydra here), finished with 0
    assert (run["name"], run["project"], run["exit_code"]) == ("run", "causalgpt", 0)
    logged = {k for row in run["history"] for k in row}
    assert {"model/params", "val/loss", "val/bpb", "val/ppl", "train/loss"} <= logged

    train.train(compose_train([*overrides, "max_iters=6", "resume=auto"]))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"] == run_id
    # Two local directories of the one run (wandb adds a suffix when both start in the same second).
    resumed = list(home.glob("wandb/offline-run-*"))
    assert len(resumed) == 2 and all(f"-{run_id}" in p.name for p in resumed)


def test_wandb_disabled_writes_nothing(tiny_overrides, tmp_path, wandb_env):
    home = wandb_env("disabled")
    train.train(compose_train([*tiny_overrides, "logger=wandb", "max_iters=2"]))
    assert not any(home.iterdir()) and not list((tmp_path / "run").glob("wandb*"))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["wandb_run_id"] is None
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the local log is written regardless


def test_wandb_mode_follows_config_environment_and_login(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(LoggerConfig(name="none")) == "disabled"
    assert wandb_mode(LoggerConfig(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(LoggerConfig(mode="online")) == "disabled"  # the environment can always turn it off
    monkeypatch.delenv("WANDB_MODE")
    import wandb
    for logged_in, expected in ((True, "online"), (False, "offline")):
        monkeypatch.setattr(wandb, "login", lambda logged_in=logged_in, **kw: logged_in)
        assert wandb_mode(LoggerConfig()) == expected


def test_logger_none_does_not_import_wandb(tiny_overrides, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    train.train(compose_train([*tiny_overrides, "max_iters=2"]))  # would fail on an import of wandb
    assert sys.modules["wandb"] is None
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # the run still logged, without W&B


def test_metrics_jsonl_drops_the_replayed_part_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(0, 30, 5)))
    logger = RunLogger(LoggerConfig(name="none"), tmp_path, {}, enabled=True, resume_step=10)
    logger.log({"step": 11, "train/loss": float("nan")})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 11]
    assert records[-1]["train/loss"] is None  # NaN is not JSON: written as null


def test_wandb_names_config_first_then_environment_then_ours(monkeypatch, tmp_path):
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)
    ours = wandb_init_args(LoggerConfig(tags=["a"]), tmp_path / "12-00-00")
    assert ours == {"project": "causalgpt", "entity": None, "name": "12-00-00", "group": None, "tags": ["a"]}
    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_NAME", "envname")
    monkeypatch.setenv("WANDB_TAGS", "x, a")
    env = wandb_init_args(LoggerConfig(tags=["a"]), tmp_path / "12-00-00")
    # None lets W&B read WANDB_PROJECT / WANDB_NAME itself; tags add up (W&B would drop WANDB_TAGS).
    assert (env["project"], env["name"], env["tags"]) == (None, None, ["a", "x"])
    config = wandb_init_args(LoggerConfig(project="p", run_name="n", group="g", entity="e"), tmp_path)
    assert (config["project"], config["name"], config["group"], config["entity"]) == ("p", "n", "g", "e")
    monkeypatch.delenv("WANDB_NAME")
    assert wandb_init_args(LoggerConfig(), tmp_path / "r", resuming=True)["name"] is None  # keeps its W&B name


@pytest.fixture
def hydra_run(tmp_path):
    """A composed train config and Hydra's runtime config of a run in <tmp>/outputs/2030-01-02/03-04-05."""
    from hydra.core.hydra_config import HydraConfig
    cli.register_configs()

    def make(*overrides: str):
        overrides = cli.quote_free_text(["train.py", *overrides], cli.TRAIN_TEXT)[1:]  # as train.py's __main__
        with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
            dcfg = compose("train", overrides=[*overrides, f"hydra.run.dir={tmp_path}/outputs/2030-01-02/03-04-05",
                                               f"out_dir={tmp_path}/run"], return_hydra_config=True)
        HydraConfig.instance().set_config(dcfg)
        task = copy.deepcopy(dcfg)
        with open_dict(task):
            del task["hydra"]
        return OmegaConf.to_object(task)
    yield make
    HydraConfig.instance().cfg = None


def test_wandb_run_named_after_experiment_and_stamp(hydra_run, monkeypatch):
    monkeypatch.delenv("WANDB_NAME", raising=False)
    cfg = hydra_run("experiment=shakespeare_char_cpu", "logger=wandb", "logger.tags=[mine]")
    cli.name_wandb_run(cfg)
    assert cfg.logger.run_name == "shakespeare_char_cpu-2030-01-02_03-04-05" and cfg.logger.group is None
    assert cfg.logger.tags == ["mine", "exp:shakespeare_char_cpu", "model:tiny", "data:shakespeare_char", "tok:char"]
    cfg = hydra_run("model=small")  # no experiment: the preset
    cli.name_wandb_run(cfg)
    assert cfg.logger.run_name == "small-2030-01-02_03-04-05"
    cfg = hydra_run("logger.run_name=given, as typed")
    cli.name_wandb_run(cfg)
    assert cfg.logger.run_name == "given, as typed"
    monkeypatch.setenv("WANDB_NAME", "from env")
    cfg = hydra_run()
    cli.name_wandb_run(cfg)
    assert cfg.logger.run_name is None  # W&B reads WANDB_NAME itself


def test_every_exit_path_finishes_wandb_with_its_exit_code(wandb_env, tmp_path):
    """A user error (2) and a crash (1) inside the task finish the open W&B run, marked failed."""
    import wandb
    home = wandb_env("offline")
    for error, code in ((ValueError("bad value"), 2), (RuntimeError("crash"), 1)):
        @cli.main_guard
        def task(error=error, code=code):
            wandb.init(project="p", name=f"exit {code}", dir=str(home))
            raise error
        with pytest.raises((SystemExit, RuntimeError)):
            task()
        assert wandb.run is None
    assert {r["name"]: r["exit_code"] for r in wandb_runs(home)} == {"exit 2": 2, "exit 1": 1}


def test_torn_last_line_neither_blocks_resume_nor_readers(tiny_overrides, tmp_path, caplog):
    overrides = [*tiny_overrides, "max_iters=4", "eval_interval=2", "log_interval=2"]
    train.train(compose_train(overrides))
    path = tmp_path / "run" / "metrics.jsonl"
    torn = len(path.read_text().splitlines()) + 1
    with path.open("a") as f:
        f.write('{"step": 5, "train/lo')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert [r["step"] for r in records][-1] == 4
    assert str(path) in caplog.text and f"(line {torn};" in caplog.text
    train.train(compose_train([*overrides, "max_iters=6", "resume=auto"]))
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]  # every line parses
    assert steps == sorted(steps) and steps[-1] == 6


def test_each_record_is_one_write_of_a_complete_line(tmp_path, monkeypatch):
    writes = []
    real_write = metrics_mod.os.write
    monkeypatch.setattr(metrics_mod.os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    logger = RunLogger(LoggerConfig(name="none"), tmp_path, {}, enabled=True)
    logger.log({"step": 1, "sample": "x" * 100_000})  # larger than any buffer
    assert len(writes) == 1 and writes[0].endswith(b"\n") and json.loads(writes[0])["step"] == 1


def test_eval_records_carry_ppl_bpb_and_the_parameter_count(tiny_overrides, tmp_path):
    result = train.train(compose_train([*tiny_overrides, "max_iters=4", "eval_interval=2", "final_eval_iters=3"]))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0] == {"step": 0, "corpus": "files", "model/params": train.GPT(train.ModelConfig(**torch.load(
        tmp_path / "run" / "last.pt", weights_only=True)["model_config"])).num_params()}
    evals = [r for r in records if "val/loss" in r]
    assert len(evals) == 3
    for r in evals:  # an ASCII corpus, one character a token: one byte a token
        assert r["val/bpb"] == pytest.approx(r["val/loss"] / math.log(2))
        assert r["val/ppl"] == pytest.approx(math.exp(r["val/loss"]))
    [final] = [r for r in records if "val/final_loss" in r]
    assert final["val/final_bpb"] == pytest.approx(final["val/final_loss"] / math.log(2))
    assert result["final_bpb"] == final["val/final_bpb"]


def test_bits_per_byte_counts_utf8_bytes_not_tokens():
    from data.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text(["aé日"])  # 1, 2 and 3 bytes
    y = torch.tensor([tok.encode("aé日a"), tok.encode("日日日日")])  # (2, 4)
    assert int(torch.as_tensor(tok.token_bytes())[y].sum()) == 7 + 12
    assert bits_per_byte(2.0 * 8, 19) == pytest.approx(2.0 * 8 / 19 / math.log(2))
    rt = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)
    model = train.GPT(train.ModelConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=8))
    result = estimate_loss(model, [(y, y)], rt, token_bytes=torch.as_tensor(tok.token_bytes()))
    assert result.bpb == pytest.approx(result.loss * 8 / 19 / math.log(2))  # no special token here


def test_a_long_eval_logs_its_progress(monkeypatch, caplog):
    """Outside a terminal: a line per PROGRESS_EVERY_S with the batches left, and one at the end."""
    monkeypatch.setattr(evaluate_mod, "PROGRESS_EVERY_S", 0.0)
    rt = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)
    model = train.GPT(train.ModelConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))
    batches = [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))] * 3
    with caplog.at_level(logging.INFO, logger="engine.evaluate"):
        evaluate_mod.estimate_loss(model, batches, rt, desc="final val")
    assert [m for m in caplog.messages if m.startswith("eval final val")][-1] == "eval final val: 3 batches in 0 s"
    assert "eval final val: 1/3 batches" in caplog.text and "s left" in caplog.text


def test_finish_logs_the_samples_once_the_checkpoint_artifact_and_a_preemption(tmp_path):
    import wandb

    from engine.config import LoggerConfig
    from engine.metrics import RunLogger
    calls = []

    class FakeRun:
        id = "abc"

        def log(self, row):
            calls.append(("log", {k: (v.data if isinstance(v, wandb.Table) else v) for k, v in row.items()}))

        def log_artifact(self, artifact, aliases):
            calls.append(("artifact", artifact.name, artifact.type, sorted(artifact.manifest.entries), aliases))

        def mark_preempting(self):
            calls.append("mark_preempting")

        def finish(self, exit_code):
            calls.append(("finish", exit_code))

    (tmp_path / "best.pt").write_bytes(b"weights")
    logger = RunLogger(LoggerConfig(mode="disabled"), tmp_path, {}, enabled=True)
    logger.wandb = FakeRun()
    for step in (0, 10):  # two evals: rows collected, nothing sent to W&B yet
        logger.log_samples(step, [f"text {step}"])
    assert calls == []
    logger.last_step = 10
    logger.finish(143, preempted=True, checkpoint=tmp_path / "best.pt")
    assert calls == [("log", {"samples": [[0, "text 0"], [10, "text 10"]]}),
                     ("artifact", "model-abc", "model", ["best.pt"], ["best", "latest"]),
                     "mark_preempting", ("finish", 143)] and logger.wandb is None


def test_a_fallback_corpus_is_named_in_tags_config_metrics_and_summary(tiny_overrides, monkeypatch):
    import urllib.error

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("data.sources.fetch_url", offline)
    keep = [a for a in tiny_overrides if not a.startswith(("data=", "data.path="))]
    cfg = compose_train([*keep, "data=shakespeare_char", "data.max_chars=20000", "max_iters=2",
                         "logger.run_name=probe", "logger.tags=[data:shakespeare_char]"])
    with pytest.warns(UserWarning, match="could not be downloaded"):
        result = train.train(cfg)
    assert result["corpus"] == "python_stdlib (fallback for shakespeare_char)"
    assert cfg.logger.tags == ["data:python_stdlib", "fallback"] and cfg.logger.run_name == "probe [python_stdlib fallback]"
    run = Path(result["run_dir"])
    assert read_metrics(run / "metrics.jsonl")[0]["corpus"] == result["corpus"]
    assert torch.load(run / "last.pt", weights_only=True)["config"]["corpus"] == result["corpus"]

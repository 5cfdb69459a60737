"""train.py: the Hydra entry point and the training loop.

    python train.py                                   # tiny model, tiny Shakespeare, a few CPU minutes
    python train.py experiment=shakespeare_char model.n_layer=8 optim.lr=1e-3
    torchrun --standalone --nproc_per_node=2 train.py logger=none    # DDP; distributed=fsdp for FSDP2

`train(cfg)` is one flat function: set-up, then a loop whose "every N steps" blocks (eval and
best.pt, last.pt, stop, log) call small helpers from engine/, around a fenced optimisation step.
Configs: configs/train.yaml, documented field by field in engine/config.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

import cli
from causality.sampling import start_token
from data.loader import BatchLoader
from data.prepare import prepare, read_meta
from data.progress import Progress
from data.tokenizer import Tokenizer, load_tokenizer
from engine.checkpoint import check_fits_data, remove_leftovers
from engine.config import TrainConfig
from engine.evaluate import estimate_loss, fixed_batches, generate_sample
from engine.formats.pretrained import load_pretrained
from engine.metrics import Phases, RunLogger, StepMeter
from engine.optim import build_optimizer, lr_at
from engine.parallel import lost_peer, wrap_model
from engine.resume import data_as_trained, warn_if_resume_differs
from engine.runtime import Runtime, peak_memory_mb, setup_runtime
from engine.signals import StopRequest
from engine.state import RankFailed, TrainingError, TrainState, find_resume, grad_scaler
from engine.step import log_values, train_step
from model import GPT, ModelConfig

log = logging.getLogger("train")


def train(cfg: TrainConfig, explicit: set[str] | None = None,
          on_start: Callable[[Path], None] | None = None) -> dict:
    """Train as cfg says; returns a summary (run_dir, step, best_val, final_val, checkpoint). explicit: the
    settings the command line gave (e.g. {"data.path", "model"}): a resumed run takes every other data.*
    setting from its checkpoint (None: cfg as is). on_start(run dir): on rank 0, before the first step."""
    rt = setup_runtime(cfg.device, cfg.precision, cfg.compile, cfg.threads, cfg.dist_timeout_s)
    stop = StopRequest()
    failed = True
    try:  # the run directory is locked, and checked for another run's files, for the whole run (cli.py)
        with cli.hold_run_dir(Path(cfg.out_dir), cfg.resume, cfg.overwrite, enabled=rt.is_main):
            result = _train(cfg, rt, stop, explicit, on_start)
        failed = False
        return result
    except RankFailed as e:  # another rank failed where they all check (a save, the set-up): its line
        raise TrainingError(str(e)) from e
    except RuntimeError as e:  # under torchrun: another rank died or hung while this one waited for it
        if rt.distributed and (reason := lost_peer(e)):
            raise TrainingError(
                f"lost contact with another process of this job ({reason}): it failed or was killed (its "
                f"own error is in the output above) or did not answer within dist_timeout_s="
                f"{cfg.dist_timeout_s:g}; resume with resume=auto out_dir={cfg.out_dir}") from e
        raise
    finally:
        stop.close()
        rt.close(failed)  # after a failure without waiting for the other ranks


def _train(cfg: TrainConfig, rt: Runtime, stop: StopRequest, explicit: set[str] | None,
           on_start: Callable[[Path], None] | None) -> dict:
    phases = Phases()  # where the wall time goes: one line at the end
    with phases("set-up"):
        run = set_up(cfg, rt, explicit, phases)
    if on_start is not None and rt.is_main:
        on_start(run.out_dir)
    loop, logger = run.state, run.logger  # loop: the TrainState's counters
    start_step, stopping = loop.step, False
    meter = StepMeter(run.tokens_per_step, warmup_steps=2 if rt.compile else 1)
    peak_flops = rt.peak_flops(cfg.peak_flops)  # None: no MFU (CPU, fp32, a GPU not in the table)
    # A bar on a terminal (log lines print above it); the log lines below are the record elsewhere.
    bar = Progress("train", cfg.max_iters, unit="steps", enabled=rt.is_main, every_s=math.inf, logger=log)
    bar.update(loop.step)
    while True:
        done = loop.step >= cfg.max_iters

        # ---- every eval_interval steps and at the end: eval losses, a sample, best.pt --------------
        if not stopping and (done or loop.step % cfg.eval_interval == 0) and loop.last_eval_step != loop.step:
            with phases("eval"):
                losses = evaluate(run)
            log.info("step %d: %s", loop.step, ", ".join(f"{s} loss {v:.4f}" for s, v in losses.items()))
            if losses.get("val", math.inf) < loop.best_val:
                loop.best_val = losses["val"]
                run.save("best.pt")

        # ---- every ckpt_interval steps, at the end, and when asked to stop: last.pt ----------------
        if done or stopping or (cfg.ckpt_interval and loop.step % cfg.ckpt_interval == 0
                                and loop.step > start_step):
            run.save("last.pt")
        if done or stopping:
            break

        # ---- the optimisation step: no host sync in it (engine/step.py) ----------------------------
        lr = lr_at(loop.step, cfg.optim, cfg.max_iters)
        with phases("compile" if rt.compile and loop.step - start_step < 2 else "train"), meter:  # first steps compile
            loss, norm, _ = train_step(loop, run.train_model, [s.next_batch() for s in run.streams], lr, cfg.grad_clip)
        bar.update(1)

        # ---- every log_interval steps: read the loss, count skipped steps, log; the stop flag ------
        if loop.step % cfg.log_interval == 0 or loop.step == cfg.max_iters:
            train_loss, grad_norm = log_values(loss, norm, rt)  # the sync; the loss averaged over ranks
            perf = meter.read()  # tokens_per_s, step_ms (none while only warm-up steps ran)
            if n_bad := loop.read_bad_steps():
                check_bad_steps(run, n_bad, train_loss, grad_norm)
            if peak_flops and "tokens_per_s" in perf:
                perf["mfu"] = run.model.estimate_mfu(perf["tokens_per_s"], peak_flops * rt.world_size)
            logger.log({"step": loop.step, "train/loss": train_loss, "train/tokens_seen": loop.tokens_seen,
                        "opt/lr": lr, "opt/grad_norm": grad_norm, "perf/mem_mb": peak_memory_mb(rt),
                        **{f"perf/{k}": v for k, v in perf.items()}})
            log.info("step %d/%d: loss %.4f, lr %.2e, %s tok/s, %s ms/step", loop.step, cfg.max_iters,
                     train_loss, lr, f"{perf.get('tokens_per_s', 0):,.0f}",
                     f"{perf['step_ms']:.1f}" if "step_ms" in perf else "-")
        # One process: look at the flag every step. Under torchrun every rank must agree, which takes
        # a collective: only at log steps (a stop waits at most log_interval steps).
        if not rt.distributed or loop.step % cfg.log_interval == 0:
            stopping = bool(rt.max_over_ranks(stop.requested))
    bar.close()
    with phases("eval"):
        summary = finish(run, stop.signum if stopping else None)
    log.info("%s", phases.line())
    return summary


# ---- set-up ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything the loop works with, built once by set_up()."""
    cfg: TrainConfig
    out_dir: Path
    prepared: Path
    tokenizer: Tokenizer
    state: TrainState  # model (the plain GPT: saving, sampling, FLOP counts), optimizer, counters, ...
    train_model: torch.nn.Module  # compiled / DDP / FSDP2, what the step calls
    eval_model: torch.nn.Module
    eval_sets: dict[str, list]  # {"train": batches, "val": batches}; empty with eval_iters=0
    logger: RunLogger
    tokens_per_step: int
    lockstep: bool  # FSDP: every rank runs every forward (weights are all-gathered in each)
    token_bytes: torch.Tensor  # (vocab,) UTF-8 bytes per token id: val/bpb
    phases: Phases  # wall time per phase (the closing line)

    @property
    def model(self) -> GPT:
        return self.state.model

    @property
    def rt(self) -> Runtime:
        return self.state.rt

    @property
    def streams(self) -> list[BatchLoader]:
        return self.state.loaders

    def save(self, name: str) -> None:
        with self.phases("save"):
            self.state.save(self.out_dir / name, keep_last=self.cfg.keep_last if name == "last.pt" else 0)


def set_up(cfg: TrainConfig, rt: Runtime, explicit: set[str] | None = None, phases: Phases | None = None) -> Run:
    """Data, model (fresh, resumed or fine-tuned), optimizer, loaders, eval batches and logger.
    explicit: see train(). phases: times the data step and, later, the saves."""
    phases = phases or Phases()
    out_dir = Path(cfg.out_dir)
    if rt.is_main and (leftovers := remove_leftovers(out_dir)):  # before anything writes there
        log.info("removed %d temporary file(s) of interrupted saves in %s", len(leftovers), out_dir)
    # ---- where the weights come from: a checkpoint to resume, one to fine-tune from, or nothing ----
    ckpt_path, ckpt = find_resume(cfg.resume, out_dir, rt) or (None, None)  # falls back to older ones
    if ckpt is not None and explicit is not None:
        cfg.data = data_as_trained(ckpt, cfg.data, explicit)
    with phases("data"):  # every rank; one builds, the others wait on its file lock
        prepared = prepare(cfg.data, progress=rt.is_main)
    meta, tokenizer = read_meta(prepared), load_tokenizer(prepared)
    src = load_pretrained(cfg.init_from) if ckpt is None and cfg.init_from else None  # to fine-tune from
    if ckpt is not None:
        check_fits_data(ckpt, ckpt_path, tokenizer.to_json(), meta["vocab_size"], use="resume")
        model_cfg = ModelConfig(**ckpt["model_config"])  # the checkpoint's architecture wins
        warn_if_resume_differs(ckpt, _with_vocab(cfg.model, meta["vocab_size"]), meta, explicit)
    elif src is not None:
        check_fits_data(src, cfg.init_from, tokenizer.to_json(), meta["vocab_size"], use="init_from")
        model_cfg = ModelConfig(**{**src["model_config"], "dropout": cfg.model.dropout})  # this run's dropout
    else:
        model_cfg = _with_vocab(cfg.model, meta["vocab_size"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(rt.device)
    if src is not None:  # fine-tuning: weights only; optimizer and step start fresh
        model.load_state_dict(src["model"])
    train_model, eval_model = wrap_model(model, rt, cfg.distributed)

    # Micro-batch g = rank * accum + micro of every step comes from stream g of world * accum streams,
    # so a step sees the same windows however it is split between processes and accumulation.
    T, accum = model_cfg.block_size, cfg.gradient_accumulation_steps
    n_streams = rt.world_size * accum
    streams = [BatchLoader(prepared, "train", cfg.batch_size, T, device=rt.device, seed=cfg.seed,
                           rank=rt.rank * accum + m, world_size=n_streams) for m in range(accum)]
    eval_sets = {s: fixed_batches(prepared, s, cfg.batch_size, T, cfg.eval_iters, rt)
                 for s in ("train", "val") if cfg.eval_iters}

    corpus = _name_corpus(cfg, meta)  # what it really trains on: W&B tags and name, the done: line, plots
    # The config as run: the model with its real vocabulary size, and the corpus used.
    config = {**dataclasses.asdict(cfg), "model": model_cfg.to_dict(), "corpus": corpus}
    static = {"model_config": model_cfg.to_dict(), "tokenizer": tokenizer.to_json(),
              "config": config, "data": {"prepared_dir": str(prepared), "meta": meta}}
    state = TrainState(model, build_optimizer(model, cfg.optim, rt.device_type), grad_scaler(rt), rt,
                       loaders=streams, static=static, seed=cfg.seed)
    logger = RunLogger(cfg.logger, out_dir, static["config"], enabled=rt.is_main,
                       wandb_id=ckpt.get("wandb_run_id") if ckpt else None,
                       resume_step=int(ckpt["step"]) if ckpt else None)
    if ckpt is not None:
        state.load_state_dict(ckpt)  # last: after it nothing draws random numbers
        log.info("resumed from %s at step %d", ckpt_path, state.step)
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout masks differ between ranks
    state.wandb_id = logger.wandb_id
    tokens_per_step = cfg.batch_size * T * n_streams
    log.info("%s params, %d tokens per step, run dir %s", f"{model.num_params():,}", tokens_per_step, out_dir)
    if ckpt is None:  # a resumed run has it in its metrics.jsonl already
        logger.log({"step": state.step, "model/params": model.num_params(), "corpus": corpus})
    return Run(cfg, out_dir, prepared, tokenizer, state, train_model, eval_model, eval_sets, logger, tokens_per_step,
               lockstep=rt.distributed and cfg.distributed == "fsdp",
               token_bytes=torch.as_tensor(tokenizer.token_bytes(), device=rt.device), phases=phases)


# ---- the pieces the loop calls -----------------------------------------------------------------------
def evaluate(run: Run) -> dict[str, float]:
    """Eval losses on the fixed batches (engine/evaluate.py), plus a sample; logged. Returns {split: loss}."""
    cfg, rt, tok, step = run.cfg, run.rt, run.tokenizer, run.state.step
    # Every rank joins every split's all-reduce, also a rank whose share of the batches is empty.
    results = {s: estimate_loss(run.eval_model, b, rt, run.lockstep, desc=s,
                                token_bytes=run.token_bytes if s == "val" else None)
               for s, b in run.eval_sets.items()}
    run.state.last_eval_step = step
    record = {"step": step}
    if results:  # beside the val loss: perplexity, and bits per byte, which no tokenizer changes
        record |= {"train/eval_loss": results["train"].loss, **results["val"].metrics("val/")}
    if cfg.sample_tokens and (rt.is_main or run.lockstep):
        ids = generate_sample(run.model, [start_token(tok, fallback=0)], cfg.sample_tokens, rt, seed=cfg.seed + step,
                              vocab_limit=tok.vocab_size,  # a padded vocabulary's extra ids never drawn
                              stop_id=tok.eot_id)  # the sample ends at the end of its text
        record["val/sample"] = tok.decode(ids)
        run.logger.log_samples(step, [record["val/sample"]])
    run.logger.log(record)
    return {s: r.loss for s, r in results.items()}


def check_bad_steps(run: Run, n_bad: int, train_loss: float, grad_norm: float) -> None:
    """Report steps skipped since the last log; stop the run when there were too many."""
    loop, limit = run.state, run.cfg.max_bad_steps
    log.warning("%d step(s) up to step %d skipped: loss %s, grad norm %s (%d/%d)", n_bad, loop.step, train_loss,
                grad_norm, loop.bad_steps, limit)
    run.logger.log({"step": loop.step, "train/skipped_steps": loop.bad_steps})
    if loop.bad_steps > limit:
        last = run.out_dir / "last.pt"
        raise TrainingError(
            f"the loss was NaN/inf on {loop.bad_steps} steps (max_bad_steps={limit}); "
            f"stopped at step {loop.step}. Last good checkpoint: "
            f"{last if last.exists() else 'none yet'}. Try a lower optim.lr or precision=fp32")


def finish(run: Run, signum: int | None) -> dict:
    """The final whole-split eval (unless stopped early), the W&B summary, and the run's summary."""
    cfg, out_dir, step = run.cfg, run.out_dir, run.state.step
    stopping = signum is not None or step < cfg.max_iters  # signum None: another rank's signal
    summary = {"run_dir": str(out_dir), "step": step, "best_val": run.state.best_val, "stopped": stopping,
               "corpus": run.state.static["config"]["corpus"], "signal": signum,
               "checkpoint": str(out_dir / ("best.pt" if (out_dir / "best.pt").exists() else "last.pt"))}
    if cfg.final_eval_iters and not stopping:
        final = fixed_batches(run.prepared, "val", cfg.batch_size, run.model.config.block_size, cfg.final_eval_iters, run.rt)
        log.info("final eval: %s", "the whole val split" if cfg.final_eval_iters < 0 else f"{cfg.final_eval_iters} val batches")
        result = estimate_loss(run.eval_model, final, run.rt, lockstep=True, desc="final val", token_bytes=run.token_bytes)
        summary["final_val"], summary["final_bpb"] = result.loss, result.bpb
        run.logger.log({"step": step, **result.metrics("val/final_")})
    run.logger.finish(128 + (signum or signal.SIGTERM) if stopping else 0, preempted=stopping,
                      checkpoint=Path(summary["checkpoint"]) if cfg.logger.log_checkpoints else None,
                      summary={k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _with_vocab(model_cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model config with the data's vocabulary size: filled in, or checked when set by hand."""
    if model_cfg.vocab_size is None:
        return dataclasses.replace(model_cfg, vocab_size=vocab_size)
    if model_cfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's vocabulary of "
                         f"{vocab_size} tokens; remove the override (it is filled in from the data)")
    return model_cfg


def _name_corpus(cfg: TrainConfig, meta: dict) -> str:
    """The corpus the prepared data holds, marked when it stands in for the one asked for (offline:
    "python_stdlib (fallback for shakespeare_char)"); the W&B data tag and name say it too."""
    source, asked = meta.get("source", cfg.data.source), meta.get("requested_source", cfg.data.source)
    if source == asked:
        return source
    corpus = f"{source} (fallback for {asked})"
    lg = cfg.logger
    lg.tags = [t for t in lg.tags if t != f"data:{asked}"] + [f"data:{source}", "fallback"]
    if lg.run_name:
        lg.run_name += f" [{source} fallback]"
    return corpus


cli.register_configs()


@hydra.main(config_path=cli.CONFIG_DIR, config_name="train", version_base="1.3")
@cli.main_guard
def main(dcfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)  # out_dir when given (cli.run_dir), else outputs/<stamp>
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cli.mark_fresh(run_dir)  # made by Hydra for this launch: removed again if the run never starts
    if not rank0:  # one voice on the console: rank 0's
        logging.getLogger().setLevel(logging.WARNING)
    started: list[Path] = []
    cli.buffer_logs()  # for train.log, once the run directory is this run's (refused: nothing written)
    try:
        cli.check_added_keys(hc.overrides.task, TrainConfig, cli.CONFIG_DIR)  # +max_iter=...: refused
        cfg: TrainConfig = OmegaConf.to_object(dcfg)  # the one conversion: plain dataclasses from here on
        cfg.out_dir = cfg.out_dir or str(run_dir)
        cli.name_wandb_run(cfg)  # W&B name, group and tags that say what ran (unless set)
        # The settings the command line gives: ["data.path=x", "+model=small"] -> {"data.path", "model"}.
        explicit = {o.lstrip("+~").split("=", 1)[0] for o in hc.overrides.task}
        with logging_redirect_tqdm():
            result = train(cfg, explicit,
                           on_start=lambda out: started.append(cli.start_run_files(out, dcfg) or out))
    except BaseException:
        if rank0 and not started and hc.mode == RunMode.MULTIRUN:  # a sweep's job keeps why it failed
            cli.start_run_files(run_dir, dcfg)
        elif rank0 and not started:  # refused, or failed before the run started: leave nothing behind
            cli.remove_if_unstarted(run_dir)
        raise
    if rank0:
        final = f", final val {result['final_val']:.4f}" if "final_val" in result else ""
        best = f"best val {result['best_val']:.4f}" if math.isfinite(result["best_val"]) else "no sampled eval"
        lines = [f"{'stopped early' if result['stopped'] else 'done'}: step {result['step']}, "
                 f"{best}{final}, on {result['corpus']}",
                 f"checkpoint: {result['checkpoint']}"]
        if result["stopped"]:  # the same overrides, pointed at this run's directory
            keep = [o for o in hc.overrides.task if not o.startswith(("resume=", "out_dir="))]
            resume = cli.as_typed([*keep, "resume=auto", "out_dir=" + result["run_dir"]], cli.TRAIN_TEXT)
            lines.append(f"resume:     python train.py {' '.join(resume)}")
        cli.summarise([*lines, f"try it:     python sample.py ckpt={result['run_dir']}"])
    if result["stopped"]:  # stopped by a signal after a clean save: 128 + its number (schedulers read it)
        raise SystemExit(128 + (result["signal"] or signal.SIGTERM))
    # The value a Hydra sweeper would minimise, carrying the summary for the sweep table (cli.SweepSummary).
    return cli.RunResult(result.get("final_val", result["best_val"]), result)


if __name__ == "__main__":
    sys.argv = cli.quote_free_text(sys.argv, cli.TRAIN_TEXT)  # prompts, paths, names exactly as typed
    cli.run_and_exit(main)

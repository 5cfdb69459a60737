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
import resource
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import cli
from data.config import DataError
from data.loader import BatchLoader
from data.prepare import prepare, read_meta
from data.tokenizer import load_tokenizer
from engine.config import TrainConfig
from engine.evaluate import estimate_loss, fixed_batches, generate_sample
from engine.formats.checkpoint import load_checkpoint
from engine.formats.pretrained import load_pretrained
from engine.metrics import RunLogger
from engine.optim import build_optimizer, lr_at, set_lr
from engine.parallel import clip_grad_norm, grad_sync, load_optimizer_state, main_first, wrap_model
from engine.runtime import Runtime, setup_runtime
from engine.signals import StopRequest
from engine.state import (
    LoopState,
    TrainingError,
    check_resumable,
    restore_rng,
    resume_path,
    same_vocabulary,
    save_state,
    warn_if_resume_differs,
)
from model import GPT, ModelConfig

log = logging.getLogger("train")


def train(cfg: TrainConfig) -> dict:
    """Train as cfg says; returns a summary (run_dir, step, best_val, final_val, checkpoint)."""
    rt = setup_runtime(cfg.device, cfg.precision, cfg.compile, cfg.threads)
    stop = StopRequest()
    try:
        return _train(cfg, rt, stop)
    finally:
        stop.close()
        rt.close()


def _train(cfg: TrainConfig, rt: Runtime, stop: StopRequest) -> dict:
    out_dir = Path(cfg.out_dir)
    with main_first(rt):  # rank 0 tokenizes; the others then find it in the cache
        prepared = prepare(cfg.data, progress=rt.is_main)
    meta, tokenizer = read_meta(prepared), load_tokenizer(prepared)

    # ---- where the weights come from: a checkpoint to resume, one to fine-tune from, or nothing ----
    ckpt_path = resume_path(cfg.resume, out_dir)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    init_weights: dict | None = None
    if ckpt is not None:
        check_resumable(ckpt, ckpt_path)
        model_cfg = ModelConfig(**ckpt["model_config"])  # the checkpoint's architecture wins
        warn_if_resume_differs(ckpt, _with_vocab(cfg.model, meta["vocab_size"]), meta)
    elif cfg.init_from:
        model_cfg, init_weights = _init_from(cfg.init_from, cfg.model, tokenizer.to_json())
    else:
        model_cfg = _with_vocab(cfg.model, meta["vocab_size"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(model_cfg).to(rt.device)
    if ckpt is not None or init_weights is not None:
        model.load_state_dict(ckpt["model"] if ckpt is not None else init_weights)
    train_model, eval_model = wrap_model(model, rt, cfg.distributed)
    optimizer = build_optimizer(model, cfg.optim, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.precision == "fp16")
    loop = LoopState()
    if ckpt is not None:
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loop = LoopState.from_payload(ckpt)

    # Micro-batch g = rank * accum + micro of every step comes from stream g of world * accum streams,
    # so a step sees the same windows however it is split between processes and accumulation.
    T, accum = model_cfg.block_size, cfg.gradient_accumulation_steps
    n_streams = rt.world_size * accum
    streams = [BatchLoader(prepared, "train", cfg.batch_size, T, device=rt.device, seed=cfg.seed,
                           rank=rt.rank * accum + m, world_size=n_streams) for m in range(accum)]
    for loader in streams:
        loader.load_state_dict(ckpt["loader_state"] if ckpt is not None else {"step": 0, "seed": cfg.seed})
    eval_sets = {s: fixed_batches(prepared, s, cfg.batch_size, T, cfg.eval_iters, rt) for s in ("train", "val")}
    lockstep = rt.distributed and cfg.distributed == "fsdp"
    prompt = _sample_prompt(tokenizer)

    static = {"model_config": model_cfg.to_dict(), "tokenizer": tokenizer.to_json(),
              "config": dataclasses.asdict(cfg), "data": {"prepared_dir": str(prepared), "meta": meta}}
    logger = RunLogger(cfg.logger, out_dir, static["config"], enabled=rt.is_main,
                       wandb_id=ckpt.get("wandb_run_id") if ckpt else None,
                       resume_step=loop.step if ckpt else None)
    if ckpt is not None:
        restore_rng(ckpt, rt)  # last, after everything above that may draw random numbers
        log.info("resumed from %s at step %d", ckpt_path, loop.step)
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout masks differ between ranks
    del ckpt

    def save(name: str) -> None:
        save_state(out_dir / name, rt, model, optimizer, scaler, loop, streams[0].state_dict(), static,
                   logger.wandb_id)

    tokens_per_step = cfg.batch_size * T * n_streams
    log.info("%s params, %d tokens per step, run dir %s", f"{model.num_params():,}", tokens_per_step, out_dir)
    peak_flops = rt.peak_flops(cfg.peak_flops)
    start_step, stopping, train_time, last_log_step = loop.step, False, 0.0, loop.step
    # A progress bar on a terminal; in a log file (batch jobs, `> log`) a plain line every log_interval.
    interactive = rt.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=loop.step, disable=not interactive, desc="train", dynamic_ncols=True)
    while True:
        done = loop.step >= cfg.max_iters

        # ---- every eval_interval steps and at the end: eval losses, a sample, best.pt --------------
        if not stopping and (done or loop.step % cfg.eval_interval == 0) and loop.last_eval_step != loop.step:
            losses = {s: estimate_loss(eval_model, b, rt, lockstep) for s, b in eval_sets.items() if b}
            loop.last_eval_step = loop.step
            record = {"step": loop.step, **{("val/loss" if s == "val" else "train/eval_loss"): v
                                            for s, v in losses.items()}}
            if cfg.sample_tokens and (rt.is_main or lockstep):
                ids = generate_sample(model, prompt, cfg.sample_tokens, rt, seed=cfg.seed + loop.step)
                # A model.vocab_size set above the data's may emit ids the tokenizer lacks: drop them.
                record["sample"] = tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])
                logger.log_samples(loop.step, [record["sample"]])
            logger.log(record)
            if rt.is_main:
                bar.write(f"step {loop.step}: " + ", ".join(f"{s} loss {v:.4f}" for s, v in losses.items()))
            if losses.get("val", math.inf) < loop.best_val:
                loop.best_val = losses["val"]
                save("best.pt")

        # ---- every ckpt_interval steps, at the end, and when asked to stop: last.pt ----------------
        if done or stopping or (cfg.ckpt_interval and loop.step % cfg.ckpt_interval == 0
                                and loop.step > start_step):
            save("last.pt")
        if done or stopping:
            break

        # ---- the optimisation step -----------------------------------------------------------------
        t0 = time.perf_counter()
        lr = lr_at(loop.step, cfg.optim, cfg.max_iters)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=rt.device)
        for micro, loader in enumerate(streams):
            x, y = loader.next_batch()  # (B, T) each
            grad_sync(train_model, micro == accum - 1)  # all-reduce on the last micro-step only
            with rt.autocast():
                _, loss = train_model(x, y)
            loss_sum += loss.detach()
            scaler.scale(loss / accum).backward()
        scaler.unscale_(optimizer)  # so the norm and clipping see true gradients (fp16)
        norm = clip_grad_norm(model, cfg.grad_clip)
        # One host sync per step, for the NaN guard below.
        train_loss, grad_norm = torch.stack([loss_sum / accum, norm.to(loss_sum)]).tolist()
        # fp16 overflows are the GradScaler's business (it skips those steps itself); a non-finite
        # loss, or norm without a scaler, means divergence: skip the update, on every rank alike.
        bad = not math.isfinite(train_loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm))
        bad, stopping = rt.any_flag(bad, stop.requested)
        if not bad:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        loop.tokens_seen += tokens_per_step
        train_time += time.perf_counter() - t0
        bar.update(1)
        if bad:
            loop.bad_steps += 1
            log.warning("step %d: loss %s, grad norm %s: update skipped (%d/%d)", loop.step, train_loss,
                        grad_norm, loop.bad_steps, cfg.max_bad_steps)
            logger.log({"step": loop.step, "skipped_steps": loop.bad_steps})
            if loop.bad_steps > cfg.max_bad_steps:
                last = out_dir / "last.pt"
                raise TrainingError(
                    f"the loss was NaN/inf on {loop.bad_steps} steps (max_bad_steps={cfg.max_bad_steps}); "
                    f"stopped at step {loop.step}. Last good checkpoint: "
                    f"{last if last.exists() else 'none yet'}. Try a lower optim.lr or precision=fp32")

        # ---- every log_interval steps: console, metrics.jsonl, W&B -------------------------------
        if loop.step % cfg.log_interval == 0 or loop.step == cfg.max_iters:
            steps = loop.step - last_log_step
            tok_s = tokens_per_step * steps / max(train_time, 1e-9)
            record = {"step": loop.step, "train/loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tok_s, "step_ms": 1000 * train_time / steps,
                      "tokens_seen": loop.tokens_seen, "mem_mb": _peak_memory_mb(rt)}
            if peak_flops:
                record["mfu"] = model.estimate_mfu(tok_s, peak_flops * rt.world_size)
            logger.log(record)
            if interactive:
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            elif rt.is_main:
                log.info("step %d/%d: loss %.4f, lr %.2e, %s tok/s, %.1f ms/step", loop.step, cfg.max_iters,
                         train_loss, lr, f"{tok_s:,.0f}", record["step_ms"])
            train_time, last_log_step = 0.0, loop.step
    bar.close()

    summary = {"run_dir": str(out_dir), "step": loop.step, "best_val": loop.best_val, "stopped": stopping,
               "checkpoint": str(out_dir / ("best.pt" if (out_dir / "best.pt").exists() else "last.pt"))}
    if cfg.final_eval_iters and not stopping:
        final = fixed_batches(prepared, "val", cfg.batch_size, T, cfg.final_eval_iters, rt)
        summary["final_val"] = estimate_loss(eval_model, final, rt, lockstep=True)
        logger.log({"step": loop.step, "val/final_loss": summary["final_val"]})
    logger.summary({k: v for k, v in summary.items() if isinstance(v, int | float)})
    logger.finish()
    return summary


def _with_vocab(model_cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The model config with the data's vocabulary size: filled in, or checked when set by hand."""
    if model_cfg.vocab_size is None:
        return dataclasses.replace(model_cfg, vocab_size=vocab_size)
    if model_cfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's vocabulary of "
                         f"{vocab_size} tokens; remove the override (it is filled in from the data)")
    return model_cfg


def _init_from(path: str, model_cfg: ModelConfig, tokenizer_json: str) -> tuple[ModelConfig, dict]:
    """Fine-tuning: the architecture and weights of our checkpoint or run dir, our export, or a
    Hugging Face GPT-2 directory, with this run's dropout; optimizer and step start fresh. The data
    must have been prepared with the model's tokenizer, or the token ids would mean other things."""
    src = load_pretrained(path)
    if src.get("tokenizer") and not same_vocabulary(src["tokenizer"], tokenizer_json):
        raise ValueError(f"init_from={path} uses another tokenizer than this run's data; prepare the data "
                         f"with the model's tokenizer (data.tokenizer=pretrained data.tokenizer_path=...)")
    return ModelConfig(**{**src["model_config"], "dropout": model_cfg.dropout}), src["model"]


def _sample_prompt(tokenizer) -> list[int]:
    """The first token of the eval samples: end-of-text when the vocabulary has one, else a newline."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")[:1] or [0]
    except DataError:  # a char vocabulary without "\n"
        return [0]


def _peak_memory_mb(rt: Runtime) -> float:
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


cli.register_configs()


@hydra.main(config_path=cli.CONFIG_DIR, config_name="train", version_base="1.3")
@cli.main_guard
def main(dcfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # the one conversion: plain dataclasses from here on
    cfg.out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:  # one voice on the console: rank 0's
        logging.getLogger().setLevel(logging.WARNING)
    with logging_redirect_tqdm():
        result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        final = f", final val {result['final_val']:.4f}" if "final_val" in result else ""
        print(f"\n{'stopped early' if result['stopped'] else 'done'}: step {result['step']}, "
              f"best val {result['best_val']:.4f}{final}")
        print(f"checkpoint: {result['checkpoint']}")
        if result["stopped"]:  # the same overrides, pointed at this run's directory
            keep = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "out_dir="))]
            print(f"resume:     python train.py {' '.join([*keep, 'resume=auto', 'out_dir=' + result['run_dir']])}")
        print(f"try it:     python sample.py ckpt={result['run_dir']}")
    return result.get("final_val", result["best_val"])  # the value a Hydra sweeper would minimise


if __name__ == "__main__":
    main()

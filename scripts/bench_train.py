"""Training-step throughput: a fixed configuration run for N steps after a warm-up, one JSON line out.

    python scripts/bench_train.py --norm pre --bias false --attn explicit   # nanoGPT's CPU recipe: 4/4/128, T=64, B=12
    python scripts/bench_train.py --preset gpt2 --batch-size 16 --precision bf16 --compile true   # a GPU
    python scripts/bench_train.py --data path/to/tinyshakespeare.txt --steps 200

Each step is train.py's (engine/step.py's train_step), read back and timed one by one. Out: median and
mean step time, tokens/s, MFU when the device's peak is known (or --peak-flops), peak memory, the last
loss. Batches come from the real loader when --data is a text file (char-level), else random ids.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from cli import model_preset  # noqa: E402
from engine.config import OptimConfig  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.parallel import wrap_model  # noqa: E402
from engine.runtime import setup_runtime  # noqa: E402
from engine.state import TrainState, grad_scaler  # noqa: E402
from engine.step import train_step  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, gpt2, gpt2-medium)")
    p.add_argument("--n-layer", type=int), p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int), p.add_argument("--block-size", type=int)
    p.add_argument("--norm", choices=["post", "pre"]), p.add_argument("--pos", choices=["learned", "sinusoidal", "rope"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "explicit"])
    p.add_argument("--bias", default="true", choices=["true", "false"], help="biases in Linear/LayerNorm")
    p.add_argument("--vocab-size", type=int, default=65, help="for random data (default: tiny Shakespeare's 65)")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-steps per step")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator, compile)")
    p.add_argument("--device", default="auto"), p.add_argument("--precision", default="auto")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--fused", default="auto", choices=["auto", "true", "false"], help="fused AdamW")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    p.add_argument("--data", type=Path, default=None, help="a text file to train on (char-level)")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def make_batches(args: argparse.Namespace, block_size: int, device: torch.device):
    """(next_batch, vocab_size): the real loader over --data, or random ids."""
    if args.data is not None:
        from data.config import DataConfig
        from data.loader import BatchLoader
        from data.prepare import prepare, read_meta
        prepared = prepare(DataConfig(name="bench", source="files", path=str(args.data)), progress=False)
        loader = BatchLoader(prepared, "train", args.batch_size, block_size, device=device, seed=args.seed)
        return loader.next_batch, read_meta(prepared)["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)

    def random_batch():
        buf = torch.randint(args.vocab_size, (args.batch_size, block_size + 1), generator=g).to(device)
        return buf[:, :-1], buf[:, 1:]  # (B, T) each
    return random_batch, args.vocab_size


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rt = setup_runtime(args.device, args.precision, args.compile, args.threads)
    sizes = ("n_layer", "n_head", "n_embd", "block_size", "norm", "pos")
    overrides = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    base = ModelConfig(**{**model_preset(args.preset), "attn": args.attn, "bias": args.bias == "true", **overrides})
    next_batch, vocab = make_batches(args, base.block_size, rt.device)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(**{**base.to_dict(), "vocab_size": max(vocab, base.vocab_size or 0)})
    model = GPT(cfg).to(rt.device)
    train_model, _ = wrap_model(model, rt, "ddp")
    fused = None if args.fused == "auto" else args.fused == "true"
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, betas=[0.9, 0.99], fused=fused), rt.device_type)
    state = TrainState(model, optimizer, grad_scaler(rt), rt)

    def step() -> float:
        loss, _, _ = train_step(state, train_model, [next_batch() for _ in range(args.accum)], None, 1.0)
        # train.py reads the loss only at log steps; here every step is read back so that each timed
        # step has finished on the device when its clock stops.
        return loss.item()

    t_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t_start
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], math.nan
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()  # .item() inside: the step has finished on the device when it returns
        times.append(time.perf_counter() - t0)
    tokens_per_step = args.batch_size * cfg.block_size * args.accum
    median = statistics.median(times)
    cuda = rt.device_type == "cuda"
    result = {
        "device": str(rt.device),
        "device_name": torch.cuda.get_device_name(rt.device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": rt.precision, "compile": rt.compile, "attn": args.attn,
        "threads": torch.get_num_threads(), "fused_adamw": optimizer.defaults.get("fused"),
        "model": {k: getattr(cfg, k) for k in (*sizes, "vocab_size", "bias")}, "params": model.num_params(),
        "batch_size": args.batch_size, "accum": args.accum, "steps": args.steps, "warmup_s": round(warmup_s, 3),
        "ms_per_iter_median": round(1000 * median, 3), "ms_per_iter_mean": round(1000 * statistics.mean(times), 3),
        "tokens_per_s": round(tokens_per_step / median, 1), "final_loss": round(loss, 4),
    }
    peak = rt.peak_flops(args.peak_flops)
    if peak:
        result["mfu"] = round(model.estimate_mfu(tokens_per_step / median, peak), 4)
    result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**20 if cuda
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Generation throughput: a fixed configuration, timed after a warm-up, printed as one JSON line.

    python scripts/bench_sample.py --preset tiny                      # KV cache on, CPU or GPU (auto)
    python scripts/bench_sample.py --preset small --no-cache --repeats 3
    python scripts/bench_sample.py --preset gpt2 --precision bf16 --compile --device cuda

The model is randomly initialised (speed does not depend on the weights) and generates
--new-tokens tokens after a random --prompt-len-token prompt, by default exactly filling the
context, so every step is one cached decode (with learned positions, tokens past block_size make
the cache re-prefill the cropped context at every step; --new-tokens can measure that too).
Sampling is at temperature 1 over the whole vocabulary. Each repeat times the whole generation,
prefill included; tokens/s = batch * new tokens / seconds, median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: import the repo's packages

from causality.sampling import compile_for_generation, inference_runtime, synchronize  # noqa: E402
from model import GPT, PRESETS, ModelConfig  # noqa: E402
from model.generate import generate_tokens  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's, else 65 (tiny Shakespeare)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default: fill the context (block_size - prompt)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="generated once before timing")
    p.add_argument("--repeats", type=int, default=3)
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", dest="use_cache", action="store_true", default=True)
    cache.add_argument("--no-cache", dest="use_cache", action="store_false")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def generate_once(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool, ctx, generator) -> float:
    """Seconds to generate n tokens after prompt (B, T), GPU work included."""
    synchronize(prompt.device)
    start = time.perf_counter()
    with ctx:
        for _ in generate_tokens(model, prompt, n, temperature=1.0, use_cache=use_cache, generator=generator):
            pass
    synchronize(prompt.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rt = inference_runtime(args.device, args.precision, args.compile)
    device = rt.device
    vocab = args.vocab_size or PRESETS[args.preset].get("vocab_size", 65)
    torch.manual_seed(args.seed)
    model = GPT(ModelConfig(preset=args.preset, vocab_size=vocab)).to(device).eval()
    block = model.config.block_size
    new_tokens = args.new_tokens or block - args.prompt_len
    if args.prompt_len < 1 or new_tokens < 1 or args.prompt_len > block:
        raise SystemExit(f"error: need 1 <= prompt_len <= block_size ({block}) and new tokens >= 1")
    if args.compile:
        compile_for_generation(model)
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g, device=device)  # (B, T)
    ctx = rt.autocast()
    generate_once(model, prompt, min(args.warmup_tokens, new_tokens), args.use_cache, ctx, g)  # warm-up
    if args.compile:  # compiled code specialises on shapes: warm up over the whole timed range too
        generate_once(model, prompt, new_tokens, args.use_cache, ctx, g)
    seconds = [generate_once(model, prompt, new_tokens, args.use_cache, ctx, g) for _ in range(args.repeats)]
    median = statistics.median(seconds)
    result = {
        "preset": args.preset, "params_M": round(model.num_params() / 1e6, 2), "vocab_size": vocab,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()})",
        "dtype": rt.precision, "compile": args.compile, "use_cache": args.use_cache, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "tokens_per_s": round(args.batch * new_tokens / median, 1), "ms_per_token": round(1e3 * median / new_tokens, 3),
        "seconds": [round(s, 4) for s in seconds], "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

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

--compare-hf: the same weights in Hugging Face's GPT2LMHeadModel (model/gpt2.py maps them; needs
the optional `transformers`, pip install -e '.[hf]'), greedy, both generating the same tokens after
the same prompt, timed in alternation in this process (ours, theirs, ours, theirs, ...), so a load
that comes and goes on a shared machine hits both alike; the figures are the medians over
--repeats rounds, and the ratio is theirs / ours in seconds. The model is made expressible as GPT-2
(pre-LN, learned positions, tied head; the preset's sizes and activation). Untimed, one more run of
each checks the greedy tokens are identical, and where they are not reports the first step that
differs and the top-1 minus top-2 logit margin there (a near-tie flips with rounding order alone):

    python scripts/bench_sample.py --compare-hf --preset small --device cpu --threads 1 --repeats 5 \\
        --prompt-len 16 --new-tokens 200                       # 6x6x384, context 256
    python scripts/bench_sample.py --compare-hf --preset gpt2 --device cpu --threads 1 --repeats 3 \\
        --prompt-len 512 --new-tokens 64 [--compile]           # GPT-2 124M, context 1024

Also reported: each side's prefill alone (median of 3) and, from it, the time per decode step
((generation - prefill) / (new tokens - 1)); and weight_read_ms, the time to read every parameter
once (a sum over each): about the memory-traffic floor of a batch-1 decode step, whose reads are
mostly the weights. When they do not fit in the CPU caches, no implementation of the same float32
math decodes a token faster than that.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: import the repo's packages

from causality.sampling import inference_runtime, synchronize  # noqa: E402
from cli import model_preset  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from model.generate import compile_for_generation, generate_tokens  # noqa: E402
from model.gpt2 import to_hf_config, to_hf_state_dict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="a file of configs/model/ (tiny, small, gpt2, gpt2-medium)")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's, else 65 (tiny Shakespeare)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default: fill the context (block_size - prompt)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="generated once before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed generations (rounds with --compare-hf)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", dest="use_cache", action="store_true", default=True)
    cache.add_argument("--no-cache", dest="use_cache", action="store_false")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="model/generate.py compile_for_generation (ours only)")
    p.add_argument("--compare-hf", action="store_true", help="against transformers' generate on the same weights")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds fn() takes, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def generate_once(model: GPT, prompt: torch.Tensor, n: int, use_cache: bool, ctx, generator) -> float:
    """Seconds to generate n tokens after prompt (B, T) at temperature 1, GPU work included."""
    def run() -> None:
        with ctx:
            for _ in generate_tokens(model, prompt, n, temperature=1.0, use_cache=use_cache, generator=generator):
                pass
    return timed(run, prompt.device)


def weight_read_ms(model: torch.nn.Module, repeats: int = 5) -> float:
    """Median milliseconds to read every parameter once: a batch-1 decode step's memory floor."""
    params = list(model.parameters())  # tied weights once

    def read() -> None:
        for p in params:
            p.sum()
    with torch.no_grad():  # (no autograd record per tensor)
        read()
        times = [timed(read, params[0].device) for _ in range(repeats)]
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rt = inference_runtime(args.device, args.precision, args.compile)
    device = rt.device
    preset = model_preset(args.preset)
    vocab = args.vocab_size or preset["vocab_size"] or 65
    torch.manual_seed(args.seed)
    gpt2_shape = dict(norm="pre", pos="learned", tie_weights=True, bias=True) if args.compare_hf else {}
    model = GPT(ModelConfig(**{**preset, "vocab_size": vocab, **gpt2_shape})).to(device).eval()
    block = model.config.block_size
    new_tokens = args.new_tokens or block - args.prompt_len
    if args.prompt_len < 1 or new_tokens < 1 or args.prompt_len > block or args.repeats < 1:
        raise SystemExit(f"error: need 1 <= prompt_len <= block_size ({block}), new tokens >= 1 and repeats >= 1")
    if args.compare_hf and (not args.use_cache or args.prompt_len + new_tokens > block):
        raise SystemExit(f"error: --compare-hf times cached generation within the context: "
                         f"prompt_len + new tokens <= block_size ({block})")
    if args.compile:
        compile_for_generation(model)
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g, device=device)  # (B, T)
    ctx = rt.autocast()
    result = {
        "preset": args.preset, "params_M": round(model.num_params() / 1e6, 2), "vocab_size": vocab,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()})",
        "dtype": rt.precision, "compile": args.compile, "use_cache": args.use_cache, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
    }
    if args.compare_hf:
        result.update(compare_hf(model, prompt, new_tokens, args.repeats, ctx))
    else:
        generate_once(model, prompt, min(args.warmup_tokens, new_tokens), args.use_cache, ctx, g)  # warm-up
        if args.compile:  # the first generation compiles: warm up over the whole timed range too
            generate_once(model, prompt, new_tokens, args.use_cache, ctx, g)
        seconds = [generate_once(model, prompt, new_tokens, args.use_cache, ctx, g) for _ in range(args.repeats)]
        median = statistics.median(seconds)
        result.update({"tokens_per_s": round(args.batch * new_tokens / median, 1),
                       "ms_per_token": round(1e3 * median / new_tokens, 3), "seconds": [round(s, 4) for s in seconds]})
    result["torch"] = torch.__version__
    print(json.dumps(result))
    return result


# ---- against transformers --------------------------------------------------------------------------
def hf_twin(model: GPT) -> torch.nn.Module:
    """GPT2LMHeadModel holding a copy of model's weights (model/gpt2.py's mapping), in eval mode."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("error: --compare-hf needs transformers: pip install -e '.[hf]'") from None
    fields = {k: v for k, v in to_hf_config(model.config).items() if k not in ("model_type", "architectures")}
    twin = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields))
    # strict: every weight mapped, none left at its random init.
    twin.load_state_dict(to_hf_state_dict(model.state_dict(), model.config.n_layer), strict=True)
    return twin.to(model.wte.weight.device).eval()


def compare_hf(model: GPT, prompt: torch.Tensor, n: int, rounds: int, ctx) -> dict:
    """Greedy tokens/s of our generate_tokens and of transformers' generate on the same weights,
    timed in alternation, and whether the two produce the same tokens."""
    twin = hf_twin(model)
    device = prompt.device
    T = prompt.shape[1]
    mask = torch.ones_like(prompt)  # (B, T): no padding

    def ours(with_logits: bool = False) -> list:
        with ctx, torch.inference_mode():
            return list(generate_tokens(model, prompt, n, temperature=0, with_logits=with_logits))

    def theirs(with_logits: bool = False):
        with ctx, torch.inference_mode():
            # eos_token_id is None in the mapped config: it generates exactly n tokens.
            return twin.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 output_logits=with_logits, return_dict_in_generate=with_logits)

    ours()  # warm-up; compiles on first use
    theirs()
    # Compiling leaves a large heap of long-lived Python objects that every later garbage collection
    # walks: freezing them keeps it from slowing whichever side allocates more objects per token.
    gc.collect()
    gc.freeze()
    seconds_ours, seconds_theirs = [], []
    try:
        for _ in range(rounds):  # A B A B: both see the same machine, round by round
            seconds_ours.append(timed(ours, device))
            seconds_theirs.append(timed(theirs, device))
    finally:
        gc.unfreeze()
    a, b = statistics.median(seconds_ours), statistics.median(seconds_theirs)

    # The prefill alone, as each generation runs it (transformers' generate keeps one position's logits).
    compiled = getattr(model, "compiled_steps", None)
    our_prefill = compiled.prefill if compiled else model.step

    def prefill_ours() -> None:
        with ctx, torch.inference_mode():
            our_prefill(prompt, model.new_caches(prompt.shape[0]), start_pos=0)

    def prefill_theirs() -> None:
        with ctx, torch.inference_mode():
            twin(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)

    prefill_a, prefill_b = (statistics.median(x) for x in zip(
        *[(timed(prefill_ours, device), timed(prefill_theirs, device)) for _ in range(3)], strict=True))
    steps = max(n - 1, 1)  # a generation of n tokens is one prefill and n - 1 decode steps
    out = {"mode": "compare_hf", "greedy": True,
           "hf_attn_implementation": twin.config._attn_implementation,
           "tokens_per_s": round(prompt.shape[0] * n / a, 1), "hf_tokens_per_s": round(prompt.shape[0] * n / b, 1),
           "ms_per_token": round(1e3 * a / n, 3), "hf_ms_per_token": round(1e3 * b / n, 3),
           "ratio": round(b / a, 3), "seconds": [round(s, 4) for s in seconds_ours],
           "hf_seconds": [round(s, 4) for s in seconds_theirs],
           "prefill_s": round(prefill_a, 4), "hf_prefill_s": round(prefill_b, 4),
           "decode_ms_per_step": round(1e3 * (a - prefill_a) / steps, 3),
           "hf_decode_ms_per_step": round(1e3 * (b - prefill_b) / steps, 3),
           "weight_read_ms": round(weight_read_ms(model), 3)}
    out.update(check_tokens(ours(with_logits=True), theirs(with_logits=True), T))
    return out


def check_tokens(ours: list[tuple[torch.Tensor, torch.Tensor]], theirs, prompt_len: int) -> dict:
    """Same greedy tokens? Else the first step that differs and each side's top-1 minus top-2 logit
    there; the largest logit difference over the steps before it."""
    tok_a = torch.cat([t for t, _ in ours], dim=1)  # (B, N)
    tok_b = theirs.sequences[:, prompt_len:].to(tok_a.device)  # (B, N)
    differs = (tok_a != tok_b).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else None
    same_steps = first if first is not None else tok_a.shape[1]
    diff = max(((la.float() - lb.float().to(la.device)).abs().max().item()
                for (_, la), lb in zip(ours[:same_steps], theirs.logits[:same_steps], strict=True)), default=0.0)
    result = {"tokens_equal": first is None, "first_divergence": first, "max_logit_diff": float(f"{diff:.3g}")}
    if first is not None:
        def margin(logits: torch.Tensor) -> float:
            top2 = logits.float().topk(2, dim=-1).values  # (B, 2)
            return float(f"{(top2[:, 0] - top2[:, 1]).min().item():.3g}")
        result.update({"margin_at_divergence": margin(ours[first][1]), "hf_margin_at_divergence": margin(theirs.logits[first])})
    return result


if __name__ == "__main__":
    main()

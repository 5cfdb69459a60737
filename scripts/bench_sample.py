"""Generation throughput: a fixed configuration, timed after a warm-up, printed as one JSON line.

    python scripts/bench_sample.py --preset tiny                      # KV cache on, CPU or GPU (auto)
    python scripts/bench_sample.py --preset small --no-cache --repeats 3
    python scripts/bench_sample.py --compare-hf --preset small --device cpu --threads 1 --repeats 5 \\
        --prompt-len 16 --new-tokens 200 [--compile]

A randomly initialised model (speed does not depend on the weights) generates at temperature 1 after
a random prompt, by default filling the context; each repeat times the whole generation, prefill
included; tokens/s = batch * new tokens / seconds, median over the repeats.

--compare-hf: the same weights, made expressible as GPT-2, in transformers' GPT2LMHeadModel
(model/gpt2.py; pip install -e '.[hf]'), both greedy, timed in alternation so that a passing load
hits both alike (ratio = their seconds / ours), plus each side's prefill and time per decode step;
then whether the greedy tokens agree, else the first step that differs and its top-1 minus top-2
logit margin (a near-tie flips with rounding order alone).

weight_read_ms, beside the figures, is the time to read every parameter once: about the memory floor
of a batch-1 decode step, whose reads are mostly the weights.
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="a file of configs/model/ (tiny, small, gpt2, gpt2-medium)")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's, else 65 (tiny Shakespeare)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default: fill the context (block_size - prompt)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="generated once before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed generations (rounds with --compare-hf)")
    p.add_argument("--cache", dest="use_cache", action=argparse.BooleanOptionalAction, default=True, help="KV cache")
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


def weight_read_ms(model: torch.nn.Module, repeats: int = 5) -> float:
    """Median milliseconds to read every parameter once: a batch-1 decode step's memory floor."""
    params = list(model.parameters())  # tied weights once
    with torch.no_grad():  # (no autograd record per tensor)
        times = [timed(lambda: [p.sum() for p in params], params[0].device) for _ in range(repeats + 1)]
    return 1e3 * statistics.median(times[1:])  # the first read warms up


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
    n = args.new_tokens or block - args.prompt_len
    if args.prompt_len < 1 or n < 1 or args.prompt_len > block or args.repeats < 1:
        raise SystemExit(f"error: need 1 <= prompt_len <= block_size ({block}), new tokens >= 1 and repeats >= 1")
    if args.compare_hf and (not args.use_cache or args.prompt_len + n > block):
        raise SystemExit(f"error: --compare-hf times cached generation within the context: "
                         f"prompt_len + new tokens <= block_size ({block})")
    if args.compile:
        compile_for_generation(model)
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g, device=device)  # (B, T)
    ctx = rt.autocast()
    result = {
        "preset": args.preset, "params_M": round(model.num_params() / 1e6, 2), "vocab_size": vocab,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{device.type} ({platform.processor() or platform.machine()})",
        "dtype": rt.precision, "compile": args.compile, "use_cache": args.use_cache, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": n, "threads": torch.get_num_threads(),
    }
    if args.compare_hf:
        result.update(compare_hf(model, prompt, n, args.repeats, ctx))
    else:
        def generate(k: int) -> float:  # seconds for k tokens at temperature 1
            with ctx:
                return timed(lambda: list(generate_tokens(model, prompt, k, use_cache=args.use_cache, generator=g)),
                             device)

        generate(min(args.warmup_tokens, n))  # warm-up
        if args.compile:  # the first generation compiles: warm up over the whole timed range too
            generate(n)
        seconds = [generate(n) for _ in range(args.repeats)]
        median = statistics.median(seconds)
        result.update({"tokens_per_s": round(args.batch * n / median, 1), "ms_per_token": round(1e3 * median / n, 3),
                       "seconds": [round(s, 4) for s in seconds]})
    result.update(weight_read_ms=round(weight_read_ms(model), 3), torch=torch.__version__)
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
    twin, device, B = hf_twin(model), prompt.device, prompt.shape[0]
    mask = torch.ones_like(prompt)  # (B, T): no padding
    our_prefill = model.compiled_steps.prefill if getattr(model, "compiled_steps", None) else model.step

    def ours(with_logits: bool = False) -> list:
        with ctx, torch.inference_mode():
            return list(generate_tokens(model, prompt, n, temperature=0, with_logits=with_logits))

    def theirs(with_logits: bool = False):
        with ctx, torch.inference_mode():
            # eos_token_id is None in the mapped config: it generates exactly n tokens.
            return twin.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 output_logits=with_logits, return_dict_in_generate=with_logits)

    def prefill_ours() -> None:  # the prefill alone, as each generation runs it
        with ctx, torch.inference_mode():
            our_prefill(prompt, model.new_caches(B), start_pos=0)

    def prefill_theirs() -> None:  # (transformers' generate keeps one position's logits)
        with ctx, torch.inference_mode():
            twin(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)

    ours()  # warm-up; compiles on first use
    theirs()
    # Compiling leaves a large heap of long-lived Python objects that every later garbage collection
    # walks: freezing them keeps it from slowing whichever side allocates more objects per token.
    gc.collect()
    gc.freeze()
    try:  # A B A B: both see the same machine, round by round
        sec_a, sec_b = zip(*[(timed(ours, device), timed(theirs, device)) for _ in range(rounds)], strict=True)
    finally:
        gc.unfreeze()
    pre_a, pre_b = (statistics.median(x) for x in zip(
        *[(timed(prefill_ours, device), timed(prefill_theirs, device)) for _ in range(3)], strict=True))
    a, b = statistics.median(sec_a), statistics.median(sec_b)
    steps = max(n - 1, 1)  # a generation of n tokens is one prefill and n - 1 decode steps
    out = {"mode": "compare_hf", "greedy": True, "hf_attn_implementation": twin.config._attn_implementation,
           "tokens_per_s": round(B * n / a, 1), "hf_tokens_per_s": round(B * n / b, 1),
           "ms_per_token": round(1e3 * a / n, 3), "hf_ms_per_token": round(1e3 * b / n, 3), "ratio": round(b / a, 3),
           "seconds": [round(s, 4) for s in sec_a], "hf_seconds": [round(s, 4) for s in sec_b],
           "prefill_s": round(pre_a, 4), "hf_prefill_s": round(pre_b, 4),
           "decode_ms_per_step": round(1e3 * (a - pre_a) / steps, 3),
           "hf_decode_ms_per_step": round(1e3 * (b - pre_b) / steps, 3)}
    return {**out, **check_tokens(ours(with_logits=True), theirs(with_logits=True), prompt.shape[1])}


def check_tokens(ours: list[tuple[torch.Tensor, torch.Tensor]], theirs, prompt_len: int) -> dict:
    """Same greedy tokens? Else the first step that differs and each side's top-1 minus top-2 logit
    there; the largest logit difference over the steps before it."""
    tok_a = torch.cat([t for t, _ in ours], dim=1)  # (B, N)
    tok_b = theirs.sequences[:, prompt_len:].to(tok_a.device)  # (B, N)
    differs = (tok_a != tok_b).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else None
    same = ours if first is None else ours[:first]
    diff = max(((la.float() - lb.float().to(la.device)).abs().max().item()
                for (_, la), lb in zip(same, theirs.logits[:len(same)], strict=True)), default=0.0)
    result = {"tokens_equal": first is None, "first_divergence": first, "max_logit_diff": float(f"{diff:.3g}")}
    if first is not None:
        def margin(logits: torch.Tensor) -> float:
            top2 = logits.float().topk(2, dim=-1).values  # (B, 2)
            return float(f"{(top2[:, 0] - top2[:, 1]).min().item():.3g}")
        result.update(margin_at_divergence=margin(ours[first][1]), hf_margin_at_divergence=margin(theirs.logits[first]))
    return result


if __name__ == "__main__":
    main()

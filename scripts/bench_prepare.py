"""Benchmark of data preparation throughput (tokens/s), one JSON line per case.

Repeats --input (tiny Shakespeare) to about --mb megabytes and times `data.prepare.prepare` from an
empty cache: char and bpe read it as one local file (source=files); hf_stream_bpe as a jsonl of one
paragraph per document, streamed by `datasets`; char_python_loop is nanoGPT's list comprehension
over the characters, the reference for our lookup table. Tokenizer cases run with all cores
(num_proc=0) and one thread (num_proc=1), each run in a fresh process with a fresh cache; the figure
is the median of --runs, over all tokens written in the whole call (read, train, encode).

    python scripts/bench_prepare.py --input /path/to/tinyshakespeare.txt --mb 100 --runs 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's packages
CASES = ("char", "bpe", "hf_stream_bpe", "char_python_loop")


def build_inputs(src: Path, mb: float, workdir: Path) -> Path:
    """corpus.txt (src repeated to about mb megabytes) and corpus.jsonl (one paragraph a line) in workdir."""
    text = src.read_text(encoding="utf-8")
    repeats = max(1, round(mb * 1e6 / len(text.encode())))
    big = workdir / "corpus.txt"
    big.write_text(text * repeats, encoding="utf-8")
    paragraphs = "".join(json.dumps({"text": p + "\n\n"}) + "\n" for p in text.split("\n\n"))
    (workdir / "corpus.jsonl").write_text(paragraphs * repeats, encoding="utf-8")
    return big


def run_one(case: str, threads: int, workdir: Path, vocab_size: int) -> dict:
    """One timed run, in a fresh process of its own."""
    import numpy as np

    from data.config import DataConfig
    from data.prepare import prepare, read_meta

    if case == "char_python_loop":
        text = (workdir / "corpus.txt").read_text(encoding="utf-8")
        t0 = time.perf_counter()
        stoi = {c: i for i, c in enumerate(sorted(set(text)))}
        ids = np.array([stoi[c] for c in text], dtype=np.uint16)
        seconds, tokens, build = time.perf_counter() - t0, len(ids), {}
    else:
        txt, jsonl = str(workdir / "corpus.txt"), str(workdir / "corpus.jsonl")
        common = dict(cache_dir=tempfile.mkdtemp(dir=workdir, prefix="cache-"), num_proc=threads)
        bpe = dict(tokenizer="bpe", vocab_size=vocab_size)
        cfg = {"char": DataConfig(source="files", path=txt, **common),
               "bpe": DataConfig(source="files", path=txt, **bpe, **common),
               "hf_stream_bpe": DataConfig(source="hf", hf_name="json", path=jsonl, streaming=True, **bpe, **common),
               }[case]
        t0 = time.perf_counter()
        meta = read_meta(prepare(cfg, progress=False))
        seconds = time.perf_counter() - t0
        tokens, build = meta["tokens"]["train"] + meta["tokens"]["val"], meta["build_seconds"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "tokens": tokens, "build_seconds": build, "max_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}  # whole process; > seconds means several threads ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="a text file, e.g. tiny Shakespeare")
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size to build, in megabytes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        mb = build_inputs(args.input, args.mb, workdir).stat().st_size / 1e6
        for case in args.cases.split(","):
            for threads in (0, 1) if case != "char_python_loop" else (1,):
                runs = []
                for _ in range(args.runs):  # each in a fresh process: no warm imports, caches or threads
                    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                        runs.append(pool.submit(run_one, case, threads, workdir, args.vocab_size).result())
                median = statistics.median(r["seconds"] for r in runs)
                tokens = runs[0]["tokens"]
                # The median run's build times (an even count has no median run: the first one's).
                build = runs[[r["seconds"] for r in runs].index(median)] if args.runs % 2 else runs[0]
                print(json.dumps({
                    "case": case, "threads": "all" if threads == 0 else threads, "cpus": os.cpu_count(),
                    "corpus_mb": round(mb, 1), "tokens": tokens, "median_s": round(median, 2),
                    "tokens_per_s": round(tokens / median), "mb_per_s": round(mb / median, 2),
                    "runs_s": [round(r["seconds"], 2) for r in runs], "cpu_s": [round(r["cpu_s"], 1) for r in runs],
                    "load_avg_1m": round(os.getloadavg()[0], 1), "build_seconds": build["build_seconds"],
                    "max_rss_mb": round(max(r["max_rss_mb"] for r in runs)),
                }), flush=True)

if __name__ == "__main__":
    main()

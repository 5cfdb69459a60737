"""scripts/bench_sample.py prints one JSON line with the fields the benchmark tables are built from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_sample", ROOT / "scripts" / "bench_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sample_prints_one_json_line(capsys):
    threads = torch.get_num_threads()
    try:
        result = load_script().main(["--preset", "tiny", "--new-tokens", "5", "--prompt-len", "4", "--repeats", "2",
                                     "--device", "cpu", "--no-cache", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    assert result["device"].startswith("cpu") and result["dtype"] == "fp32" and result["compile"] is False
    assert result["use_cache"] is False and result["batch"] == 1 and result["new_tokens"] == 5
    assert len(result["seconds"]) == 2 and result["tokens_per_s"] > 0

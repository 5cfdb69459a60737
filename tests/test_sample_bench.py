"""scripts/bench_sample.py prints one JSON line with the fields the benchmark tables are built from; its
--compare-hf mode times our generation against transformers' on the same weights and checks the tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
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


@pytest.mark.hf
def test_bench_sample_compares_with_transformers_on_the_same_weights(capsys):
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    try:
        result = load_script().main(["--compare-hf", "--preset", "tiny", "--new-tokens", "6", "--prompt-len", "4",
                                     "--repeats", "2", "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    assert result["mode"] == "compare_hf" and result["greedy"] and result["new_tokens"] == 6
    assert len(result["seconds"]) == len(result["hf_seconds"]) == 2
    assert result["tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0 and result["weight_read_ms"] > 0
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["hf_tokens_per_s"], rel=0.02)
    assert result["prefill_s"] > 0 and result["hf_prefill_s"] > 0 and "decode_ms_per_step" in result
    # The mapped weights compute the same function: the same greedy tokens, logits equal to rounding.
    assert result["tokens_equal"] and result["first_divergence"] is None and result["max_logit_diff"] < 1e-4


def test_bench_sample_reports_the_first_divergence_and_its_margin():
    bench = load_script()
    logits = [torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.99]]), torch.tensor([[3.0, 0.0, 0.0]])]
    ours = [(lg.argmax(-1, keepdim=True), lg) for lg in logits]  # tokens 1, 0, 0
    theirs_logits = [logits[0] + 1e-6, torch.tensor([[0.99, 0.0, 1.0]]), logits[2]]  # picks 2 at step 1
    theirs = SimpleNamespace(sequences=torch.tensor([[7, 7, 1, 2, 0]]), logits=theirs_logits)
    out = bench.check_tokens(ours, theirs, prompt_len=2)
    assert not out["tokens_equal"] and out["first_divergence"] == 1
    assert out["margin_at_divergence"] == pytest.approx(0.01) and out["hf_margin_at_divergence"] == pytest.approx(0.01)
    assert out["max_logit_diff"] == pytest.approx(1e-6, rel=0.01)  # over the steps before the divergence


def test_compare_hf_refuses_what_it_cannot_time():
    with pytest.raises(SystemExit, match="block_size"):
        load_script().main(["--compare-hf", "--preset", "tiny", "--prompt-len", "60", "--new-tokens", "10",
                            "--device", "cpu"])

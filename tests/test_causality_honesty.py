"""What the leakage and attention modes claim is what they measured: the generation test of a bf16
leakage run runs in float32 and a flipped near-tie is called rounding, never LEAK, while a real flip
still is; mode=attention says that its zeros above the diagonal hold by construction of the mask,
and names the attention path the weights came from.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_sample_generate import run_sample  # sample.run on the real configs/sample.yaml

import model.attention
from causality.leakage import LeakageConfig, cache_consistency, run_leakage_check
from causality.report import format_report
from model import GPT, ModelConfig

VOCAB, T = 50, 12
SMALL = LeakageConfig(trials=2, influence_len=8, probes=2, gen_tokens=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def make(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def prompt(n: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


# ---- mode=leakage: the generation test is not fooled by rounding ----------------------------------
def test_bf16_leakage_run_never_reports_a_leak_from_the_generation_test():
    m = make()
    step, trace = m.step, m.trace
    seen: dict[str, list] = {"generation": [], "trace": []}

    def rounded_step(idx, caches, start_pos):
        # What bf16 does to the one-token decode kernels on a GPU: the cached path's logits come out
        # differently rounded, and a near-tie flips. Here, whenever autocast is on, the top two swap.
        seen["generation"].append((torch.is_autocast_enabled("cpu"), torch.get_float32_matmul_precision()))
        logits = step(idx, caches, start_pos)  # (1, V)
        if torch.is_autocast_enabled("cpu"):
            top2 = logits.topk(2, dim=-1).indices  # (1, 2)
            logits = logits.scatter(-1, top2, logits.gather(-1, top2.flip(-1)) + 0.01)
        return logits

    def traced(*args, **kwargs):
        seen["trace"].append(torch.is_autocast_enabled("cpu"))
        return trace(*args, **kwargs)

    m.step, m.trace = rounded_step, traced
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as the trainer's runtime sets it on CUDA
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # even a caller that wraps the whole check
            report = run_leakage_check(m, prompt(), SMALL, torch.autocast("cpu", dtype=torch.bfloat16))
        assert torch.get_float32_matmul_precision() == "high"  # restored afterwards
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen["trace"] and all(seen["trace"])  # perturbation and influence ran in bf16
    assert seen["generation"] and set(seen["generation"]) == {(False, "highest")}  # generation: true float32
    assert report.masked.consistency.equal
    assert not any(s.startswith("generation") for s in report.leaks)
    assert (report.verdict, report.exit_code) == ("PASS", 0)
    assert "in float32 whatever the precision" in format_report(report, "header", torch.bfloat16)


def _tied(logits: torch.Tensor, nudge: float = 0.0) -> torch.Tensor:
    """Tokens 3 and 5 tied at the top of every row (argmax picks 3), then token 5 raised by nudge."""
    logits = logits.clone()
    logits[..., 3] = logits[..., 5] = logits.amax(dim=-1) + 1.0
    logits[..., 5] += nudge
    return logits


def _tied_model(nudge: float) -> GPT:
    """A causal model whose recomputed logits hold an exact tie, and whose cached path moves one of the
    two tokens by `nudge`: a rounding-sized nudge flips a near-tie, a large one is a real disagreement."""
    m = make()
    forward, step = m.forward, m.step
    m.forward = lambda idx, targets=None: (_tied(forward(idx)[0]), None)
    m.step = lambda idx, caches, start_pos: _tied(step(idx, caches, start_pos), nudge)
    return m


def test_a_flipped_near_tie_is_rounding_and_a_real_flip_is_a_leak():
    near = cache_consistency(_tied_model(1e-6), prompt(4), 4)
    assert not near.equal and near.first_mismatch == 0 and (near.cached[0], near.recomputed[0]) == (5, 3)
    assert near.flip_gap == pytest.approx(1e-6, rel=0.2) and near.near_tie
    report = run_leakage_check(_tied_model(1e-6), prompt(), SMALL)
    assert (report.verdict, report.leaks) == ("PASS", [])
    text = format_report(report, "header")
    assert "near-tie" in text and "rounding, not leakage" in text

    real = cache_consistency(_tied_model(0.5), prompt(4), 4)
    assert not real.equal and not real.near_tie and real.flip_gap == pytest.approx(0.5)
    report = run_leakage_check(_tied_model(0.5), prompt(), SMALL)
    assert report.verdict == "LEAK" and any(s.startswith("generation") for s in report.leaks)
    tight = run_leakage_check(_tied_model(1e-6), prompt(), LeakageConfig(**{**SMALL.__dict__, "tie_margin": 1e-9}))
    assert tight.verdict == "LEAK"  # the margin decides, nothing else


# ---- mode=attention: by construction, and which path ----------------------------------------------
TINY = ("mode=attention", "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.block_size=12")


@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_attention_mode_says_zeros_hold_by_construction_and_names_the_path(attn, tmp_path):
    code, out, _ = run_sample(*TINY, f"model.attn={attn}", f"out_dir={tmp_path}")
    assert code == 0
    assert "exactly zero by construction" in out and "-inf before the softmax" in out
    assert "not that nothing leaks" in out and "mode=leakage" in out
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["max_weight_above_diagonal"] == 0.0 and data["zero_above_diagonal_by_construction"] is True
    assert (data["weights_path"], data["configured_attn"]) == ("explicit", attn)
    if attn == "explicit":
        assert "weights from attn=explicit, the path this model runs" in out
        assert data["logits_max_diff_vs_configured"] is None
    else:
        assert "weights from attn=explicit" in out and "this model runs attn=sdpa" in out
        assert 0.0 <= data["logits_max_diff_vs_configured"] < 1e-4  # the two paths compute the same thing


def test_attention_mode_claims_no_construction_without_a_working_mask(tmp_path, monkeypatch):
    code, out, _ = run_sample(*TINY, "model.causal=false", f"out_dir={tmp_path / 'off'}")
    assert code == 0 and "causal=False: no mask" in out and "by construction" not in out
    assert json.loads((tmp_path / "off" / "attention.json").read_text())["zero_above_diagonal_by_construction"] is False

    def off_by_one(t, s, device):  # a broken mask: position t also reads t + 1
        return torch.arange(s, device=device)[None, :] <= torch.arange(s - t, s, device=device)[:, None] + 1
    monkeypatch.setattr(model.attention, "causal_mask", off_by_one)
    code, out, _ = run_sample(*TINY, f"out_dir={tmp_path / 'broken'}")
    assert code == 1 and "the mask is not applied" in out and "by construction" not in out

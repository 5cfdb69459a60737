"""What the leakage and attention modes claim is what they measured: the generation test of a bf16
leakage run runs in float32 and a flipped near-tie is called rounding, never LEAK, while a real flip
still is; mode=attention says that its zeros above the diagonal hold by construction of the mask,
and names the attention path the weights came from.

The verdict is not fooled by NaN and needs evidence: masks that hide a token from itself, leave a row
empty, read one token ahead or mask nothing, and NaN weights, each fail to PASS through both attention
paths and every position embedding, while a healthy model passes in fp32 and bf16; a perturbation
that leaves a later position unchanged is inconclusive; the generation test's logits catch a look-ahead
that keeps every greedy token, within a tolerance derived from float32's eps.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_sample_generate import run_sample  # sample.run on the real configs/sample.yaml

import model.attention
from causality.leakage import LeakageConfig, cache_consistency, logit_tolerance, run_leakage_check
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


# ---- the verdict: not fooled by NaN, and never a pass without evidence ---------------------------------
def _grid(t: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions (T, 1), key positions (1, S)), as causal_mask lays them out."""
    return torch.arange(s - t, s, device=device)[:, None], torch.arange(s, device=device)[None, :]


def _correct(t, s, device):
    q, k = _grid(t, s, device)
    return k <= q


def _hidden_from_itself(t, s, device):  # every token reads only earlier ones: row 0 reads nothing
    q, k = _grid(t, s, device)
    return k < q


def _last_row_empty(t, s, device):  # the right triangle, but the last query reads nothing
    q, k = _grid(t, s, device)
    return (k <= q) & (q < s - 1)


def _one_token_ahead(t, s, device):  # position t also reads t + 1
    q, k = _grid(t, s, device)
    return k <= q + 1


def _no_mask(t, s, device):
    return torch.ones(t, s, dtype=torch.bool, device=device)


def _use_mask(monkeypatch, mask) -> None:
    """Make every attention path apply `mask` as its causal mask. The explicit path and sdpa's cached
    prefill call model.attention.causal_mask; sdpa's whole-sequence path passes is_causal=True, a flag,
    so it is routed through causal_mask too (a correct mask gives the same numbers either way)."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if is_causal:
            attn_mask, is_causal = model.attention.causal_mask(q.shape[-2], k.shape[-2], q.device), False
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(model.attention, "causal_mask", mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)


def _nan_at(name: str):
    def poison(m: GPT) -> None:
        with torch.no_grad():
            m.get_parameter(name)[0, 0] = float("nan")
    return poison


# case -> (a broken causal mask, or a change to the weights; the verdict it must get)
BROKEN = {
    "hidden_from_itself": (_hidden_from_itself, "FAIL"),  # explicit softmax: 0/0 = NaN on row 0
    "last_row_empty": (_last_row_empty, "FAIL"),
    "one_token_ahead": (_one_token_ahead, "LEAK"),
    "no_mask": (_no_mask, "LEAK"),
    # A NaN query weight: torch's CPU sdpa turns a row of NaN scores into zeros, so an sdpa forward
    # can stay finite; the weights check and the gradients still see it.
    "nan_query_weight": (_nan_at("h.0.attn.c_attn.weight"), "FAIL"),
    "nan_mlp_weight": (_nan_at("h.1.mlp.c_fc.weight"), "FAIL"),
    "correct_mask_rerouted": (_correct, "PASS"),  # the rerouting itself changes nothing
}


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_mask_or_nan_weights_never_pass(case, attn, pos, monkeypatch):
    change, verdict = BROKEN[case]
    m = make(attn=attn, pos=pos)
    if case.startswith("nan"):
        change(m)
    else:
        _use_mask(monkeypatch, change)
    report = run_leakage_check(m, prompt(), SMALL)
    assert (report.verdict, report.exit_code) == (verdict, {"PASS": 0, "LEAK": 1, "FAIL": 4}[verdict]), report.failures
    line = format_report(report, "header").splitlines()[-1]
    if verdict == "FAIL":
        assert line.startswith("FAIL: non-finite values") and "non-finite logits" in line
    if case in ("hidden_from_itself", "last_row_empty") and attn == "sdpa":
        # sdpa gives a query with nothing to read zeros, not NaN: the explicit path's NaN and the
        # generation test's logits (a decode step reads every cached key) both still flag it.
        assert not report.masked.consistency.logits_agree
        assert any("through attn=explicit" in f for f in report.failures)
    if case.startswith("nan"):
        assert report.failures[0].startswith("weights: 1 tensors hold NaN or inf")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_a_healthy_model_passes_in_fp32_and_bf16(attn, pos, precision):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    report = run_leakage_check(make(attn=attn, pos=pos), prompt(), SMALL, autocast)
    assert (report.verdict, report.failures, report.leaks, report.inconclusive) == ("PASS", [], [], [])
    assert all(p.min_future > 0 for _, p in report.masked.perturbations)
    c = report.masked.consistency
    assert c.max_logit_diff <= c.logit_tolerance / 4  # rounding, with room to spare
    assert format_report(report, "header").splitlines()[-1].startswith("PASS")


def test_a_perturbation_that_leaves_a_later_position_unchanged_is_not_a_pass():
    ok = run_leakage_check(make(), prompt(), SMALL)
    for which in ("perturbation", "other_impl"):
        masked = ok.masked
        if which == "perturbation":
            p = masked.perturbation
            masked = dataclasses.replace(masked, perturbation=dataclasses.replace(
                p, future_logits=[0.0 if t == 3 else v for t, v in enumerate(p.future_logits)]))
        else:
            impl, p = masked.other_impl
            masked = dataclasses.replace(masked, other_impl=(impl, dataclasses.replace(
                p, future_logits=[0.0] * len(p.future_logits))))
        report = dataclasses.replace(ok, masked=masked)
        assert (report.verdict, report.exit_code, report.leaks) == ("INCONCLUSIVE", 3, [])
        line = format_report(report, "header").splitlines()[-1]
        assert "did not reach the model" in line and "after t = " in line


def _sharpened(**kw) -> GPT:
    """A random-init model with its matrices scaled by 3: attention far from uniform, as after some
    training, so that what a position reads shows in the logits."""
    m = make(**kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m


@pytest.mark.parametrize("attn", ["sdpa", "explicit"])
def test_generation_logits_catch_a_one_token_look_ahead_that_keeps_every_token(attn, monkeypatch):
    idx = prompt(8)
    ok = cache_consistency(_sharpened(attn=attn), idx, 8)
    assert ok.equal and ok.logits_agree and ok.max_logit_diff < ok.logit_tolerance / 3
    _use_mask(monkeypatch, _one_token_ahead)
    bad = cache_consistency(_sharpened(attn=attn), idx, 8)
    # ~6e-6 against ~2e-7 healthy, tolerance ~1e-6: the same tokens, but not the same logits
    assert bad.equal and not bad.logits_agree and bad.max_logit_diff > 3 * bad.logit_tolerance
    report = run_leakage_check(_sharpened(attn=attn), prompt(), SMALL)
    assert any(s.startswith("generation: cached and recomputed logits differ") for s in report.leaks)


def test_logit_tolerance_is_float32_rounding_scaled_by_width_and_magnitude():
    # The separation the tolerance must make (|logit| ~ 1, C = 32): 4.8e-7 from rounding with the right
    # mask, 5.7e-6 with a one-token look-ahead; the tolerance sits at least twice away from both.
    tol = logit_tolerance([torch.tensor([0.3, -1.0])], n_embd=32)
    assert tol == pytest.approx(2.0 * torch.finfo(torch.float32).eps * math.sqrt(32))
    assert 2 * 4.8e-7 < tol < 5.7e-6 / 2
    assert logit_tolerance([torch.tensor([10.0, float("nan")])], n_embd=32) == pytest.approx(10 * tol)
    assert logit_tolerance([torch.zeros(3)], 32, dtype=torch.bfloat16) > 1e4 * tol  # derived from the dtype

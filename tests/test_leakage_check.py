"""The leakage demonstration: each of its three tests reports exactly 0.0 with the causal mask and
clear leakage without it, catches a subtly broken mask, and agrees with an independent reference;
`sample.py mode=leakage` and `mode=attention` write the files they promise (PNGs of the right size,
a JSON summary) and exit non-zero when a model leaks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from test_sample_generate import run_sample, train_checkpoint  # the same few-step checkpoint and runner

import model.attention
from causality.leakage import (
    LeakageConfig,
    cache_consistency,
    influence_matrix,
    perturbation_test,
    run_leakage_check,
    variant,
)
from causality.report import DPI, grid_inches, heatmap_inches
from causality.sampling import load_from_checkpoint
from model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
VOCAB, T = 50, 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("run") / "last.pt")


def make(causal: bool = True, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, causal=causal)
    return GPT(ModelConfig(**{**cfg, **kw})).eval()


def prompt(n: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) in pixels, read back from the file."""
    return matplotlib.image.imread(path).shape[:2]


def expected(width_in: float, height_in: float) -> tuple[int, int]:
    return round(height_in * DPI), round(width_in * DPI)


# ---- test 1: perturbation ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(norm="pre", pos="rope", attn="explicit"), dict(pos="sinusoidal")])
def test_perturbation_is_exactly_zero_with_the_mask_and_not_without(kw):
    on = perturbation_test(make(**kw), prompt(), trials=2)
    off = perturbation_test(make(causal=False, **kw), prompt(), trials=2)
    assert on.max_past == 0.0  # exactly: not a tolerance
    assert on.positions == list(range(T - 1)) and len(on.hidden[0]) == 2
    assert min(on.future_logits) > 1e-3  # the perturbation did reach every later position
    assert min(off.logits) > 1e-6 and min(min(h) for h in off.hidden) > 1e-6  # every t leaks without the mask


def test_perturbation_catches_a_mask_that_is_off_by_one(monkeypatch):
    # A plausible bug: the mask lets position t also read t + 1. Only the explicit path uses causal_mask.
    def off_by_one(t, s, device):
        return torch.arange(s, device=device)[None, :] <= torch.arange(s - t, s, device=device)[:, None] + 1
    monkeypatch.setattr(model.attention, "causal_mask", off_by_one)
    res = perturbation_test(make(attn="explicit"), prompt(), trials=2)
    assert min(res.logits) > 1e-6 and min(min(h) for h in res.hidden) > 1e-4  # t now sees the new token t + 1
    report = run_leakage_check(make(attn="explicit"), prompt(), SMALL)
    assert (report.verdict, report.exit_code) == ("LEAK", 1)
    assert report.masked.other_impl[1].max_past == 0.0  # the fused path (is_causal) is still right


# ---- test 2: influence -----------------------------------------------------------------------
def test_exact_influence_matches_the_full_jacobian():
    m, idx = make(), prompt(6)
    x = m.embed(idx).detach()  # (1, 6, C)
    jac = torch.autograd.functional.jacobian(lambda e: m.trace(embeds=e).hidden[-1], x)  # (1, 6, C, 1, 6, C)
    reference = jac[0, :, :, 0].pow(2).sum(dim=(1, 3)).sqrt()  # (t, s): Frobenius norm over the C x C block
    exact = influence_matrix(m, idx, probes=None)
    torch.testing.assert_close(exact, reference, rtol=1e-4, atol=1e-6)
    assert torch.equal(exact.triu(1), torch.zeros(6, 6))  # above the diagonal: exactly zero
    assert (exact[torch.tril(torch.ones(6, 6, dtype=torch.bool))] > 0).all()  # on and below: all nonzero


def test_probe_estimate_is_close_and_keeps_exact_zeros():
    m, idx = make(), prompt(8)
    exact = influence_matrix(m, idx, probes=None)
    estimate = influence_matrix(m, idx, probes=64, seed=1)
    assert torch.equal(estimate.triu(1), torch.zeros(8, 8))
    lower = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    assert ((estimate[lower] - exact[lower]).abs() / exact[lower]).max() < 0.35
    full = influence_matrix(make(causal=False), idx, probes=4)
    assert (full > 0).all()  # without the mask every entry fills in


# ---- test 3: generation consistency ------------------------------------------------------------
def test_cache_equals_recompute_only_with_the_mask(ckpt):
    # A trained model: its attention is far from uniform, so the mask-off drift is large.
    trained = load_from_checkpoint(ckpt, "unused", torch.device("cpu")).model
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    on = cache_consistency(trained, idx, 8)
    off = cache_consistency(variant(trained, causal=False), idx, 8)
    assert on.equal and on.first_mismatch is None and len(on.cached) == 8
    assert on.max_logit_diff < 1e-4  # rounding only
    assert off.max_logit_diff > 100 * max(on.max_logit_diff, 1e-7)


# ---- the verdict -------------------------------------------------------------------------------
SMALL = LeakageConfig(trials=2, influence_len=8, probes=2, gen_tokens=4)


def test_verdicts_pass_leak_and_inconclusive():
    ok = run_leakage_check(make(), prompt(), SMALL)
    assert (ok.verdict, ok.exit_code, ok.leaks) == ("PASS", 0, [])
    assert ok.masked.max_past_change == 0.0 and ok.masked.other_impl[0] == "explicit"
    assert ok.unmasked.perturbation.max_past > SMALL.control_min
    broken = run_leakage_check(make(causal=False), prompt(), SMALL)  # a user's variant without the mask
    assert (broken.verdict, broken.exit_code) == ("LEAK", 1)
    assert any(s.startswith("perturbation") for s in broken.leaks) and any(s.startswith("influence") for s in broken.leaks)
    blind = run_leakage_check(make(), prompt(), LeakageConfig(**{**SMALL.__dict__, "control_min": 1e3}))
    assert (blind.verdict, blind.exit_code) == ("INCONCLUSIVE", 3)


def test_variant_shares_weights_but_not_the_module():
    m = make()
    off = variant(m, causal=False)
    assert off is not m and m.config.causal and not off.config.causal
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), off.state_dict().values(), strict=True))


# ---- sample.py mode=leakage and mode=attention ---------------------------------------------------
def test_leakage_mode_on_a_checkpoint_writes_report_json_and_png(ckpt, tmp_path):
    code, out, _ = run_sample(f"ckpt={ckpt}", "mode=leakage", "seq_len=16", "leakage.influence_len=12",
                              "leakage.probes=2", "leakage.trials=2", "leakage.gen_tokens=6", f"out_dir={tmp_path}")
    assert code == 0
    assert "PASS" in out and "mask removed" in out and "(1) Perturbation" in out
    data = json.loads((tmp_path / "leakage.json").read_text())
    assert data["verdict"] == "PASS" and data["exit_code"] == 0
    assert data["mask_on"]["perturbation"]["max_past_change"] == 0.0
    assert data["mask_on"]["influence"]["max_above_diagonal"] == 0.0
    assert data["mask_on"]["consistency"]["equal"] is True
    assert data["mask_removed"]["perturbation"]["max_past_change"] > 1e-4
    assert data["mask_removed"]["influence"]["zeros_above_diagonal"] == 0
    assert len(data["prompt_ids"]) == 16
    side = heatmap_inches(12)
    assert png_size(tmp_path / "influence.png") == expected(2 * side + 1.5, side + 0.8)


def test_attention_mode_writes_a_png_per_head_and_a_grid(ckpt, tmp_path):
    text = "First Citizen: speak"
    code, out, _ = run_sample(f"ckpt={ckpt}", "mode=attention", f"prompt='{text}'", f"out_dir={tmp_path}")
    assert code == 0 and "exactly zero" in out
    side = heatmap_inches(len(text))
    for layer in (1, 2):
        for head in (1, 2):
            assert png_size(tmp_path / f"layer{layer}_head{head}.png") == expected(side + 1.2, side + 0.6)
    assert png_size(tmp_path / "grid.png") == expected(*grid_inches(2, 2))
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["max_weight_above_diagonal"] == 0.0 and len(data["heads"]) == 4
    assert data["prompt_ids"] and len(data["prompt_ids"]) == len(text)


def test_attention_mode_logs_images_to_wandb_offline(ckpt, tmp_path, monkeypatch):
    import wandb  # noqa: F401  (a core dependency: a broken install fails here)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, _ = run_sample(f"ckpt={ckpt}", "mode=attention", "prompt=Speak", "logger=wandb", f"out_dir={tmp_path}")
    assert code == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert len(media) == 5  # four heads and the grid


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", "device=cpu", "threads=1", "mode=leakage", "model=tiny",
                           "model.n_layer=2", "model.n_embd=32", "model.block_size=24", "leakage.probes=2",
                           "leakage.trials=2", "leakage.gen_tokens=6", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def test_cli_leakage_on_a_random_init_preset_passes(tmp_path):
    p = _cli(f"out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert "PASS" in p.stdout and (tmp_path / "influence.png").is_file()
    assert "exactly 0.0 in" in p.stdout and "mask removed" in p.stdout


def test_leakage_mode_exits_1_for_a_variant_without_the_mask(tmp_path):
    # A user checking their own variant: here the mask is switched off, and the check must say so.
    code, out, _ = run_sample("mode=leakage", "model=tiny", "model.n_layer=2", "model.n_embd=32",
                              "model.block_size=24", "model.causal=false", "leakage.probes=2", "leakage.trials=2",
                              "leakage.gen_tokens=6", f"out_dir={tmp_path}")
    assert code == 1
    assert "LEAK: information from the future" in out
    assert json.loads((tmp_path / "leakage.json").read_text())["verdict"] == "LEAK"


def test_nan_weights_fail_through_the_cli_and_leakage_json_stays_strict_json(ckpt, tmp_path):
    """A checkpoint with a NaN weight: exit 4 (FAIL), and leakage.json holds "nan" strings, which
    any JSON reader accepts, instead of bare NaN tokens."""
    from engine.checkpoint import save_checkpoint
    payload = torch.load(ckpt, weights_only=True)
    name = next(k for k in payload["model"] if k.endswith("c_attn.weight"))
    payload["model"][name][0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", payload)
    code, out, _ = run_sample("mode=leakage", f"ckpt={tmp_path / 'nan.pt'}", "leakage.probes=2", "leakage.trials=2",
                              "leakage.gen_tokens=4", "seq_len=12", f"out_dir={tmp_path / 'out'}")
    assert code == 4 and "FAIL" in out

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    data = json.loads((tmp_path / "out" / "leakage.json").read_text(), parse_constant=refuse)
    assert data["verdict"] == "FAIL" and "\"nan\"" in (tmp_path / "out" / "leakage.json").read_text()

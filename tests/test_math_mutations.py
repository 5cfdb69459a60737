"""Slips in the training math that no other test would catch, each made to fail a test here:

- the non-finite guard decides on the loss too: an infinite loss whose gradients are finite (a
  target the model gives zero probability) must still skip the step, in fp32 and under the fp16
  GradScaler, whose own check looks at the gradients only;
- the warm-up of every schedule starts above zero and reaches the peak lr exactly when it ends.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, snapshot

from engine.config import OptimConfig
from engine.optim import lr_at
from engine.step import train_step  # the step train.py's loop runs (set_up is reached through make_run)


@pytest.mark.parametrize("precision,fused", [("fp32", "true"), ("fp32", "false"), ("fp16", "true")])
def test_an_infinite_loss_with_finite_gradients_is_skipped(make_run, monkeypatch, precision, fused):
    run = make_run(f"precision={precision}", f"optim.fused={fused}")
    train_step(run.state, run.train_model, [s.next_batch() for s in run.streams], 1e-3, 1.0)  # optimizer state
    before = snapshot(run)
    forward = run.model.forward

    def infinite(idx, targets=None):
        logits, loss = forward(idx, targets)
        return logits, loss + float("inf")  # the value is inf; the gradient is the finite one of loss

    monkeypatch.setattr(run.model, "forward", infinite)
    loss, norm, skipped = train_step(run.state, run.train_model, [s.next_batch() for s in run.streams], 1e-3, 1.0)
    assert loss.item() == float("inf") and skipped.item() == 1.0
    if precision == "fp32":
        assert torch.isfinite(norm), "the gradients must be finite here, so only the loss can flag the step"
    assert_same(before, snapshot(run))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_starts_above_zero_and_ends_on_the_peak(schedule):
    cfg = OptimConfig(lr=0.5, min_lr=0.05, warmup_iters=8, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(s, cfg, max_iters=100) for s in range(cfg.warmup_iters + 1)]
    assert 0.0 < lrs[0] < cfg.lr / 2  # step 0 already learns, gently
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))  # rising through the warm-up
    assert lrs[-1] == pytest.approx(cfg.lr, rel=1e-12)  # the first step after it runs at the peak

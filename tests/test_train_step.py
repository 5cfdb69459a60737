"""The optimisation step itself (engine/step.py's train_step, as train.py's loop calls it): a skipped step changes nothing, fp16 overflows
are skipped by the GradScaler, and the step never asks the device for a value (no host sync)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, snapshot, train_step

import engine.step
import train


def nan_loss(run: train.Run, monkeypatch) -> None:
    """From now on the training forward returns a NaN loss (its gradients are NaN too)."""
    forward = run.model.forward

    def poisoned(idx, targets=None):
        logits, loss = forward(idx, targets)
        return logits, loss * float("nan")

    monkeypatch.setattr(run.model, "forward", poisoned)


@pytest.mark.parametrize("fused", ["true", "false"])  # found_inf on the device / one host read
def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(make_run, monkeypatch, fused):
    run = make_run(f"optim.fused={fused}")
    train_step(run)  # a good step first: the optimizer has moments and a count
    before = snapshot(run)
    nan_loss(run, monkeypatch)
    loss, norm, skipped = train_step(run)
    assert not torch.isfinite(loss) and skipped.item() == 1.0
    assert_same(before, snapshot(run))
    assert all(p.grad is None for p in run.model.parameters())  # the bad gradients are gone too


def test_the_guard_would_fail_without_the_skip(make_run, monkeypatch):
    # The same NaN step with the update forced through does change the weights: the test above can fail.
    run = make_run()
    train_step(run)
    before = snapshot(run)
    nan_loss(run, monkeypatch)
    monkeypatch.setattr(engine.step, "step_guarded", lambda opt, scaler, flag, norm: (opt.step(), flag)[1])
    train_step(run)
    with pytest.raises(AssertionError, match="changed"):
        assert_same(before, snapshot(run))


def test_fp16_overflow_changes_no_weight_and_the_scale_backs_off(make_run):
    run = make_run("precision=fp16")
    train_step(run)  # a finite step: the optimizer has its state
    run.state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # the scaled gradients overflow fp32
    scale = run.state.scaler.get_scale()
    before = snapshot(run)
    for _ in range(3):
        loss, norm, skipped = train_step(run)
        assert torch.isfinite(loss) and skipped.item() == 0.0  # an overflow is not a bad loss
    assert_same(before, snapshot(run))
    assert run.state.scaler.get_scale() == scale * 0.5**3  # halved at each overflowing step
    run.state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train_step(run)
    changed = snapshot(run)[0]
    assert any(not torch.equal(changed[k], before[0][k]) for k in changed), "a finite step must update"


def test_fp16_nan_loss_is_skipped_by_the_scaler(make_run, monkeypatch):
    run = make_run("precision=fp16")
    train_step(run)
    before = snapshot(run)
    nan_loss(run, monkeypatch)
    _, _, skipped = train_step(run)
    assert skipped.item() == 1.0
    assert_same(before, snapshot(run))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_step_never_reads_a_value_back_from_the_device(make_run, monkeypatch, precision):
    # On a GPU a read (.item(), .tolist(), bool(t), float(t)) waits for the device; the CUDA check is
    # tests/test_gpu.py's set_sync_debug_mode. Here every read path raises while the step runs.
    run = make_run(f"precision={precision}")
    train_step(run)  # first-step set-up (lazy state) may read freely
    # The loader draws window offsets on the host (CPU generator, NumPy memmap) and only copies the
    # batch to the device: draw it beforehand, so that every read below would be the step's own.
    for loader in run.streams:
        batch = loader.next_batch()
        monkeypatch.setattr(loader, "next_batch", lambda batch=batch: batch)

    def refuse(*args, **kwargs):
        raise AssertionError("the training step read a value back from the device")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss, norm, skipped = train_step(run)
    monkeypatch.undo()
    assert torch.isfinite(loss) and skipped.item() == 0.0


def test_the_read_check_catches_a_read(make_run, monkeypatch):
    # Guards the guard: foreach AdamW has no found_inf input, so the guard reads the flag once a step.
    run = make_run("optim.fused=false")
    train_step(run)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(AssertionError, match="read"):
        train_step(run)

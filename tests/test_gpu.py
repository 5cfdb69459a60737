"""GPU-only checks (marked `gpu`, skipped without CUDA): mixed precision and compiled paths agree
with their references, train.py's optimisation step (engine/step.py's train_step) never waits for the device
(torch.cuda.set_sync_debug_mode("error") around it, the batch loader included), and an fp16 step
forced to overflow is skipped by the GradScaler inside the fused AdamW kernel. CPU tests cover the
same properties in fp32 (tests/test_train_step.py reads no value back, by patching the read paths).
scripts/gpu_suite.py runs these with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, snapshot, train_step

from model import GPT, ModelConfig
from model.generate import generate_tokens

pytestmark = pytest.mark.gpu
VOCAB = 101


def make(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=128)
    return GPT(ModelConfig(**{**base, **kw})).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_explicit_and_sdpa_agree_in_half_precision(dtype):
    explicit, sdpa = make(attn="explicit"), make(attn="sdpa")
    sdpa.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, VOCAB, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        a, _ = explicit(idx)
        b, _ = sdpa(idx)
    assert (a.float() - b.float()).abs().max() < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_causal_mask_holds_in_half_precision(dtype):
    model = make().eval()
    idx = torch.randint(0, VOCAB, (2, 64), device="cuda")
    other = idx.clone()
    other[:, 32:] = torch.randint(0, VOCAB, (2, 32), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        a, _ = model(idx)
        b, _ = model(other)
    assert torch.equal(a[:, :32], b[:, :32])


def test_kv_cache_greedy_tokens_equal_recomputation_in_bf16():
    model = make().eval()
    prompt = torch.randint(0, VOCAB, (1, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cached = torch.cat(list(generate_tokens(model, prompt, 40, temperature=0)), dim=1)
        fresh = torch.cat(list(generate_tokens(model, prompt, 40, temperature=0, use_cache=False)), dim=1)
    assert (cached == fresh).float().mean() > 0.9  # bf16 rounding may flip a near-tie late on


def test_compiled_and_eager_give_the_same_loss():
    model = make()
    idx = torch.randint(0, VOCAB, (4, 64), device="cuda")
    targets = torch.randint(0, VOCAB, (4, 64), device="cuda")
    _, eager = model(idx, targets)
    _, compiled = torch.compile(model)(idx, targets)
    assert abs(eager.item() - compiled.item()) < 1e-4


# ---- train.py's step on CUDA -------------------------------------------------------------------------
@pytest.fixture
def cuda_run(make_run):
    """make(*overrides) -> train.Run: the tiny test recipe set up on CUDA, closed afterwards."""
    return lambda *extra: make_run("device=cuda", "threads=0", *extra)


def test_sync_debug_mode_catches_a_host_read():
    # Guards the test below: in "error" mode a read of a device value raises.
    x = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision, compile", [("bf16", "false"), ("fp16", "false"), ("bf16", "true")])
def test_the_training_step_makes_no_host_sync(cuda_run, precision, compile):
    run = cuda_run(f"precision={precision}", f"compile={compile}")
    for _ in range(2):  # compilation and lazy state (optimizer moments, the scaler's scale) come first
        train_step(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises from here on
    try:
        for _ in range(3):
            loss, norm, skipped = train_step(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(norm) and skipped.item() == 0.0


def test_fp16_step_forced_to_overflow_is_skipped_by_the_grad_scaler(cuda_run):
    run = cuda_run("precision=fp16")
    assert run.state.optimizer.defaults["fused"]  # the skip happens inside the fused kernel (found_inf)
    train_step(run)  # a finite step: the optimizer has its state
    run.state.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**120)  # scaled fp16 gradients overflow
    scale = run.state.scaler.get_scale()
    before = snapshot(run)
    loss, norm, skipped = train_step(run)
    assert torch.isfinite(loss) and not torch.isfinite(norm)  # the loss is fine, the gradients overflowed
    assert skipped.item() == 0.0  # an overflow is the scaler's business, not a bad step
    assert_same(before, snapshot(run))
    assert run.state.scaler.get_scale() == scale * 0.5
    run.state.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    train_step(run)
    after = snapshot(run)[0]
    assert any(not torch.equal(after[k], before[0][k]) for k in after), "a finite step must update"

"""Rules of the math that a plausible one-character slip would break, each held by a small exact test:

- nucleus (top-p) sampling keeps the token whose probability crosses the threshold;
- the loader's random window start can reach the very last window and never runs past it;
- the eval loss is the mean over every token scored, not a mean of per-batch means;
- gradient accumulation over two micro-batches gives the gradient of the two concatenated;
- under fp16 the gradient norm is taken after unscaling (the same norm as in fp32);
- evaluation runs in eval mode (dropout off), and gives the trainer back its mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.config import DataConfig
from data.loader import BatchLoader, val_batches
from data.prepare import prepare
from engine.evaluate import estimate_loss, fixed_batches
from engine.runtime import Runtime
from engine.step import train_step  # the step train.py's loop runs (set_up is reached through make_run)
from model import GPT, ModelConfig
from model.generate import sample_logits

CPU_FP32 = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared directory, as tests/test_data_loader.py makes one: a few hundred val tokens."""
    root = tmp_path_factory.mktemp("rules")
    text = "".join(f"{i:04d} the cat sat on the mat, and the dog ran\n" for i in range(200))
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    return prepare(DataConfig(source="files", path=str(root / "corpus.txt"), cache_dir=str(root / "cache")),
                   progress=False)


def split_tokens(prepared, split: str) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(prepared / f"{split}.bin", dtype=np.uint16).astype(np.int64))


# ---- 1. top-p keeps the token that crosses the threshold -----------------------------------------
LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # (1, V)


@pytest.fixture
def drawn_from(monkeypatch) -> list[torch.Tensor]:
    """The probabilities (B, V) every torch.multinomial call draws from, recorded as it is called."""
    seen: list[torch.Tensor] = []
    multinomial = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.detach().clone())
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


def kept_by(drawn_from: list[torch.Tensor], **sampling) -> torch.Tensor:
    """The distribution (V,) that sample_logits draws its token from for LOGITS."""
    sample_logits(LOGITS, 1.0, generator=torch.Generator().manual_seed(0), **sampling)
    assert len(drawn_from) == 1, "sample_logits no longer draws through torch.multinomial: read its filter another way"
    return drawn_from[0][0]


@pytest.mark.parametrize("top_p,kept", [(0.7, {1, 3}), (0.9, {1, 3, 2})])
def test_top_p_keeps_the_token_that_crosses_the_threshold(drawn_from, top_p, kept):
    # softmax([0, 3, 1, 2]) = (.032, .644, .087, .237): sorted by probability the running mass is
    # .644, .881, .968, 1. top_p=0.7 is crossed by the second token (index 3), which stays in;
    # top_p=0.9 by the third (index 2).
    probs = kept_by(drawn_from, top_p=top_p)
    assert set(torch.nonzero(probs).flatten().tolist()) == kept
    assert probs[0].item() == 0.0
    # The kept tokens keep their relative odds: the softmax over the kept logits only.
    ids = sorted(kept)
    torch.testing.assert_close(probs[ids], LOGITS[0, ids].softmax(-1))


def test_top_k_keeps_the_kth_token(drawn_from):
    probs = kept_by(drawn_from, top_k=2)
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 3}  # index 3, the 2nd largest, stays


# ---- 2. the loader's random start reaches the last window and never runs past it -----------------
def random_batches(prepared, T: int, kind: str):
    """50 batches of 4 random windows: the training loader's, or the fixed eval batches' draws."""
    if kind == "train":
        loader = BatchLoader(prepared, "val", batch_size=4, block_size=T, seed=0)
        return [loader.next_batch() for _ in range(50)]
    return list(val_batches(prepared, "val", 4, T, n_batches=50, seed=0))


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_split_of_t_plus_1_tokens_gives_its_one_window_every_time(prepared, kind):
    data = split_tokens(prepared, "val")
    T = len(data) - 1  # exactly one window of T + 1 tokens fits
    for x, y in random_batches(prepared, T, kind):
        assert x.shape == y.shape == (4, T)
        assert all(torch.equal(row, data[:T]) for row in x)
        assert all(torch.equal(row, data[1 : T + 1]) for row in y)


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_split_of_t_plus_2_tokens_starts_at_0_and_at_1(prepared, kind):
    data = split_tokens(prepared, "val")
    T = len(data) - 2  # two windows fit: starting at 0 and at 1, the last one ending on the last token
    assert not torch.equal(data[:T], data[1 : T + 1])  # the two windows can be told apart
    starts = set()
    for x, y in random_batches(prepared, T, kind):
        for row_x, row_y in zip(x, y, strict=True):
            start = next(s for s in (0, 1) if torch.equal(row_x, data[s : s + T]))
            assert torch.equal(row_y, data[start + 1 : start + T + 1])
            starts.add(start)
    assert starts == {0, 1}


# ---- 3. the eval loss is token-weighted ----------------------------------------------------------
class BatchIndexLoss(nn.Module):
    """A stub model whose loss is 1, 2, 3, ... for its 1st, 2nd, 3rd, ... forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def forward(self, x, y):
        self.losses.append(float(len(self.losses) + 1))
        return None, torch.tensor(self.losses[-1])


def test_eval_loss_is_the_token_weighted_mean_over_unequal_batches(prepared):
    T, B = 8, 5
    batches = fixed_batches(prepared, "val", B, T, -1, CPU_FP32)  # the whole split; the last batch shorter
    sizes = [y.numel() for _, y in batches]
    assert len(batches) >= 2 and sizes[-1] < sizes[0], "the split must end in a smaller batch for this test"
    model = BatchIndexLoss()
    loss = estimate_loss(model, batches, CPU_FP32).loss
    expected = sum(v * n for v, n in zip(model.losses, sizes, strict=True)) / sum(sizes)
    assert loss == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert abs(loss - sum(model.losses) / len(model.losses)) > 1e-3  # the mean of means is another number


# ---- 4. gradient accumulation: two micro-batches = their concatenation ---------------------------
def record_grads_at_step(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """({name: gradient}, hook handles): the model's gradients, copied as the optimizer is about to
    apply them."""
    got: dict[str, torch.Tensor] = {}

    def hook(opt, args, kwargs):
        got.update((name, p.grad.detach().clone()) for name, p in model.named_parameters())

    parts = getattr(optimizer, "parts", None)  # Muon + AdamW: hook both
    return got, [opt.register_step_pre_hook(hook) for opt in (parts.values() if parts else [optimizer])]


def test_two_accumulation_micro_steps_give_the_gradient_of_the_concatenated_batch(make_run):
    run = make_run("model.dropout=0.0", "gradient_accumulation_steps=2")
    reference = copy.deepcopy(run.model)
    (x1, y1), (x2, y2) = (s.next_batch() for s in run.streams)  # (B, T) each
    got, handles = record_grads_at_step(run.model, run.state.optimizer)
    loss, norm, skipped = train_step(run.state, run.train_model, [(x1, y1), (x2, y2)], 1e-3, 0.0)  # no clipping
    for h in handles:
        h.remove()
    _, whole = reference(torch.cat([x1, x2]), torch.cat([y1, y2]))  # (2B, T): the same tokens at once
    whole.backward()
    want = {name: p.grad for name, p in reference.named_parameters()}
    assert skipped.item() == 0.0 and got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=f"{name}'s gradient")
    assert loss.item() == pytest.approx(whole.item(), rel=1e-6)
    assert norm.item() == pytest.approx(torch.linalg.vector_norm(torch.stack([w.norm() for w in want.values()])).item(),
                                        rel=1e-5)


# ---- 5. fp16: the norm (and clipping) sees unscaled gradients ------------------------------------
def test_fp16_and_fp32_gradient_norms_agree(make_run, tmp_path):
    fp32 = make_run("model.dropout=0.0", f"out_dir={tmp_path / 'fp32'}")
    fp16 = make_run("model.dropout=0.0", "precision=fp16", f"out_dir={tmp_path / 'fp16'}")
    assert fp16.state.scaler.is_enabled() and fp16.state.scaler.get_scale() > 1  # the gradients are scaled
    batch = fp32.streams[0].next_batch()
    norms = [train_step(run.state, run.train_model, [batch], 1e-3, 1.0)[1].item() for run in (fp32, fp16)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)


# ---- 6. evaluation runs in eval mode -------------------------------------------------------------
def test_eval_loss_is_the_eval_mode_loss_even_when_called_in_train_mode():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5,
                            norm="pre", pos="learned"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 32, (4, 16), generator=g), torch.randint(0, 32, (4, 16), generator=g))
               for _ in range(2)]
    model.train()
    first, second = estimate_loss(model, batches, CPU_FP32).loss, estimate_loss(model, batches, CPU_FP32).loss
    assert model.training  # given back in the mode it came in
    model.eval()
    with torch.no_grad():
        want = sum(model(x, y)[1].item() for x, y in batches) / len(batches)  # equal batches: plain mean
    assert first == second
    assert first == pytest.approx(want, rel=1e-6)

"""The causal mask, tested two ways for every block/position/attention variant: perturbing future
tokens must not move past logits, and the gradient from past logits to future inputs must be zero.
The same tests with causal=False must fail, which proves they can."""

import itertools

import pytest
import torch

from model import GPT, ModelConfig

VOCAB, T = 37, 12
VARIANTS = list(itertools.product(["post", "pre"], ["learned", "sinusoidal", "rope"], ["explicit", "sdpa"]))


def make(norm="post", pos="learned", attn="sdpa", causal=True, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32, norm=norm, pos=pos,
                      attn=attn, causal=causal, **kw)
    return GPT(cfg).eval()


def future_perturbation_change(model, t):
    """Largest |change| of the logits at positions <= t when every token after t is replaced."""
    g = torch.Generator().manual_seed(t)
    idx = torch.randint(0, VOCAB, (3, T), generator=g)
    other = idx.clone()
    other[:, t + 1:] = torch.randint(0, VOCAB, (3, T - t - 1), generator=g)
    assert not torch.equal(idx[:, t + 1:], other[:, t + 1:])
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(other)
    return (a[:, : t + 1] - b[:, : t + 1]).abs().max().item()


@pytest.mark.parametrize("norm,pos,attn", VARIANTS)
def test_future_tokens_do_not_change_past_logits(norm, pos, attn):
    model = make(norm, pos, attn)
    for t in range(T - 1):
        assert future_perturbation_change(model, t) <= 1e-6, f"leak into position {t}"


@pytest.mark.parametrize("norm,pos,attn", VARIANTS)
def test_without_the_mask_the_perturbation_test_detects_leakage(norm, pos, attn):
    # The same 1e-6 criterion flags every position once the mask is gone (the smallest change seen,
    # with sinusoidal positions at random init, is ~1e-5; with the mask it is exactly 0.0).
    model = make(norm, pos, attn, causal=False)
    for t in range(T - 1):
        assert future_perturbation_change(model, t) > 1e-6, f"no leak detected into position {t}"


def influence(model):
    """d logits[t] / d embeds[s] for all (t, s), as a (T, T) matrix of gradient norms."""
    idx = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    embeds = model.embed(idx).detach().requires_grad_(True)
    per_position = model.trace(embeds=embeds).logits[0].sum(dim=-1)  # (T,)
    # One backward per position t, batched: row t of the identity selects logits[t].
    (grads,) = torch.autograd.grad(per_position, embeds, grad_outputs=torch.eye(T), is_grads_batched=True)
    return grads[:, 0].norm(dim=-1)  # (T, 1, T, C) -> (T, T): [t, s] = ||d logits[t] / d embeds[s]||


@pytest.mark.parametrize("norm,pos,attn", VARIANTS)
def test_gradient_from_past_logits_to_future_embeddings_is_exactly_zero(norm, pos, attn):
    inf = influence(make(norm, pos, attn))
    assert torch.all(inf.triu(diagonal=1) == 0), "a logit depends on a later input"
    assert torch.all(inf.diagonal() > 0), "each position must depend on its own input"
    leaky = influence(make(norm, pos, attn, causal=False))
    above = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    assert leaky[above].min() > 0, "without the mask every later input should reach every logit"

"""Leakage test 1, by perturbation: if the future cannot reach the past, then replacing every token
after position t must leave the logits and every layer's hidden states at positions <= t unchanged.

For each t and each trial, the tokens after t are replaced by random ones, each guaranteed to
differ from the original (so the future really changed), and we record the largest |change| at
positions <= t (must be 0) and at positions > t (must not be 0: evidence that the perturbation
did something, so a 0 in the first column is not a vacuous pass).

Exactness: the original sequence is run with the very same batch shape as the perturbed ones and
compared row by row, so both go through identical kernels in identical order. Any difference at a
past position is therefore information that flowed from the future, not rounding: with the mask
on the result is exactly 0.0 in fp32, not merely small.

Shapes: R rows (one per (t, trial) pair), T time, C channels, V vocab.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model import GPT, Trace

# Elements of activations kept per chunk of rows (~256 MB in fp32): bounds memory for large
# vocabularies and long prompts without slowing small models down.
_CHUNK_ELEMENTS = 1 << 26


@dataclass
class PerturbationResult:
    """Per tested position t (every t with a future, 0 .. T-2), the largest |change| over trials."""
    positions: list[int]
    trials: int
    logits: list[float]  # at positions <= t: must be 0 with the mask
    hidden: list[list[float]]  # [t][layer], at positions <= t
    future_logits: list[float]  # at positions > t: the perturbation's own effect

    @property
    def max_logits(self) -> float:
        return max(self.logits)

    @property
    def max_hidden_per_layer(self) -> list[float]:
        return [max(col) for col in zip(*self.hidden, strict=True)]

    @property
    def max_past(self) -> float:
        """The headline number: the largest change anywhere at or before the perturbed position."""
        return max(self.max_logits, *self.max_hidden_per_layer)

    @property
    def min_future(self) -> float:
        """The smallest effect the perturbation had on later positions (over all t)."""
        return min(self.future_logits)


def perturb_future(idx: torch.Tensor, positions: torch.Tensor, vocab_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Rows of idx (1, T) where, for row r, every token after positions[r] is replaced by a random
    token different from the original. Returns (R, T)."""
    R, T = positions.shape[0], idx.shape[1]
    rows = idx.expand(R, T).clone()  # (R, T)
    future = torch.arange(T, device=idx.device)[None, :] > positions[:, None]  # (R, T)
    # Adding 1..V-1 modulo V changes every future token: no trial can leave one as it was.
    shift = torch.randint(1, vocab_size, (R, T), generator=generator, device="cpu").to(idx.device)
    rows[future] = (rows[future] + shift[future]) % vocab_size
    return rows


@torch.no_grad()
def perturbation_test(model: GPT, idx: torch.Tensor, *, trials: int = 3, seed: int = 0,
                      autocast: contextlib.AbstractContextManager | None = None) -> PerturbationResult:
    """Run the perturbation test on one prompt idx (1, T), T >= 2."""
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 2:
        raise ValueError(f"the perturbation test needs one prompt of at least 2 tokens, got shape {tuple(idx.shape)}")
    if trials < 1:
        raise ValueError(f"leakage.trials must be >= 1, got {trials}")
    model.eval()
    T, V = idx.shape[1], model.config.vocab_size
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(T - 1, device=idx.device).repeat_interleave(trials)  # (R,): t of each row
    per_row = T * (V + cfg.n_embd * cfg.n_layer)
    chunk = max(1, _CHUNK_ELEMENTS // per_row)

    past_logits, future_logits, past_hidden = [], [], []
    base_by_rows: dict[int, Trace] = {}
    for start in range(0, positions.shape[0], chunk):
        pos = positions[start:start + chunk]  # (R,)
        R = pos.shape[0]
        rows = perturb_future(idx, pos, V, generator)  # (R, T)
        with autocast or contextlib.nullcontext():
            if R not in base_by_rows:  # the original, in the same batch shape (see the docstring)
                base_by_rows[R] = model.trace(idx.expand(R, T).contiguous())
            base = base_by_rows[R]
            pert = model.trace(rows)
        past = torch.arange(T, device=idx.device)[None, :] <= pos[:, None]  # (R, T)
        d_logits = (pert.logits.float() - base.logits.float()).abs().amax(dim=-1)  # (R, T)
        past_logits.append(d_logits.masked_fill(~past, 0).amax(dim=1))  # (R,)
        future_logits.append(d_logits.masked_fill(past, float("inf")).amin(dim=1))  # (R,): smallest effect
        layers = [(p.float() - b.float()).abs().amax(dim=-1).masked_fill(~past, 0).amax(dim=1)  # (R,)
                  for p, b in zip(pert.hidden, base.hidden, strict=True)]
        past_hidden.append(torch.stack(layers, dim=1))  # (R, n_layer)

    # Largest change over the trials of each t (smallest, for the future effect).
    p_logits = torch.cat(past_logits).view(T - 1, trials).amax(dim=1)  # (T-1,)
    f_logits = torch.cat(future_logits).view(T - 1, trials).amin(dim=1)  # (T-1,)
    p_hidden = torch.cat(past_hidden).view(T - 1, trials, cfg.n_layer).amax(dim=1)  # (T-1, n_layer)
    return PerturbationResult(list(range(T - 1)), trials, p_logits.tolist(), p_hidden.tolist(), f_logits.tolist())

"""Leakage test 2, by autograd: the influence map I[t, s] = ||d h_t / d x_s||_F, how strongly the
last block's output at position t depends on the input embedding at position s.

With the causal mask, h_t is a function of x_0..x_t only, so every entry above the diagonal
(s > t) is exactly zero: autograd does not even produce a small number there, it produces 0.0.
Without the mask the whole matrix fills in.

Each d h_t / d x_s is a C x C Jacobian. Its Frobenius norm is computed from vector-Jacobian
products: for probe vectors v at position t, one backward pass gives v^T d h_t / d x_s for every s
at once, and ||J||_F^2 = E ||v^T J||^2 for v ~ N(0, I) (Hutchinson), or exactly the sum over the
C basis vectors. Many (t, probe) pairs share one batched backward: row r of the batch is the same
prompt, seeded at its own t with its own v. A zero Jacobian gives exactly 0 with any probe, so the
estimate never blurs the triangle.

Shapes: R rows of the batch, T time, C channels.
"""

from __future__ import annotations

import contextlib

import torch

from model import GPT

# Rows (prompt copies) per backward pass: large enough to amortise the passes on CPU, small enough
# to keep the activations of a tiny or small model well under a gigabyte.
_ROWS_PER_PASS = 128


def influence_matrix(model: GPT, idx: torch.Tensor, *, probes: int | None = 8, seed: int = 0,
                     autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """I[t, s] = ||d h_t / d x_s||_F for the prompt idx (1, T); returns (T, T), float32, on CPU.

    probes: random probe vectors per position (an unbiased estimate of the squared norm), or None
    for the exact value from all C basis vectors (C times the work)."""
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"the influence map takes one prompt of shape (1, T), got {tuple(idx.shape)}")
    if probes is not None and probes < 1:
        raise ValueError(f"leakage.probes must be >= 1 (or null for the exact norm), got {probes}")
    model.eval()
    T, C = idx.shape[1], model.config.n_embd
    device = idx.device
    with torch.no_grad():
        x0 = model.embed(idx)  # (1, T, C)
    n_probes = C if probes is None else probes
    generator = torch.Generator().manual_seed(seed)
    t_of_row = torch.arange(T).repeat_interleave(n_probes)  # (T * n_probes,)
    if probes is None:
        vectors = torch.eye(C).repeat(T, 1)  # (T * C, C): every basis vector at every t
    else:
        vectors = torch.randn(T * n_probes, C, generator=generator)  # (T * probes, C)

    squared = torch.zeros(T, T)  # accumulates sum over probes of ||v^T J_ts||^2
    for start in range(0, t_of_row.shape[0], _ROWS_PER_PASS):
        ts = t_of_row[start:start + _ROWS_PER_PASS]
        R = ts.shape[0]
        x = x0.expand(R, T, C).clone().requires_grad_(True)  # (R, T, C)
        with torch.enable_grad(), autocast or contextlib.nullcontext():
            h = model.trace(embeds=x).hidden[-1]  # (R, T, C)
        seed_grad = torch.zeros(R, T, C, device=device, dtype=h.dtype)
        seed_grad[torch.arange(R), ts.to(device)] = vectors[start:start + R].to(device, h.dtype)
        (grad,) = torch.autograd.grad(h, x, grad_outputs=seed_grad)  # (R, T, C): row r = v_r^T dh_t/dx
        squared.index_add_(0, ts, grad.float().pow(2).sum(dim=-1).cpu())  # (R, T) summed into rows t
    if probes is not None:
        squared /= probes
    return squared.sqrt()

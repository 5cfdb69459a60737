"""MaskedMultiHeadAttention, the heart of the model, and its KV cache.

softmax(Q K^T / sqrt(d_k) + M) V, per head, where the causal mask M is 0 on and below the diagonal
and -inf above it: token t may read tokens s <= t and nothing after it. Two implementations share
the same parameters and give the same numbers: "explicit", the math step by step (the only one that
can return the weights), and "sdpa", torch's fused scaled_dot_product_attention.

With a KV cache, new positions are either appended at `cache.length` (a Python int) and attend over
the valid prefix only (eager generation: the least work per step), or written at a position tensor
and attend over the whole preallocated cache under a length mask: every shape is fixed and no Python
value changes between steps, so torch.compile builds one decode graph and CUDA graphs can replay it.

Shape legend: B batch, T query positions, S key positions (T, or the cache length), C channels,
nh heads, hs head size (C = nh * hs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .linear import Linear
from .positions import apply_rope


class KVCache:
    """One layer's keys and values, (B, nh, max_len, hs) each, allocated once and written in place
    (CUDA graphs need fixed addresses). With RoPE the keys are stored already rotated."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        # Zeros, not empty: the static form reads the unwritten tail (masked out), and a NaN bit
        # pattern there would survive the mask (0 * NaN = NaN).
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # number of valid positions (the appending form)
        self.max_len = max_len

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) after the valid positions; return views of all valid ones (B, nh, S, hs)."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {t} to {self.length}")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions (T,), a tensor; return the whole cache (B, nh, max_len, hs),
        whose unwritten positions (zeros, or an earlier sequence's) the caller masks out (length_mask)."""
        self.k[:, :, positions] = k.to(self.k.dtype)
        self.v[:, :, positions] = v.to(self.v.dtype)
        return self.k, self.v


def causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask, True where attention is allowed: query i sits at absolute position
    s - t + i, and may read key j when j <= s - t + i (on and below the shifted diagonal)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)  # (T, S)


def length_mask(positions: torch.Tensor, max_len: int, causal: bool) -> torch.Tensor:
    """Boolean (T, max_len) mask over a whole cache for queries at positions (T,): key j is allowed when
    j <= the query's position (causal), or else when it is written (j <= the last new position)."""
    k_pos = torch.arange(max_len, device=positions.device)  # (max_len,)
    last = positions.unsqueeze(1) if causal else positions[-1:].unsqueeze(1)  # (T, 1) or (1, 1)
    return (k_pos <= last).expand(positions.shape[0], max_len)  # (T, max_len)


class MaskedMultiHeadAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.impl, self.causal = config.attn, config.causal
        # The query, key and value projections stacked in one matrix: one matmul instead of three.
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # output projection
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *, rope: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), weights (B, nh, T, S) or None). rope: the rotations of x's
        positions (T, hs/2), for pos="rope". cache: x follows the cached positions, appended at
        cache.length, or written at `positions` (T,) with attention over the whole cache."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_size)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)

        mask = None  # (T, S), True where allowed
        if cache is not None and positions is not None:
            k, v = cache.write(k, v, positions)  # (B, nh, max_len, hs)
            mask = length_mask(positions, cache.max_len, self.causal)
        elif cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs)
        # The mask is built only where it is used: one query token appended to the cache may read
        # every key there is, and sdpa over a whole sequence (T == S) applies is_causal itself.
        explicit = self.impl == "explicit" or need_weights
        S = k.shape[2]
        if mask is None and self.causal and T > 1 and (explicit or T != S):
            mask = causal_mask(T, S, x.device)

        if explicit:
            y, weights = self._explicit(q, k, v, mask)
        else:
            y, weights = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and self.causal and T > 1), None
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        y = self.c_proj(y)
        return (self.resid_dropout(y) if self.training else y), weights

    def _explicit(self, q, k, v, mask):
        B, nh, T, hs = q.shape
        S = k.shape[2]
        # M = 0 where allowed and -inf where not, added before the softmax, so exp(-inf) = 0.
        additive = q.new_zeros(1, 1) if mask is None else q.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        # Q K^T / sqrt(hs) + M in one fused multiply-add over all B*nh heads (the fastest form on CPU).
        scores = torch.baddbmm(additive, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                               alpha=1.0 / math.sqrt(hs))  # (B*nh, T, S)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)  # (B*nh, T, S), rows sum to 1
        y = torch.bmm(self.attn_dropout(weights), v.reshape(B * nh, S, hs))  # (B*nh, T, S) @ (B*nh, S, hs)
        return y.view(B, nh, T, hs), weights.view(B, nh, T, S)

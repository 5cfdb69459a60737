"""MaskedMultiHeadAttention, the heart of the model, and its KV cache.

softmax(Q K^T / sqrt(d_k) + M) V, per head, where the causal mask M is 0 on and below the diagonal
and -inf above it: token t may read tokens s <= t and nothing after it. Two implementations share
the same parameters and give the same numbers:
  - "explicit": the math written out step by step; the only one that can return the weights;
  - "sdpa": torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

Shape legend: B batch, T query positions, S key positions (T, or the cache length), C channels,
nh heads, hs head size (C = nh * hs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .positions import apply_rope, rope_table


class KVCache:
    """Keys and values of the positions seen so far, for one layer: (B, nh, block_size, hs) each.
    With RoPE the keys are stored already rotated. When it is full, generate() empties and refills it
    (see model/generate.py)."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # number of valid positions

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs); return all valid keys and values (B, nh, S, hs)."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {t} to {self.length}")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


def causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, S) mask, True where attention is allowed: query i sits at absolute position
    s - t + i, and may read key j when j <= s - t + i (on and below the shifted diagonal)."""
    q_pos = torch.arange(s - t, s, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return k_pos <= q_pos  # (T, S)


class MaskedMultiHeadAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.impl, self.causal, self.pos = config.attn, config.causal, config.pos
        self.rope_theta, self.block_size = config.rope_theta, config.block_size
        # The query, key and value projections stacked in one matrix: one matmul instead of three.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # output projection
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *, start_pos: int = 0, cache: KVCache | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (y (B, T, C), weights (B, nh, T, S) or None).

        start_pos: absolute position of x[:, 0] (used by RoPE and the cache).
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if self.pos == "rope":
            freqs = rope_table(self.block_size, self.head_size, self.rope_theta, x.device)  # (block_size, hs/2)
            freqs = freqs[start_pos:start_pos + T]  # (T, hs/2)
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs)
        S = k.shape[2]

        # The mask is built only where it is used: one query token (a cached decode step) may read
        # every key there is, and sdpa's training path applies is_causal itself.
        explicit = self.impl == "explicit" or need_weights
        mask = causal_mask(T, S, x.device) if self.causal and T > 1 and (explicit or T != S) else None  # (T, S)
        if explicit:
            y, weights = self._explicit(q, k, v, mask)
        else:
            weights = None
            p = self.dropout if self.training else 0.0
            if self.causal and T > 1 and T == S:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # a cached prefill (a shifted diagonal), one decode token, or no mask at all
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), weights

    def _explicit(self, q, k, v, mask):
        B, nh, T, hs = q.shape
        S = k.shape[2]
        # M = 0 where allowed and -inf where not, added before the softmax, so exp(-inf) = 0.
        if mask is None:
            additive = q.new_zeros(1, 1)  # (1, 1): nothing masked
        else:
            additive = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        # Q K^T / sqrt(hs) + M in one fused multiply-add over all B*nh heads (the fastest form on CPU).
        scores = torch.baddbmm(additive, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                               alpha=1.0 / math.sqrt(hs))  # (B*nh, T, S)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)  # (B*nh, T, S), rows sum to 1
        y = torch.bmm(self.attn_dropout(weights), v.reshape(B * nh, S, hs))  # (B*nh, T, S) @ (B*nh, S, hs)
        return y.view(B, nh, T, hs), weights.view(B, nh, T, S)

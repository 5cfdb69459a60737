"""The MLP and the transformer block: attention and MLP, each wrapped in a residual and a LayerNorm.

norm="post" is the block of the source article (and of the original Transformer):
    x = LN1(x + Attn(x));  x = LN2(x + MLP(x))
norm="pre" is GPT-2's, which trains more stably when deep (the model adds a final LN):
    x = x + Attn(LN1(x));  x = x + MLP(LN2(x))

Shapes: B batch, T time, C channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MaskedMultiHeadAttention
from .config import ModelConfig
from .linear import Linear


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))  # (B, T, C)
        return self.dropout(y) if self.training else y  # (dropout is the identity in eval: skip the call)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = MaskedMultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (x (B, T, C), attention weights or None); attn_kwargs go to the attention
        (rope, cache, positions, need_weights)."""
        if self.pre_norm:
            a, weights = self.attn(self.ln_1(x), **attn_kwargs)
            x = x + a
            return x + self.mlp(self.ln_2(x)), weights
        a, weights = self.attn(x, **attn_kwargs)
        x = self.ln_1(x + a)
        return self.ln_2(x + self.mlp(x)), weights

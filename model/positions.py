"""Position information: the fixed sinusoidal table and rotary embeddings (RoPE).

Learned positions are a plain nn.Embedding in gpt.py. The sinusoidal table is the one from
"Attention Is All You Need"; RoPE rotates pairs of query/key channels by an angle proportional to
the position, so attention scores depend only on the distance between two tokens.

Shapes: T time, hs head size, C channels.
"""

from __future__ import annotations

import math

import torch


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(...); returns (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32).unsqueeze(1)  # (n_pos, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


def rope_frequencies(n_pos: int, head_size: int, theta: float, device: torch.device) -> torch.Tensor:
    """The rotations of positions 0..n_pos-1 as unit complex numbers e^(i p w_j), w_j = theta^(-2j/hs);
    (n_pos, hs/2) complex64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    angles = torch.arange(n_pos, device=device, dtype=torch.float32).unsqueeze(1) * inv_freq  # (n_pos, hs/2)
    return torch.polar(torch.ones_like(angles), angles)


_ROPE_TABLES: dict[tuple, torch.Tensor] = {}


def rope_table(n_pos: int, head_size: int, theta: float, device: torch.device) -> torch.Tensor:
    """rope_frequencies, computed once per (size, device) and reused by every layer and step; under
    torch.compile it is recomputed in the graph instead (the compiler folds it)."""
    if torch.compiler.is_compiling():
        return rope_frequencies(n_pos, head_size, theta, device)
    key = (n_pos, head_size, theta, str(device))
    if key not in _ROPE_TABLES:
        with torch.inference_mode(False):  # usable by autograd later, even if first built while sampling
            _ROPE_TABLES[key] = rope_frequencies(n_pos, head_size, theta, device)
    return _ROPE_TABLES[key]


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, nh, T, hs), read as complex numbers x_2i + i x_2i+1,
    by the rotations freqs (T, hs/2): one complex multiply per pair."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, nh, T, hs/2) complex
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)  # (B, nh, T, hs)

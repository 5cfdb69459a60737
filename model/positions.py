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


def rope_angles(positions: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for the given positions; each (T, hs/2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=positions.device,
                                             dtype=torch.float32) / head_size))  # (hs/2,)
    angles = positions.float().unsqueeze(1) * inv_freq  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, nh, T, hs) by the angles in cos/sin (T, hs/2)."""
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, nh, T, hs/2, 2)
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, nh, T, hs/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, nh, T, hs)

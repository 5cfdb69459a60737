"""Attention weights of one prompt, per layer and head, written as labelled heatmap PNGs.

The weights come from the explicit attention path (model.trace(need_weights=True)), which computes
softmax(Q K^T / sqrt(d_k) + M) step by step; with the causal mask every weight above the diagonal
is exactly 0, which `max_above_diagonal` reports next to the pictures.

Shapes: L layers, nh heads, T time.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import GPT

from .plots import plot_attention, plot_attention_grid

log = logging.getLogger(__name__)


@dataclass
class AttentionMaps:
    weights: torch.Tensor  # (L, nh, T, T), float32, CPU
    head_files: dict[tuple[int, int], Path] = field(default_factory=dict)  # (layer, head), 1-based -> PNG
    grid_file: Path | None = None

    @property
    def max_above_diagonal(self) -> float:
        """The largest weight any query gives a later key: 0.0 exactly with the causal mask."""
        T = self.weights.shape[-1]
        upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        return self.weights[..., upper].max().item() if T > 1 else 0.0


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor,
                      autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """Attention weights for the prompt idx (1, T): (L, nh, T, T), float32 on CPU."""
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"attention maps take one prompt of shape (1, T), got {tuple(idx.shape)}")
    model.eval()
    with autocast or contextlib.nullcontext():
        trace = model.trace(idx, need_weights=True)
    return torch.stack([w[0] for w in trace.attentions]).float().cpu()  # L x (nh, T, T) -> (L, nh, T, T)


def write_attention_maps(model: GPT, idx: torch.Tensor, out_dir: str | Path, labels: list[str] | None,
                         autocast: contextlib.AbstractContextManager | None = None) -> AttentionMaps:
    """One PNG per layer and head (layer{L}_head{H}.png) and one grid of all heads (grid.png)."""
    out_dir = Path(out_dir)
    maps = AttentionMaps(attention_weights(model, idx, autocast))
    n_layer, n_head = maps.weights.shape[:2]
    mask = "causal mask" if model.config.causal else "NO causal mask"
    for layer in range(n_layer):
        for head in range(n_head):
            title = f"layer {layer + 1}, head {head + 1} ({mask})"
            path = out_dir / f"layer{layer + 1}_head{head + 1}.png"
            maps.head_files[(layer + 1, head + 1)] = plot_attention(maps.weights[layer, head], path, labels, title)
    maps.grid_file = plot_attention_grid(
        maps.weights, out_dir / "grid.png",
        f"attention weights: {n_layer} layers x {n_head} heads, {idx.shape[1]} tokens\n({mask}; white = exactly 0)")
    log.info("wrote %d attention heatmaps and grid.png to %s", n_layer * n_head, out_dir)
    return maps

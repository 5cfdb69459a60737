"""Heatmap PNGs: the influence maps (mask on and off, side by side) and attention weights.

Figures are drawn on matplotlib's Agg canvas directly (matplotlib.figure.Figure, no pyplot), so
nothing depends on a display or on global pyplot state. Exact zeros are drawn in white and called
out in the title: the claim is that they are exactly zero, not merely dark.

Each image's size in pixels is figsize x DPI, fixed by `heatmap_inches`, so tests can check it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

DPI = 100
MAX_TICKS = 32  # at most this many token labels per axis; longer prompts label every k-th token


def heatmap_inches(n: int) -> float:
    """Side of one heatmap panel in inches for an n x n matrix: room for n labels, within bounds."""
    return float(min(16.0, max(5.0, 0.22 * min(n, MAX_TICKS) + 2.0)))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays figsize x DPI
    return path


def _label_axes(ax, labels: list[str] | None, n: int, xlabel: str, ylabel: str) -> None:
    step = max(1, math.ceil(n / MAX_TICKS))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if labels is None:
        ax.set_xticklabels([str(i) for i in ticks], fontsize=7)
        ax.set_yticklabels([str(i) for i in ticks], fontsize=7)
    else:
        shown = [labels[i].replace("$", r"\$") for i in ticks]  # a pair of $ would start matplotlib's mathtext
        ax.set_xticklabels(shown, rotation=90, fontsize=7)
        ax.set_yticklabels([f"{text} {i}" for text, i in zip(shown, ticks, strict=True)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _masked_zeros(m: torch.Tensor) -> np.ma.MaskedArray:
    a = m.detach().float().cpu().numpy()
    return np.ma.masked_where(a == 0.0, a)


def plot_influence(masked: torch.Tensor, unmasked: torch.Tensor, path: str | Path,
                   labels: list[str] | None = None) -> Path:
    """The two influence maps (T, T) side by side on one log colour scale; exact zeros white."""
    n = masked.shape[0]
    side = heatmap_inches(n)
    fig = Figure(figsize=(2 * side + 1.5, side + 0.8), layout="constrained")
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    # The colour scale spans the off-diagonal entries: the diagonal (the residual path from x_t to
    # h_t) is often 100x larger and would leave everything else one dark colour; it saturates instead.
    off = ~torch.eye(n, dtype=torch.bool)
    positive = torch.cat([m[off & (m > 0)] for m in (masked, unmasked)])
    if positive.numel() == 0:  # a 1-token map, or a model whose positions never interact
        positive = torch.cat([masked[masked > 0], unmasked[unmasked > 0], torch.ones(1)])
    norm = LogNorm(vmin=max(positive.min().item(), 1e-12), vmax=max(positive.max().item(), 1e-12) * 1.0001)
    axes = fig.subplots(1, 2)
    for ax, m, name in ((axes[0], masked, "mask on"), (axes[1], unmasked, "mask removed (causal=False)")):
        zeros = int((m[upper] == 0).sum())
        image = ax.imshow(_masked_zeros(m), norm=norm, cmap="viridis", interpolation="nearest")
        ax.set_facecolor("white")  # masked (exactly zero) cells show the background
        ax.set_title(f"{name}\nabove the diagonal: {zeros}/{int(upper.sum())} exactly 0 (white)", fontsize=10)
        _label_axes(ax, labels, n, "input position s", "output position t")
    fig.colorbar(image, ax=axes, label="||d h_t / d x_s||  (log scale; the diagonal saturates)", shrink=0.8,
                 extend="max")
    fig.suptitle("Influence of input s on the last block's output at t", fontsize=12)
    return _save(fig, Path(path))


def plot_attention(weights: torch.Tensor, path: str | Path, labels: list[str] | None, title: str) -> Path:
    """One head's attention weights (T, T): row t is the query, column s the key; exact zeros white."""
    n = weights.shape[0]
    side = heatmap_inches(n)
    fig = Figure(figsize=(side + 1.2, side + 0.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(_masked_zeros(weights), cmap="viridis", vmin=0.0, vmax=float(weights.max()),
                      interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_title(title, fontsize=10)
    _label_axes(ax, labels, n, "key (attended-to token)", "query (attending token)")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    return _save(fig, Path(path))


def grid_inches(n_layer: int, n_head: int) -> tuple[float, float]:
    """(width, height) of the grid of all heads: 1.6 in per panel, 5 to 24 in wide, room for a title."""
    panel = min(1.6, 24.0 / n_head)
    return max(5.0, n_head * panel + 0.5), n_layer * panel + 1.0


def plot_attention_grid(weights: torch.Tensor, path: str | Path, title: str) -> Path:
    """All heads of all layers, weights (n_layer, nh, T, T), one small panel each."""
    n_layer, n_head = weights.shape[:2]
    fig = Figure(figsize=grid_inches(n_layer, n_head), layout="constrained")
    axes = np.asarray(fig.subplots(n_layer, n_head, squeeze=False))
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            ax.imshow(_masked_zeros(weights[layer, head]), cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_facecolor("white")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head + 1}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, Path(path))

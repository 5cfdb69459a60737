"""Attention weights of one prompt, per layer and head, written as labelled heatmap PNGs.

The weights come from the explicit attention path (model.trace(need_weights=True)), softmax(Q K^T /
sqrt(d_k) + M) step by step: the fused path (attn=sdpa) returns none, so an sdpa model's parameters go
through the explicit path and the largest logit difference between the two paths is reported. With
the causal mask every weight above the diagonal is exactly 0 by construction (M is -inf there): the
pictures show that the mask is applied, not that nothing leaks, which mode=leakage tests.

Shapes: L layers, nh heads, T time, V vocab.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT

from .leakage_tests import above_diagonal
from .report import fmt, plot_attention, plot_attention_grid

log = logging.getLogger(__name__)

WEIGHTS_PATH = "explicit"  # the only attention path that can return its weights


@dataclass
class AttentionMaps:
    weights: torch.Tensor  # (L, nh, T, T), float32, CPU
    causal: bool  # the model's mask setting
    configured_attn: str  # the attention path the model runs
    logits_diff: float | None  # max |logits| difference, explicit path vs the configured one (None: the same)
    head_files: dict[tuple[int, int], Path] = field(default_factory=dict)  # (layer, head), 1-based -> PNG
    grid_file: Path | None = None

    @property
    def max_above_diagonal(self) -> float:
        """The largest weight any query gives a later key: 0.0 exactly with the causal mask."""
        upper = above_diagonal(self.weights)
        return upper.max().item() if upper.numel() else 0.0

    @property
    def broken_mask(self) -> bool:
        """A causal model that gives weight to a later token."""
        return self.causal and self.max_above_diagonal != 0

    def path_line(self) -> str:
        if self.configured_attn == WEIGHTS_PATH:
            return f"weights from attn={WEIGHTS_PATH}, the path this model runs"
        return (f"weights from attn={WEIGHTS_PATH} (the formula step by step): this model runs "
                f"attn={self.configured_attn}, whose fused kernel returns no weights; same parameters, and the "
                f"two paths' logits for this prompt differ by at most {fmt(self.logits_diff or 0.0)}")

    def zero_line(self) -> str:
        head = f"largest weight any token gives a later token: {fmt(self.max_above_diagonal)}"
        if not self.causal:
            return f"{head} (causal=False: no mask)"
        if self.broken_mask:
            return f"{head}: a causal model attends to the future, the mask is not applied"
        return (f"{head}, exactly zero by construction: the causal mask sets those scores to -inf before the "
                "softmax, and exp(-inf) = 0. This shows the mask is applied, not that nothing leaks: "
                "mode=leakage tests that")

    def summary(self) -> dict[str, Any]:
        return {"max_weight_above_diagonal": self.max_above_diagonal, "causal": self.causal,
                "zero_above_diagonal_by_construction": self.causal and self.max_above_diagonal == 0,
                "weights_path": WEIGHTS_PATH, "configured_attn": self.configured_attn,
                "logits_max_diff_vs_configured": self.logits_diff, "grid": str(self.grid_file),
                "heads": {f"layer{layer}_head{head}": str(p) for (layer, head), p in self.head_files.items()}}


@torch.no_grad()
def write_attention_maps(model: GPT, idx: torch.Tensor, out_dir: str | Path, labels: list[str] | None,
                         autocast: contextlib.AbstractContextManager | None = None) -> AttentionMaps:
    """The attention weights for the prompt idx (1, T), drawn as one PNG per layer and head
    (layer{L}_head{H}.png) and one grid of all heads (grid.png)."""
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"attention maps take one prompt of shape (1, T), got {tuple(idx.shape)}")
    model.eval()
    with autocast or contextlib.nullcontext():
        trace = model.trace(idx, need_weights=True)
        configured = None if model.config.attn == WEIGHTS_PATH else model(idx)[0]  # (1, T, V)
    weights = torch.stack([w[0] for w in trace.attentions]).float().cpu()  # L x (nh, T, T) -> (L, nh, T, T)
    diff = None if configured is None else (trace.logits.float() - configured.float()).abs().max().item()
    maps = AttentionMaps(weights, model.config.causal, model.config.attn, diff)

    out_dir, (n_layer, n_head) = Path(out_dir), weights.shape[:2]
    mask = "causal mask" if maps.causal else "NO causal mask"
    for layer in range(1, n_layer + 1):
        for head in range(1, n_head + 1):
            maps.head_files[layer, head] = plot_attention(weights[layer - 1, head - 1],
                                                          out_dir / f"layer{layer}_head{head}.png", labels,
                                                          f"layer {layer}, head {head} ({mask})")
    zeros = "white = exactly 0 by construction" if maps.causal else "white = exactly 0"
    maps.grid_file = plot_attention_grid(
        weights, out_dir / "grid.png",
        f"attention weights: {n_layer} layers x {n_head} heads, {idx.shape[1]} tokens\n({mask}; {zeros})")
    log.info("wrote %d attention heatmaps and grid.png to %s", n_layer * n_head, out_dir)
    return maps

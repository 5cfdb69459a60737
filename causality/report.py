"""What a leakage check and the attention maps show a reader: the printed report, the JSON summaries,
and the heatmap PNGs (influence maps; attention weights per layer and head).

The report is written for someone who doubts the claim: every "0.0" sits next to the number the same
test gives without the mask, and next to evidence that the perturbation did change the future; a NaN
prints as nan, never as a zero. The attention weights come from the explicit path, the only one that
returns them; their zeros above the diagonal hold by construction (the mask puts -inf there before the
softmax), so they show that the mask is applied, not that nothing leaks, which mode=leakage tests.
Figures are matplotlib Figures without pyplot (no display, no global state), exact zeros white (they
are exactly zero, not merely dark), and each image's size in pixels is figsize x DPI (`heatmap_inches`,
`grid_inches`), so tests can check it.

Shapes: L layers, nh heads, T time, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from model import GPT

from .leakage import LeakageReport, ModelChecks, PerturbationResult
from .leakage_tests import above_diagonal, count_nonfinite, largest_above_diagonal, nan_or


def fmt(x: float) -> str:
    """Exact zeros print as 0.0 (they are exact, not rounded); anything else, nan and inf too, as %.1e."""
    return "0.0" if x == 0 else f"{x:.1e}"


def _rows(n: int, shown: int = 8) -> list[int]:
    """About `shown` positions spread over 0..n-1, the first and the last included (all of them for n <= shown)."""
    return sorted({round(i * (n - 1) / (shown - 1)) for i in range(shown)})


def _perturbation_table(r: LeakageReport) -> list[str]:
    on, off = r.masked.perturbation, r.unmasked.perturbation
    lines = [
        f"(1) Perturbation: for each position t, every token after t is replaced by random tokens "
        f"({len(on.positions)} positions x {on.trials} trials);",
        "    the largest |change| at positions <= t must be exactly 0.0 with the mask.",
        "",
        f"         | {f'{r.masked.label} (attn={r.attn})':<33}| mask removed (causal=False)",
        "       t | logits<=t  hidden<=t  logits>t* | logits<=t  hidden<=t",
    ]
    for i in _rows(len(on.positions)):
        lines.append(f"    {on.positions[i]:>4} | {fmt(on.logits[i]):>9}  {fmt(nan_or(max, on.hidden[i])):>9}  "
                     f"{fmt(on.future_logits[i]):>9} | {fmt(off.logits[i]):>9}  {fmt(nan_or(max, off.hidden[i])):>9}")
    lines += [f"   all t | {fmt(on.max_logits):>9}  {fmt(nan_or(max, on.max_hidden_per_layer)):>9}  "
              f"{fmt(on.min_future):>9} | {fmt(off.max_logits):>9}  {fmt(nan_or(max, off.max_hidden_per_layer)):>9}",
              "    * the smallest change at positions after t: evidence the perturbation reached the model",
              "    hidden states by layer (max over t):"]
    for label, res in (("mask on", on), ("mask removed", off)):
        lines.append(f"      {label:<13}" + "  ".join(f"h{k + 1} {fmt(v)}" for k, v in enumerate(res.max_hidden_per_layer)))
    if (impl := r.masked.other_impl) is not None:
        lines.append(f"    same weights through attn={impl[0]}: largest change at positions <= t {fmt(impl[1].max_past)}")
    return lines


def _influence_lines(r: LeakageReport) -> list[str]:
    probes = r.settings.probes
    how = "exact" if probes is None else f"{probes} random probes per position"
    lines = [f"(2) Influence ||d h_t / d x_s|| from autograd over the first {r.masked.influence.shape[0]} positions "
             f"({how});", "    the entries above the diagonal (s > t) are the future's influence on the past:"]
    for checks in (r.masked, r.unmasked):
        upper = above_diagonal(checks.influence)
        lines.append(f"      {checks.label:<13} max {fmt(checks.max_influence_above_diagonal):>7}, exactly 0.0 in "
                     f"{int((upper == 0).sum())}/{upper.numel()} (for scale: median on the diagonal "
                     f"{fmt(checks.influence.diagonal().median().item())})")
    return lines


def _consistency_lines(r: LeakageReport) -> list[str]:
    c = r.masked.consistency
    lines = [f"(3) Greedy generation of {len(c.cached)} tokens after a {c.prompt_len}-token prompt, "
             "KV cache vs recomputing everything, in float32 whatever the precision:"]
    for checks in (r.masked, r.unmasked):
        c = checks.consistency
        if c.equal:
            tokens = f"tokens equal ({len(c.cached)}/{len(c.cached)})"
        else:
            differ = sum(a != b for a, b in zip(c.cached, c.recomputed, strict=True))
            tokens = f"tokens differ from step {c.first_mismatch} ({differ}/{len(c.cached)} differ)"
            if c.near_tie:
                tokens += (f", at a near-tie (the two tokens' logits {fmt(c.flip_gap)} apart, the paths' "
                           f"logits within {fmt(c.flip_logit_diff)}; tie_margin {fmt(c.tie_margin)}): "
                           "rounding, not leakage")
        agree = "within" if c.logits_agree else "MORE than"
        lines.append(f"      {checks.label:<13} {tokens}; next-token logits differ by at most {fmt(c.max_logit_diff)}, "
                     f"{agree} float32 rounding ({fmt(c.logit_tolerance)})")
    lines.append("    (with the mask the logits differ only by float rounding: one token at a time and a whole "
                 "sequence run through kernels of different shapes; float32, because bf16/fp16 rounding "
                 f"flips near-tied tokens; rounding allowed: {r.settings.logit_eps:g} x eps x sqrt(n_embd) x "
                 "max(1, max |logit|))")
    return lines


def format_report(r: LeakageReport, header: str, dtype: torch.dtype = torch.float32) -> str:
    """The printed report: the three tests side by side with the control, then the verdict."""
    sections = [[header], _perturbation_table(r), _influence_lines(r), _consistency_lines(r), [verdict_line(r, dtype)]]
    return "\n\n".join("\n".join(lines) for lines in sections)


def verdict_line(r: LeakageReport, dtype: torch.dtype = torch.float32) -> str:
    """PASS / LEAK / INCONCLUSIVE / FAIL, with the numbers that justify it. dtype: the precision the
    forward passes ran in, whose resolution puts the mask-off numbers in scale."""
    c = r.masked.consistency
    match r.verdict:
        case "PASS":
            reach = min(p.min_future for _, p in r.masked.perturbations)
            return (f"PASS: with the mask nothing reaches the past from the future (largest change 0.0"
                    f"{'' if r.settings.tolerance == 0 else f', tolerance {fmt(r.settings.tolerance)}'}), "
                    f"while the perturbation changed every later position (by at least {fmt(reach)}) and the "
                    f"cached and recomputed logits agree within float32 rounding ({fmt(c.max_logit_diff)} <= "
                    f"{fmt(c.logit_tolerance)}); the same tests on the same weights without the mask find changes "
                    f"up to {fmt(r.unmasked.perturbation.max_past)} ({str(dtype).removeprefix('torch.')} "
                    f"resolution {fmt(torch.finfo(dtype).eps)}).")
        case "FAIL":
            also = f" (also found: {'; '.join(r.leaks)})" if r.leaks else ""
            return ("FAIL: non-finite values (NaN or inf) in the leakage tests, which compare as False with any "
                    "tolerance, so these tests show neither a leak nor its absence: " + "; ".join(r.failures)
                    + also + ". A causal mask that leaves a query nothing to attend to (say, one that hides each "
                    "token from itself) gives NaN; so do NaN weights.")
        case "LEAK":
            return "LEAK: information from the future reaches earlier positions: " + "; ".join(r.leaks)
        case _:
            return ("INCONCLUSIVE: no leakage with the mask, but " + "; ".join(r.inconclusive)
                    + "; use a longer prompt (seq_len) or more trials (leakage.trials)")


def _perturbation_summary(p: PerturbationResult) -> dict[str, Any]:
    return {"max_past_change": p.max_past, "max_logits_change": p.max_logits, "nonfinite_logits": p.nonfinite_logits,
            "nonfinite_hidden": p.nonfinite_hidden, "max_hidden_change_per_layer": p.max_hidden_per_layer,
            "min_future_logits_change": p.min_future, "positions": p.positions, "logits_change": p.logits,
            "hidden_change": p.hidden, "future_logits_change": p.future_logits, "trials": p.trials}


def _checks_summary(c: ModelChecks) -> dict[str, Any]:
    upper = above_diagonal(c.influence)
    out: dict[str, Any] = {
        "label": c.label,
        "perturbation": _perturbation_summary(c.perturbation),
        "influence": {"max_above_diagonal": c.max_influence_above_diagonal,
                      "zeros_above_diagonal": int((upper == 0).sum()), "entries_above_diagonal": upper.numel(),
                      "nonfinite_entries": count_nonfinite(c.influence), "matrix": c.influence.tolist()},
        "consistency": {**dataclasses.asdict(c.consistency), "precision": "fp32",
                        **{k: getattr(c.consistency, k) for k in ("equal", "first_mismatch", "near_tie", "logits_agree")}},
        "nonfinite": c.nonfinite,
    }
    if c.other_impl is not None:
        out["other_attention_impl"] = {"attn": c.other_impl[0], **_perturbation_summary(c.other_impl[1])}
    return out


def summary(r: LeakageReport, **extra: Any) -> dict[str, Any]:
    """Everything the report shows, and the per-position numbers behind it, as plain JSON data."""
    return {"verdict": r.verdict, "exit_code": r.exit_code, "failures": r.failures, "leaks": r.leaks,
            "inconclusive": r.inconclusive, "control_ok": r.control_ok, "nonfinite_weights": r.nonfinite_weights,
            "prompt_len": r.prompt_len, "configured_causal": r.configured_causal,
            "settings": {**dataclasses.asdict(r.settings), "seed": r.seed}, **extra,
            "mask_on": _checks_summary(r.masked), "mask_removed": _checks_summary(r.unmasked)}


# ---- heatmaps -------------------------------------------------------------------------------------
DPI = 100
MAX_TICKS = 32  # at most this many token labels per axis; longer prompts label every k-th token


def heatmap_inches(n: int) -> float:
    """Side of one heatmap panel in inches for an n x n matrix: room for n labels, within bounds."""
    return min(16.0, max(5.0, 0.22 * min(n, MAX_TICKS) + 2.0))


def grid_inches(n_layer: int, n_head: int) -> tuple[float, float]:
    """(width, height) of the grid of all heads: 1.6 in per panel, 5 to 24 in wide, room for a title."""
    panel = min(1.6, 24.0 / n_head)
    return max(5.0, n_head * panel + 0.5), n_layer * panel + 1.0


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays figsize x DPI
    return path


def _label_axes(ax, labels: list[str], n: int, xlabel: str, ylabel: str) -> None:
    """Ticks at most every MAX_TICKS-th position: the token (and its position, on y)."""
    ticks = list(range(0, n, max(1, math.ceil(n / MAX_TICKS))))
    shown = [labels[i].replace("$", r"\$") for i in ticks]  # a pair of $ would start matplotlib's mathtext
    ax.set_xticks(ticks, shown, rotation=90)
    ax.set_yticks(ticks, [f"{text} {i}" for text, i in zip(shown, ticks, strict=True)])
    ax.tick_params(labelsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel)


def _show(ax, m: torch.Tensor, **kw):
    """imshow with the exact zeros masked out, so that they show the white background."""
    a = m.detach().float().cpu().numpy()
    ax.set_facecolor("white")
    return ax.imshow(np.ma.masked_where(a == 0.0, a), cmap="viridis", interpolation="nearest", **kw)


def plot_influence(masked: torch.Tensor, unmasked: torch.Tensor, path: str | Path, labels: list[str]) -> Path:
    """The two influence maps (T, T) side by side on one log colour scale; exact zeros white."""
    n = masked.shape[0]
    side = heatmap_inches(n)
    fig = Figure(figsize=(2 * side + 1.5, side + 0.8), layout="constrained")
    # The colour scale spans the off-diagonal entries: the diagonal (the residual path from x_t to
    # h_t) is often 100x larger and would leave everything else one dark colour; it saturates instead.
    off = ~torch.eye(n, dtype=torch.bool)
    positive = torch.cat([m[off & (m > 0)] for m in (masked, unmasked)])
    if positive.numel() == 0:  # a 1-token map, or a model whose positions never interact
        positive = torch.cat([masked[masked > 0], unmasked[unmasked > 0], torch.ones(1)])
    norm = LogNorm(vmin=max(positive.min().item(), 1e-12), vmax=max(positive.max().item(), 1e-12) * 1.0001)
    axes = fig.subplots(1, 2)
    for ax, m, name in ((axes[0], masked, "mask on"), (axes[1], unmasked, "mask removed (causal=False)")):
        upper = above_diagonal(m)
        image = _show(ax, m, norm=norm)
        ax.set_title(f"{name}\nabove the diagonal: {int((upper == 0).sum())}/{upper.numel()} exactly 0 (white)",
                     fontsize=10)
        _label_axes(ax, labels, n, "input position s", "output position t")
    fig.colorbar(image, ax=axes, label="||d h_t / d x_s||  (log scale; the diagonal saturates)", shrink=0.8,
                 extend="max")
    fig.suptitle("Influence of input s on the last block's output at t", fontsize=12)
    return _save(fig, path)


def plot_attention(weights: torch.Tensor, path: str | Path, labels: list[str], title: str) -> Path:
    """One head's attention weights (T, T): row t is the query, column s the key; exact zeros white."""
    n = weights.shape[0]
    side = heatmap_inches(n)
    fig = Figure(figsize=(side + 1.2, side + 0.6), layout="constrained")
    ax = fig.subplots()
    image = _show(ax, weights, vmin=0.0, vmax=float(weights.max()))
    ax.set_title(title, fontsize=10)
    _label_axes(ax, labels, n, "key (attended-to token)", "query (attending token)")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    return _save(fig, path)


def plot_attention_grid(weights: torch.Tensor, path: str | Path, title: str) -> Path:
    """All heads of all layers, weights (n_layer, nh, T, T), one small panel each."""
    n_layer, n_head = weights.shape[:2]
    fig = Figure(figsize=grid_inches(n_layer, n_head), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for (layer, head), ax in np.ndenumerate(axes):
        _show(ax, weights[layer, head], vmin=0.0)
        ax.set(xticks=[], yticks=[])
        if layer == 0:
            ax.set_title(f"head {head + 1}", fontsize=8)
        if head == 0:
            ax.set_ylabel(f"layer {layer + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ---- attention maps ------------------------------------------------------------------------------
WEIGHTS_PATH = "explicit"  # the only attention path that can return its weights


@dataclass
class AttentionMaps:
    weights: torch.Tensor  # (L, nh, T, T), float32, CPU
    causal: bool  # the model's mask setting
    configured_attn: str  # the attention path the model runs
    logits_diff: float | None  # max |logits| difference, explicit path vs the configured one (None: the same)
    head_files: dict[str, Path] = field(default_factory=dict)  # "layer{L}_head{H}", 1-based -> PNG
    grid_file: Path | None = None

    @property
    def max_above_diagonal(self) -> float:
        """The largest weight any query gives a later key: 0.0 exactly with the causal mask."""
        return largest_above_diagonal(self.weights)

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
                "heads": {name: str(p) for name, p in self.head_files.items()}}


@torch.no_grad()
def write_attention_maps(model: GPT, idx: torch.Tensor, out_dir: str | Path, labels: list[str],
                         autocast: contextlib.AbstractContextManager | None = None) -> AttentionMaps:
    """The attention weights for the prompt idx (1, T), drawn as one PNG per layer and head
    (layer{L}_head{H}.png) and one grid of all heads (grid.png)."""
    model.eval()
    with autocast or contextlib.nullcontext():
        trace = model.trace(idx, need_weights=True)
        configured = None if model.config.attn == WEIGHTS_PATH else model(idx)[0]  # (1, T, V)
    weights = torch.stack([w[0] for w in trace.attentions]).float().cpu()  # L x (nh, T, T) -> (L, nh, T, T)
    diff = None if configured is None else (trace.logits.float() - configured.float()).abs().max().item()
    maps = AttentionMaps(weights, model.config.causal, model.config.attn, diff)

    out_dir, (n_layer, n_head) = Path(out_dir), weights.shape[:2]
    mask = "causal mask" if maps.causal else "NO causal mask"
    for layer, head in itertools.product(range(n_layer), range(n_head)):
        name = f"layer{layer + 1}_head{head + 1}"
        maps.head_files[name] = plot_attention(weights[layer, head], out_dir / f"{name}.png", labels,
                                               f"layer {layer + 1}, head {head + 1} ({mask})")
    zeros = "white = exactly 0 by construction" if maps.causal else "white = exactly 0"
    maps.grid_file = plot_attention_grid(
        weights, out_dir / "grid.png",
        f"attention weights: {n_layer} layers x {n_head} heads, {idx.shape[1]} tokens\n({mask}; {zeros})")
    return maps

"""The printed report and the JSON summary of a leakage check (causality/leakage.py).

The report is meant to be read by someone who doubts the claim: every "0.0" sits next to the
number the same test gives without the mask, and next to evidence that the perturbation did
change the future, so that a zero cannot be a test that measures nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .leakage import LeakageReport, ModelChecks


def fmt(x: float) -> str:
    """Exact zeros print as 0.0 (they are exact, not rounded); anything else in scientific notation."""
    return "0.0" if x == 0 else f"{x:.1e}"


def _rows(n: int, shown: int = 8) -> list[int]:
    """About `shown` positions spread over 0..n-1, always including the first and the last."""
    if n <= shown:
        return list(range(n))
    return sorted({round(i * (n - 1) / (shown - 1)) for i in range(shown)})


def _perturbation_table(r: LeakageReport) -> list[str]:
    on, off = r.masked.perturbation, r.unmasked.perturbation
    impl = r.masked.other_impl
    lines = [
        f"(1) Perturbation: for each position t, every token after t is replaced by random tokens "
        f"({len(on.positions)} positions x {on.trials} trials);",
        "    the largest |change| at positions <= t must be exactly 0.0 with the mask.",
        "",
        f"         | {f'{r.masked.label} (attn={r.attn})':<33}| mask removed (causal=False)",
        "       t | logits<=t  hidden<=t  logits>t* | logits<=t  hidden<=t",
    ]
    for i in _rows(len(on.positions)):
        lines.append(f"    {on.positions[i]:>4} | {fmt(on.logits[i]):>9}  {fmt(max(on.hidden[i])):>9}  "
                     f"{fmt(on.future_logits[i]):>9} | {fmt(off.logits[i]):>9}  {fmt(max(off.hidden[i])):>9}")
    lines.append(f"   all t | {fmt(on.max_logits):>9}  {fmt(max(on.max_hidden_per_layer)):>9}  "
                 f"{fmt(on.min_future):>9} | {fmt(off.max_logits):>9}  {fmt(max(off.max_hidden_per_layer)):>9}")
    lines.append("    * the smallest change at positions after t: evidence the perturbation reached the model")
    lines.append("    hidden states by layer (max over t):")
    for label, res in (("mask on", on), ("mask removed", off)):
        cells = "  ".join(f"h{k + 1} {fmt(v)}" for k, v in enumerate(res.max_hidden_per_layer))
        lines.append(f"      {label:<13}{cells}")
    if impl is not None:
        lines.append(f"    same weights through attn={impl[0]}: largest change at positions <= t {fmt(impl[1].max_past)}")
    return lines


def _influence_lines(r: LeakageReport) -> list[str]:
    n = r.masked.influence.shape[0]
    probes = r.settings.probes
    how = "exact" if probes is None else f"{probes} random probes per position"
    lines = [f"(2) Influence ||d h_t / d x_s|| from autograd over the first {n} positions ({how});",
             "    the entries above the diagonal (s > t) are the future's influence on the past:"]
    for checks in (r.masked, r.unmasked):
        upper = checks.influence_above_diagonal
        zeros = int((upper == 0).sum())
        diag = checks.influence.diagonal().median().item()
        lines.append(f"      {checks.label:<13} max {fmt(upper.max().item()):>7}, exactly 0.0 in {zeros}/{upper.numel()} "
                     f"(for scale: median on the diagonal {fmt(diag)})")
    return lines


def _consistency_lines(r: LeakageReport) -> list[str]:
    c = r.masked.consistency
    lines = [f"(3) Greedy generation of {len(c.cached)} tokens after a {c.prompt_len}-token prompt, "
             "KV cache vs recomputing everything:"]
    for checks in (r.masked, r.unmasked):
        c = checks.consistency
        if c.equal:
            tokens = f"tokens equal ({len(c.cached)}/{len(c.cached)})"
        else:
            differ = sum(a != b for a, b in zip(c.cached, c.recomputed, strict=True))
            tokens = f"tokens differ from step {c.first_mismatch} ({differ}/{len(c.cached)} differ)"
        lines.append(f"      {checks.label:<13} {tokens}; next-token logits differ by at most {fmt(c.max_logit_diff)}")
    lines.append("    (with the mask the logits differ only by float rounding: one token at a time and a whole "
                 "sequence run through kernels of different shapes)")
    return lines


def format_report(r: LeakageReport, header: str, dtype: torch.dtype = torch.float32) -> str:
    """The printed report: the three tests side by side with the control, then the verdict."""
    lines = [header, ""] + _perturbation_table(r) + [""] + _influence_lines(r) + [""] + _consistency_lines(r)
    lines += ["", verdict_line(r, dtype)]
    return "\n".join(lines)


def verdict_line(r: LeakageReport, dtype: torch.dtype = torch.float32) -> str:
    """One line: PASS / LEAK / INCONCLUSIVE, with the numbers that justify it. dtype: the precision
    the forward passes ran in, whose resolution puts the mask-off numbers in scale."""
    leak_off = r.unmasked.perturbation.max_past
    eps = torch.finfo(dtype).eps
    dtype_word = str(dtype).removeprefix("torch.")
    match r.verdict:
        case "PASS":
            return (f"PASS: with the mask nothing reaches the past from the future (largest change 0.0"
                    f"{'' if r.settings.tolerance == 0 else f', tolerance {fmt(r.settings.tolerance)}'}); "
                    f"the same tests on the same weights without the mask find changes up to {fmt(leak_off)} "
                    f"({dtype_word} resolution {fmt(eps)}).")
        case "LEAK":
            return "LEAK: information from the future reaches earlier positions: " + "; ".join(r.leaks)
        case _:
            return (f"INCONCLUSIVE: no leakage with the mask, but the mask-off control changed the past by only "
                    f"{fmt(leak_off)} (needs > {fmt(r.settings.control_min)}): the tests could not have "
                    "caught a leak here; use a longer prompt (leakage.seq_len) or more trials")


def _checks_summary(c: ModelChecks) -> dict[str, Any]:
    upper = c.influence_above_diagonal
    p = c.perturbation
    out: dict[str, Any] = {
        "label": c.label,
        "perturbation": {"max_past_change": p.max_past, "max_logits_change": p.max_logits,
                         "max_hidden_change_per_layer": p.max_hidden_per_layer,
                         "min_future_logits_change": p.min_future, "positions": p.positions,
                         "logits_change": p.logits, "hidden_change": p.hidden,
                         "future_logits_change": p.future_logits, "trials": p.trials},
        "influence": {"max_above_diagonal": upper.max().item() if upper.numel() else 0.0,
                      "zeros_above_diagonal": int((upper == 0).sum()), "entries_above_diagonal": upper.numel(),
                      "matrix": c.influence.tolist()},
        "consistency": {"equal": c.consistency.equal, "first_mismatch": c.consistency.first_mismatch,
                        "max_logit_diff": c.consistency.max_logit_diff, "prompt_len": c.consistency.prompt_len,
                        "cached": c.consistency.cached, "recomputed": c.consistency.recomputed},
    }
    if c.other_impl is not None:
        out["other_attention_impl"] = {"attn": c.other_impl[0], "max_past_change": c.other_impl[1].max_past}
    return out


def summary(r: LeakageReport, **extra: Any) -> dict[str, Any]:
    """Everything the report shows, and the per-position numbers behind it, as plain JSON data."""
    return {"verdict": r.verdict, "exit_code": r.exit_code, "leaks": r.leaks, "control_ok": r.control_ok,
            "prompt_len": r.prompt_len, "configured_causal": r.configured_causal,
            "settings": dataclasses.asdict(r.settings), **extra,
            "mask_on": _checks_summary(r.masked), "mask_removed": _checks_summary(r.unmasked)}

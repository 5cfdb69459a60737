"""The leakage check: the three tests of leakage_tests.py on the model as configured and on a copy
with the causal mask removed, and the verdict.

Every number must be finite: a mask that leaves a query row nothing to read (say, one that hides each
token from itself) makes the explicit softmax 0/0 = NaN, and NaN compared with any tolerance is False,
so such a model would "show no leakage". Any NaN or inf in any test, on either model, or in the
weights makes the verdict FAIL (the weights are checked directly: torch's CPU sdpa turns a query row
of NaN scores into zeros, so a NaN query weight can leave every output finite).

The mask-off copy (same weights, causal=False) is the control: a 0 convinces only if the same test
shows clear leakage once the mask is gone; if it does not (say, the prompt is too short), the check
is INCONCLUSIVE, not a pass. Verdicts, and sample.py's exit codes: PASS 0; LEAK 1 (the future
reaches the past in the model as configured); INCONCLUSIVE 3 (the control showed no leakage either,
or the perturbation left a later position unchanged); FAIL 4 (a test met a NaN or inf).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from model import GPT

from .leakage_tests import (  # cache_consistency and logit_tolerance: re-exported for callers
    ConsistencyResult,
    PerturbationResult,
    above_diagonal,
    cache_consistency,
    count_nonfinite,
    influence_matrix,
    largest_above_diagonal,
    logit_tolerance,  # noqa: F401
    nan_or,
    perturbation_test,
    variant,
)

log = logging.getLogger(__name__)

EXIT_CODES = {"PASS": 0, "LEAK": 1, "INCONCLUSIVE": 3, "FAIL": 4}


@dataclass
class LeakageConfig:
    """sample.py's `leakage:` settings (configs/sample.yaml), and the library's."""
    # Random futures tried per position in the perturbation test.
    trials: int = 3
    # The influence map (one backward pass per position and probe) covers the first this-many tokens.
    influence_len: int = 32
    # Random probe vectors per position for ||d h_t / d x_s||; null = exact (n_embd probes, slower).
    probes: int | None = 8
    # Greedy tokens generated with and without the KV cache.
    gen_tokens: int = 32
    # Largest change at past positions still counted as no leak (0.0: exact, right for fp32).
    tolerance: float = 0.0
    # The mask-off control must change the past by more than this, or the check is inconclusive.
    control_min: float = 1e-4
    # Generation test: a flipped token is a near-tie (rounding), not a leak, when the two paths' logits
    # and the two tokens' logits agree within this many nats (float32 rounding is ~1e-6 for small models).
    tie_margin: float = 1e-3
    # Generation test: the paths' logits must agree within this many float32 rounding units (logit_tolerance).
    logit_eps: float = 2.0


@dataclass
class ModelChecks:
    """The three tests on one model."""
    label: str
    perturbation: PerturbationResult
    influence: torch.Tensor  # (T', T') on CPU
    consistency: ConsistencyResult
    other_impl: tuple[str, PerturbationResult] | None = None  # the perturbation test, other attention path

    @property
    def max_influence_above_diagonal(self) -> float:
        return largest_above_diagonal(self.influence)

    @property
    def perturbations(self) -> list[tuple[str, PerturbationResult]]:
        """(what ran, result) for each attention path the perturbation test ran through."""
        other = [] if self.other_impl is None else [(f"perturbation through attn={self.other_impl[0]}",
                                                     self.other_impl[1])]
        return [("perturbation", self.perturbation), *other]

    @property
    def max_past_change(self) -> float:
        """Largest change at past positions over the perturbation tests of both attention paths."""
        return nan_or(max, (p.max_past for _, p in self.perturbations))

    @property
    def nonfinite(self) -> list[str]:
        """Each test that met a NaN or inf, and how many (empty: every number was finite)."""
        found = [f"{name}: non-finite logits ({p.nonfinite_logits}) and hidden states ({p.nonfinite_hidden}), NaN or inf"
                 for name, p in self.perturbations if p.nonfinite_logits or p.nonfinite_hidden]
        if bad := count_nonfinite(self.influence):
            found.append(f"influence: {bad}/{self.influence.numel()} entries non-finite (the output h_t is NaN or inf)")
        if bad := self.consistency.nonfinite_logits:
            found.append(f"generation: non-finite logits ({bad}), NaN or inf")
        return found


@dataclass
class LeakageReport:
    masked: ModelChecks  # the model as configured (mask on, unless the variant removed it)
    unmasked: ModelChecks  # the same weights with causal=False
    settings: LeakageConfig
    prompt_len: int
    configured_causal: bool
    attn: str  # the attention implementation as configured
    seed: int = 0
    nonfinite_weights: list[str] = field(default_factory=list)  # parameters and buffers holding NaN or inf

    @property
    def failures(self) -> list[str]:
        """Non-finite values in any test on either model, or in the weights (empty: none)."""
        found = [f"{checks.label}: {what}" for checks in (self.masked, self.unmasked) for what in checks.nonfinite]
        if names := self.nonfinite_weights:
            found.insert(0, f"weights: {len(names)} tensors hold NaN or inf ({', '.join(names[:4])}"
                            f"{', ...' if len(names) > 4 else ''})")
        return found

    @property
    def leaks(self) -> list[str]:
        """What found leakage in the model as configured (empty: none)."""
        found, tol, c = [], self.settings.tolerance, self.masked.consistency
        if self.masked.max_past_change > tol:
            found.append(f"perturbation: past positions changed by {self.masked.max_past_change:.3g}")
        if (upper := self.masked.max_influence_above_diagonal) > tol:
            found.append(f"influence: d h_t / d x_s reaches {upper:.3g} for s > t")
        if not c.equal and not c.near_tie:
            found.append(f"generation: cached and recomputed tokens differ from step {c.first_mismatch}")
        if c.max_logit_diff > c.logit_tolerance:
            found.append(f"generation: cached and recomputed logits differ by {c.max_logit_diff:.3g}, more than "
                         f"float32 rounding ({c.logit_tolerance:.3g})")
        return found

    @property
    def control_ok(self) -> bool:
        """The mask-off control shows what the tests are there to catch."""
        upper = above_diagonal(self.unmasked.influence)  # s > t: the future's influence on the past
        return (self.unmasked.perturbation.max_past > self.settings.control_min
                and bool(upper.numel()) and upper.min().item() > 0.0)

    @property
    def inconclusive(self) -> list[str]:
        """Why a clean result would prove nothing (empty: it would prove the claim)."""
        found = []
        for name, p in self.masked.perturbations:
            if not p.min_future > 0:
                t = next((t for t, v in zip(p.positions, p.future_logits, strict=True) if not v > 0), None)
                found.append(f"{name}: replacing the tokens after t = {t} left a later position's logits unchanged "
                             f"(smallest change {p.min_future:.3g}): the perturbation did not reach the model, so its "
                             "0.0 before t shows nothing")
        if not self.control_ok:
            found.append(f"the mask-off control changed the past by only {self.unmasked.perturbation.max_past:.3g} "
                         f"(needs > {self.settings.control_min:.3g}): the tests could not have caught a leak here")
        return found

    @property
    def verdict(self) -> str:
        """PASS only when the tests found nothing, on finite numbers, and could have found something."""
        if self.failures:
            return "FAIL"
        if self.leaks:
            return "LEAK"
        return "INCONCLUSIVE" if self.inconclusive else "PASS"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def _checks(label: str, model: GPT, idx: torch.Tensor, s: LeakageConfig, seed: int,
            autocast: contextlib.AbstractContextManager | None, other_impl: bool) -> ModelChecks:
    log.info("%s: perturbation test (%d positions x %d trials)", label, idx.shape[1] - 1, s.trials)
    pert = perturbation_test(model, idx, trials=s.trials, seed=seed, autocast=autocast)
    other = None
    if other_impl:  # the same test through the other attention implementation (same weights)
        impl = "explicit" if model.config.attn == "sdpa" else "sdpa"
        other = (impl, perturbation_test(variant(model, attn=impl), idx, trials=s.trials, seed=seed, autocast=autocast))
    n = min(s.influence_len, idx.shape[1])
    log.info("%s: influence map over %d positions", label, n)
    infl = influence_matrix(model, idx[:, :n], probes=s.probes, seed=seed, autocast=autocast)
    gen = max(1, min(s.gen_tokens, model.config.block_size - 1))
    prompt = idx[:, :max(1, min(idx.shape[1], model.config.block_size - gen))]
    log.info("%s: greedy generation with and without the KV cache (%d tokens, float32)", label, gen)
    cons = cache_consistency(model, prompt, gen, tie_margin=s.tie_margin, logit_eps=s.logit_eps)
    return ModelChecks(label, pert, infl, cons, other)


def run_leakage_check(model: GPT, idx: torch.Tensor, settings: LeakageConfig | None = None,
                      autocast: contextlib.AbstractContextManager | None = None, *, seed: int = 0) -> LeakageReport:
    """Run the three tests on model and on its mask-off copy, for the prompt idx (1, T), T >= 2.
    autocast: the precision of the perturbation and influence tests (generation runs in float32)."""
    s = settings or LeakageConfig()
    masked = _checks("mask on" if model.config.causal else "as configured (causal=False)", model, idx, s, seed,
                     autocast, other_impl=True)
    unmasked = _checks("mask removed", variant(model, causal=False), idx, s, seed, autocast, other_impl=False)
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if count_nonfinite(t.detach())]
    return LeakageReport(masked, unmasked, s, idx.shape[1], model.config.causal, model.config.attn, seed, bad)

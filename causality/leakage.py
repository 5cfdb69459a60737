"""The leakage check: the three tests run on the model as configured and on a copy with the causal
mask removed (same weights, causal=False), and the verdict.

The copy is the control. A test that reports 0 is only convincing if the same test, on the same
weights, reports clear leakage once the mask is gone; if it does not, the check is inconclusive
(say, the prompt is too short) and is reported as such rather than as a pass.

Verdicts (and sample.py's exit codes): PASS 0, LEAK 1 (information from the future reaches the
past in the model as configured), INCONCLUSIVE 3 (the control showed no leakage either).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from model import GPT

from .consistency import ConsistencyResult, cache_consistency
from .influence import influence_matrix
from .loading import variant
from .perturbation import PerturbationResult, perturbation_test

log = logging.getLogger(__name__)

EXIT_CODES = {"PASS": 0, "LEAK": 1, "INCONCLUSIVE": 3}


@dataclass
class LeakageSettings:
    trials: int = 3  # random futures per position in the perturbation test
    influence_len: int = 32  # the influence map covers the first this-many tokens of the prompt
    probes: int | None = 8  # probe vectors per position for ||dh/dx||; None = exact (C probes)
    gen_tokens: int = 32  # greedy tokens for the cache-vs-recompute test
    tolerance: float = 0.0  # largest change at past positions still counted as no leak
    control_min: float = 1e-4  # the mask-off control must show a change above this to count
    seed: int = 0


@dataclass
class ModelChecks:
    """The three tests on one model."""
    label: str
    perturbation: PerturbationResult
    influence: torch.Tensor  # (T', T') on CPU
    consistency: ConsistencyResult
    other_impl: tuple[str, PerturbationResult] | None = None  # the perturbation test, other attention path

    @property
    def influence_above_diagonal(self) -> torch.Tensor:
        """The entries with s > t: what the future contributes to the past."""
        T = self.influence.shape[0]
        return self.influence[torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)]

    @property
    def max_past_change(self) -> float:
        """Largest change at past positions over the perturbation tests of both attention paths."""
        values = [self.perturbation.max_past]
        if self.other_impl is not None:
            values.append(self.other_impl[1].max_past)
        return max(values)


@dataclass
class LeakageReport:
    masked: ModelChecks  # the model as configured (mask on, unless the variant removed it)
    unmasked: ModelChecks  # the same weights with causal=False
    settings: LeakageSettings
    prompt_len: int
    configured_causal: bool
    attn: str  # the attention implementation as configured

    @property
    def leaks(self) -> list[str]:
        """What found leakage in the model as configured (empty: none)."""
        found, tol = [], self.settings.tolerance
        if self.masked.max_past_change > tol:
            found.append(f"perturbation: past positions changed by {self.masked.max_past_change:.3g}")
        upper = self.masked.influence_above_diagonal
        if upper.numel() and upper.max().item() > tol:
            found.append(f"influence: d h_t / d x_s reaches {upper.max().item():.3g} for s > t")
        if not self.masked.consistency.equal:
            found.append(f"generation: cached and recomputed tokens differ from step "
                         f"{self.masked.consistency.first_mismatch}")
        return found

    @property
    def control_ok(self) -> bool:
        """The mask-off control shows what the tests are there to catch."""
        upper = self.unmasked.influence_above_diagonal
        return (self.unmasked.perturbation.max_past > self.settings.control_min
                and bool(upper.numel()) and upper.min().item() > 0.0)

    @property
    def verdict(self) -> str:
        if self.leaks:
            return "LEAK"
        return "PASS" if self.control_ok else "INCONCLUSIVE"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def _checks(label: str, model: GPT, idx: torch.Tensor, s: LeakageSettings,
            autocast: contextlib.AbstractContextManager | None, other_impl: bool) -> ModelChecks:
    log.info("%s: perturbation test (%d positions x %d trials)", label, idx.shape[1] - 1, s.trials)
    pert = perturbation_test(model, idx, trials=s.trials, seed=s.seed, autocast=autocast)
    other = None
    if other_impl:  # the same test through the other attention implementation (same weights)
        impl = "explicit" if model.config.attn == "sdpa" else "sdpa"
        other = (impl, perturbation_test(variant(model, attn=impl), idx, trials=s.trials, seed=s.seed,
                                         autocast=autocast))
    n = min(s.influence_len, idx.shape[1])
    log.info("%s: influence map over %d positions", label, n)
    infl = influence_matrix(model, idx[:, :n], probes=s.probes, seed=s.seed, autocast=autocast)
    gen = max(1, min(s.gen_tokens, model.config.block_size - 1))
    prompt = idx[:, :max(1, min(idx.shape[1], model.config.block_size - gen))]
    log.info("%s: greedy generation with and without the KV cache (%d tokens)", label, gen)
    cons = cache_consistency(model, prompt, gen, autocast=autocast)
    return ModelChecks(label, pert, infl, cons, other)


def run_leakage_check(model: GPT, idx: torch.Tensor, settings: LeakageSettings | None = None,
                      autocast: contextlib.AbstractContextManager | None = None) -> LeakageReport:
    """Run the three tests on model and on its mask-off copy, for the prompt idx (1, T), T >= 2."""
    s = settings or LeakageSettings()
    if idx.shape[1] < 2:
        raise ValueError("the leakage check needs a prompt of at least 2 tokens (seq_len >= 2, or a longer prompt)")
    masked = _checks("mask on" if model.config.causal else "as configured (causal=False)", model, idx, s,
                     autocast, other_impl=True)
    unmasked = _checks("mask removed", variant(model, causal=False), idx, s, autocast, other_impl=False)
    return LeakageReport(masked, unmasked, s, idx.shape[1], model.config.causal, model.config.attn)

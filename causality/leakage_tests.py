"""The three tests of the leakage check, each on one model and one prompt (leakage.py runs them on
the model and its mask-off copy). Each counts the NaN and inf it meets, which compare as "no change".

1. Perturbation: replacing every token after t must leave the logits and every layer's hidden states
   at positions <= t unchanged. The original runs in the batch shape of the perturbed rows, through
   identical kernels: a change at the past is information from the future, not rounding (with the
   mask, exactly 0.0). The smallest change after t shows that the perturbation reached the model.
2. Influence: I[t, s] = ||d h_t / d x_s||_F (the last block's output at t, the input embedding at s)
   from vector-Jacobian products, ||J||_F^2 = E ||v^T J||^2 for v ~ N(0, I) (Hutchinson) or exactly
   from the C basis vectors. With the mask every entry with s > t is exactly 0.0, whatever the probes.
3. Generation: greedy tokens with the KV cache must equal those from recomputing the whole sequence,
   since the cache holds keys and values computed without any later token. In float32 (autocast and
   TF32 off), as bf16/fp16 rounding of the two paths' kernels flips near-tied tokens; a flip where
   both paths agree within `tie_margin` is a near-tie, not a leak. The logits must agree within
   float32 rounding too (`logit_tolerance`): a one-token look-ahead can keep every greedy token.

Shapes: R rows of a batch, T time, C channels, V vocab, N new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from model import GPT
from model.generate import generate_tokens

# Perturbation: activation elements per chunk of rows (~256 MB in fp32): bounds memory for large
# vocabularies and long prompts without slowing small models down.
_CHUNK_ELEMENTS = 1 << 26
# Influence: prompt copies per backward pass, enough to amortise the passes on CPU and few enough to
# keep a small model's activations well under a gigabyte.
_ROWS_PER_PASS = 128


def nan_or(pick: Callable[[list[float]], float], values: Iterable[float]) -> float:
    """max() or min() that is NaN when any value is NaN (Python's max then depends on the order)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def count_nonfinite(*tensors: torch.Tensor) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def above_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The entries of m (..., T, T) with column s > row t: what the future gives the past."""
    return m[..., torch.ones(m.shape[-2:], dtype=torch.bool).triu(1)]


def largest_above_diagonal(m: torch.Tensor) -> float:
    """The largest of above_diagonal(m): 0.0 when there is none (T = 1), NaN if any entry is."""
    upper = above_diagonal(m)
    return upper.max().item() if upper.numel() else 0.0


def variant(model: GPT, **changes) -> GPT:
    """The same weights run another way (a new module), e.g. causal=False for the mask-off control."""
    other = GPT(dataclasses.replace(model.config, **changes)).to(model.wte.weight.device).eval()
    other.load_state_dict(model.state_dict())
    return other


# ---- test 1: perturbation --------------------------------------------------------------------------
@dataclass
class PerturbationResult:
    """Per tested position t (every t with a future, 0 .. T-2), the largest |change| over trials."""
    positions: list[int]
    trials: int
    logits: list[float]  # at positions <= t: must be 0 with the mask
    hidden: list[list[float]]  # [t][layer], at positions <= t
    future_logits: list[float]  # at positions > t: the perturbation's own effect
    # NaN or inf elements in the logits / hidden states of the original and perturbed rows.
    nonfinite_logits: int = 0
    nonfinite_hidden: int = 0

    @property
    def max_logits(self) -> float:
        return nan_or(max, self.logits)

    @property
    def max_hidden_per_layer(self) -> list[float]:
        return [nan_or(max, col) for col in zip(*self.hidden, strict=True)]

    @property
    def max_past(self) -> float:
        """The headline number: the largest change anywhere at or before the perturbed position."""
        return nan_or(max, [self.max_logits, *self.max_hidden_per_layer])

    @property
    def min_future(self) -> float:
        """The smallest effect the perturbation had on later positions (over all t)."""
        return nan_or(min, self.future_logits)


@torch.no_grad()
def perturbation_test(model: GPT, idx: torch.Tensor, *, trials: int = 3, seed: int = 0,
                      autocast: contextlib.AbstractContextManager | None = None) -> PerturbationResult:
    """Run the perturbation test on one prompt idx (1, T), T >= 2."""
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 2:
        raise ValueError("the leakage check needs one prompt of at least 2 tokens (seq_len >= 2, or a longer prompt), "
                         f"got shape {tuple(idx.shape)}")
    if trials < 1:
        raise ValueError(f"leakage.trials must be >= 1, got {trials}")
    model.eval()
    T, V, cfg = idx.shape[1], model.config.vocab_size, model.config
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(T - 1, device=idx.device).repeat_interleave(trials)  # (R,): t of each row
    chunk = max(1, _CHUNK_ELEMENTS // (T * (V + cfg.n_embd * cfg.n_layer)))
    bad = [0, 0]  # non-finite elements in the logits, in the hidden states

    def outputs(rows: torch.Tensor) -> list[torch.Tensor]:
        """The logits and every layer's hidden state for rows (R, T), each (R, T, V or C)."""
        trace = model.trace(rows)
        bad[0] += count_nonfinite(trace.logits)
        bad[1] += count_nonfinite(*trace.hidden)
        return [trace.logits, *trace.hidden]

    past, after, base_by_rows = [], [], {}
    for start in range(0, positions.shape[0], chunk):
        pos = positions[start:start + chunk]  # (R,)
        R = pos.shape[0]
        rows = idx.expand(R, T).clone()  # (R, T)
        future = torch.arange(T, device=idx.device)[None, :] > pos[:, None]  # (R, T): after each row's t
        # Adding 1..V-1 modulo V changes every future token: no trial can leave one as it was.
        shift = torch.randint(1, V, (R, T), generator=generator).to(idx.device)
        rows[future] = (rows[future] + shift[future]) % V
        with autocast or contextlib.nullcontext():
            if R not in base_by_rows:  # the original, in the same batch shape (see the top of this file)
                base_by_rows[R] = outputs(idx.expand(R, T).contiguous())
            pert = outputs(rows)
        change = torch.stack([(p.float() - b.float()).abs().amax(dim=-1)  # (R, T) per output
                              for p, b in zip(pert, base_by_rows[R], strict=True)], dim=1)  # (R, 1 + n_layer, T)
        past.append(change.masked_fill(future[:, None], 0).amax(dim=-1))  # (R, 1 + n_layer)
        after.append(change[:, 0].masked_fill(~future, math.inf).amin(dim=1))  # (R,): the logits' smallest effect

    # Largest change over the trials of each t (smallest, for the future effect).
    p = torch.cat(past).view(T - 1, trials, 1 + cfg.n_layer).amax(dim=1)  # (T-1, 1 + n_layer)
    f = torch.cat(after).view(T - 1, trials).amin(dim=1)  # (T-1,)
    return PerturbationResult(list(range(T - 1)), trials, p[:, 0].tolist(), p[:, 1:].tolist(), f.tolist(), *bad)


# ---- test 2: influence ---------------------------------------------------------------------------
def influence_matrix(model: GPT, idx: torch.Tensor, *, probes: int | None = 8, seed: int = 0,
                     autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """I[t, s] = ||d h_t / d x_s||_F for the prompt idx (1, T) as (T, T), float32, on CPU. probes: random
    probe vectors per position, or None for the exact norm (C times the work). Row r of a batch is the
    prompt seeded at its own t with its own v; a row t whose output h_t is not finite is NaN throughout."""
    if probes is not None and probes < 1:
        raise ValueError(f"leakage.probes must be >= 1 (or null for the exact norm), got {probes}")
    model.eval()
    T, C, device = idx.shape[1], model.config.n_embd, idx.device
    with torch.no_grad():
        x0 = model.embed(idx)  # (1, T, C)
    per_t = C if probes is None else probes
    t_of_row = torch.arange(T).repeat_interleave(per_t)  # (T * per_t,)
    vectors = (torch.eye(C).repeat(T, 1) if probes is None  # (T * per_t, C)
               else torch.randn(T * probes, C, generator=torch.Generator().manual_seed(seed)))

    squared = torch.zeros(T, T)  # accumulates sum over probes of ||v^T J_ts||^2
    broken = torch.zeros(T, dtype=torch.bool)  # rows t where h_t is NaN or inf
    for start in range(0, t_of_row.shape[0], _ROWS_PER_PASS):
        ts = t_of_row[start:start + _ROWS_PER_PASS]
        R, rows = ts.shape[0], torch.arange(ts.shape[0])
        x = x0.expand(R, T, C).clone().requires_grad_(True)  # (R, T, C)
        with torch.enable_grad(), autocast or contextlib.nullcontext():
            h = model.trace(embeds=x).hidden[-1]  # (R, T, C)
        seed_grad = torch.zeros(R, T, C, device=device, dtype=h.dtype)
        seed_grad[rows, ts.to(device)] = vectors[start:start + R].to(device, h.dtype)
        (grad,) = torch.autograd.grad(h, x, grad_outputs=seed_grad)  # (R, T, C): row r = v_r^T dh_t/dx
        broken[ts[~torch.isfinite(h[rows, ts.to(device)]).all(dim=-1).cpu()]] = True  # h[r, t_r]: (R, C)
        squared.index_add_(0, ts, grad.float().pow(2).sum(dim=-1).cpu())  # (R, T) summed into rows t
    if probes is not None:
        squared /= probes
    squared[broken] = math.nan
    return squared.sqrt()


# ---- test 3: generation, KV cache vs recomputation -----------------------------------------------
def logit_tolerance(logits: Iterable[torch.Tensor], n_embd: int, logit_eps: float = 2.0,
                    dtype: torch.dtype = torch.float32) -> float:
    """How far two float32 computations of the same logits may drift apart by rounding alone:
    logit_eps x eps(dtype) x sqrt(n_embd) x max(1, max |logit|).

    Two summation orders of a C-long dot product differ by a random walk of about sqrt(C) units of
    eps relative to the result; max |logit| (at least 1: LayerNorm keeps the hidden states O(1)) sets
    the magnitude. Measured on CPU, fp32, in these units: healthy models (16 to 768 wide, 2 to 12
    layers, random init and trained) reach at most 0.6; a mask that reads one token ahead gives 3.5 to
    3e4. logit_eps = 2 sits between (at |logit| ~ 1, C = 32: 1.35e-6, between 4.8e-7 from rounding and
    5.7e-6 from a look-ahead); one too weak to clear it is still caught by the perturbation test."""
    finite = [t[torch.isfinite(t)] for t in logits]
    scale = max([1.0, *(t.abs().max().item() for t in finite if t.numel())])
    return logit_eps * torch.finfo(dtype).eps * math.sqrt(n_embd) * scale


@dataclass
class ConsistencyResult:
    prompt_len: int
    cached: list[int]  # greedy new tokens, KV cache
    recomputed: list[int]  # greedy new tokens, full recomputation
    max_logit_diff: float  # over the N steps, on the cached tokens' prefixes (NaN if any logit is)
    flip_logit_diff: float | None = None  # at the first mismatch: max |difference| of the paths' logits
    flip_gap: float | None = None  # at the first mismatch: how far apart the two tokens' logits were
    tie_margin: float = 1e-3
    logit_tolerance: float = math.inf  # float32 rounding allowed between the paths' logits
    nonfinite_logits: int = 0  # NaN or inf next-token logits, both paths together

    @property
    def first_mismatch(self) -> int | None:
        return next((i for i, (a, b) in enumerate(zip(self.cached, self.recomputed, strict=True)) if a != b), None)

    @property
    def equal(self) -> bool:
        return self.cached == self.recomputed

    @property
    def logits_agree(self) -> bool:
        """The paths' logits differ by no more than float32 rounding (False when any is NaN)."""
        return self.max_logit_diff <= self.logit_tolerance

    @property
    def near_tie(self) -> bool:
        """The tokens differ only where two tokens were tied within tie_margin and both paths agreed
        within tie_margin: rounding, not information from the future."""
        return not self.equal and self.flip_logit_diff <= self.tie_margin and self.flip_gap <= self.tie_margin


@contextlib.contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """True float32 whatever the caller set up: autocast off, and no TF32 matmuls on CUDA."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


@torch.no_grad()
def cache_consistency(model: GPT, idx: torch.Tensor, max_new_tokens: int, *,
                      tie_margin: float = 1e-3, logit_eps: float = 2.0) -> ConsistencyResult:
    """Greedy-decode max_new_tokens after idx (1, T) both ways, in float32, and compare the tokens and
    their logits. T + max_new_tokens must fit in the context: both paths see the same positions."""
    model.eval()
    T = idx.shape[1]
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"cache consistency: {T} prompt + {max_new_tokens} new tokens exceed the context "
                         f"of {model.config.block_size}; use a shorter prompt or fewer tokens")
    with _float32(idx.device):
        # The cached path as generation runs it (prefill, then one decode step per token), with the
        # logits each token was picked from: a slip in how generation feeds the cache shows here.
        steps = list(generate_tokens(model, idx, max_new_tokens, temperature=0.0, use_cache=True, with_logits=True))
        cached = torch.cat([idx, *(tok for tok, _ in steps)], dim=1)  # (1, T + N)
        on_cache = [logits[0].float() for _, logits in steps]  # N x (V,)
        recomputed = model.generate(idx, max_new_tokens, temperature=0.0, use_cache=False)  # (1, T + N)
        # Recomputed next-token logits on the same (cached) prefixes: up to the first mismatch these are
        # exactly the logits the recomputing path picked its token from.
        on_full = [model(cached[:, :i])[0][0, -1].float() for i in range(T, T + max_new_tokens)]  # N x (V,)
    diffs = [(a - b).abs().max().item() for a, b in zip(on_cache, on_full, strict=True)]
    result = ConsistencyResult(T, cached[0, T:].tolist(), recomputed[0, T:].tolist(), nan_or(max, diffs),
                               tie_margin=tie_margin, nonfinite_logits=count_nonfinite(*on_cache, *on_full),
                               logit_tolerance=logit_tolerance(on_cache + on_full, model.config.n_embd, logit_eps))
    if (i := result.first_mismatch) is not None:
        a, b = result.cached[i], result.recomputed[i]
        result.flip_logit_diff = diffs[i]
        result.flip_gap = nan_or(max, [(on_cache[i][a] - on_cache[i][b]).item(), (on_full[i][b] - on_full[i][a]).item()])
    return result

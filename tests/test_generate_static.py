"""Generation's static-shape decode (GPT.decode: position as a tensor, attention over the whole cache
under a length mask), its compiled form (model/generate.py compile_for_generation), the vocabulary
cap for a padded vocabulary (vocab_limit), and the padded gpt2_124m experiment.

The reference everywhere is recomputing the whole sequence for every token: the cache forms must
give the same greedy tokens, and the same logits to float32 rounding."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose_train

import train
from engine.evaluate import generate_sample
from engine.runtime import Runtime
from model import GPT, ModelConfig
from model.generate import CompiledSteps, compile_for_generation, generate_tokens

VOCAB = 41

pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32, norm="pre")
    return GPT(ModelConfig(**{**base, **kw})).eval()


def static_eager(model: GPT) -> GPT:
    """Generation through the static-shape decode without compiling it: the same code path the
    compiled model runs, in eager mode, so its numbers can be checked quickly."""
    model.compiled_steps = CompiledSteps(prefill=model.step, decode=model.decode, cudagraphs=False)
    return model


def assert_same_as_recomputation(model: GPT, prompt: torch.Tensor, n_new: int, atol: float = 1e-5) -> None:
    cached = list(generate_tokens(model, prompt, n_new, temperature=0, with_logits=True))
    fresh = list(generate_tokens(model, prompt, n_new, temperature=0, use_cache=False, with_logits=True))
    assert len(cached) == len(fresh) == n_new
    for i, ((tok_a, log_a), (tok_b, log_b)) in enumerate(zip(cached, fresh, strict=True)):
        assert (log_a - log_b).abs().max() < atol, f"step {i}"
        assert torch.equal(tok_a, tok_b), f"step {i}"


# ---- the static form, eager --------------------------------------------------------------------------
@pytest.mark.parametrize("pos,attn,n_new", list(itertools.product(
    ["learned", "sinusoidal", "rope"], ["sdpa", "explicit"], [8, 30])))
def test_static_decode_matches_recomputation(pos, attn, n_new):
    # 5 + 8 stays inside block_size 16; 5 + 30 crosses it (the cache is refilled at every step past it).
    model = static_eager(make(pos=pos, attn=attn))
    assert_same_as_recomputation(model, torch.randint(0, VOCAB, (2, 5)), n_new)


@pytest.mark.parametrize("causal", [True, False])
def test_decode_equals_step_for_several_positions_at_once(causal):
    # decode with T > 1 (positions 3..6 after a 3-token step) exercises the length mask's causal
    # diagonal; causal=False (the leakage demonstration's model) must read every written position.
    model = make(pos="rope", causal=causal)
    idx = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        a, b = model.new_caches(2), model.new_caches(2)
        model.step(idx[:, :3], a, start_pos=0)
        model.decode(idx[:, :3], b, torch.arange(3))
        want = model.step(idx[:, 3:], a, start_pos=3)
        got = model.decode(idx[:, 3:], b, torch.arange(3, 7))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_stale_cache_entries_past_the_position_are_masked_out():
    model = make()
    idx = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        clean, dirty = model.new_caches(1), model.new_caches(1)
        for cache in dirty:  # what an earlier, longer sequence leaves behind
            cache.k.normal_()
            cache.v.normal_()
        model.decode(idx[:, :5], clean, torch.arange(5))
        model.decode(idx[:, :5], dirty, torch.arange(5))
        want = model.decode(idx[:, 5:], clean, torch.tensor([5]))
        got = model.decode(idx[:, 5:], dirty, torch.tensor([5]))
    assert torch.equal(got, want)


def test_cache_takes_the_autocast_dtype():
    model = make()
    assert model.new_caches(1)[0].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_caches(1)[0].k.dtype == torch.bfloat16
        tokens = list(generate_tokens(model, torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    assert len(tokens) == 4


def test_compiled_caches_keep_their_addresses_across_generations():
    # CUDA graphs replay fixed addresses: the compiled path allocates its caches once per shape.
    model = static_eager(make())
    model.compiled_steps.cudagraphs = True  # also marks them static for the compiler
    prompt = torch.randint(0, VOCAB, (1, 4))
    list(generate_tokens(model, prompt, 3, temperature=0))
    (caches,) = model.compiled_steps.caches.values()
    pointers = [c.k.data_ptr() for c in caches]
    list(generate_tokens(model, prompt[:, :2], 5, temperature=0))
    assert list(model.compiled_steps.caches.values()) == [caches]
    assert [c.k.data_ptr() for c in caches] == pointers
    assert all(hasattr(c.k, "_dynamo_static_input_type") for c in caches)


def test_interleaved_compiled_generations_do_not_share_caches():
    model = static_eager(make())
    a_prompt, b_prompt = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 6))
    a, b = generate_tokens(model, a_prompt, 6, temperature=0), generate_tokens(model, b_prompt, 6, temperature=0)
    pairs = [(next(a), next(b)) for _ in range(6)]  # a holds the shared caches; b gets its own
    assert torch.equal(torch.cat([x for x, _ in pairs], 1), model.generate(a_prompt, 6, temperature=0, use_cache=False)[:, 4:])
    assert torch.equal(torch.cat([y for _, y in pairs], 1), model.generate(b_prompt, 6, temperature=0, use_cache=False)[:, 6:])
    assert list(a) == list(b) == [] and model.compiled_steps.in_use == set()  # released when each one ends


def test_train_mode_generation_does_not_use_the_compiled_steps():
    model = static_eager(make())
    calls = []
    model.compiled_steps.decode = lambda *a: calls.append(a)
    model.train()
    list(generate_tokens(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=0))
    assert calls == []


# ---- compiled ------------------------------------------------------------------------------------------
def check_compiled(model: GPT, prompt: torch.Tensor, n_new: int) -> None:
    fresh = list(generate_tokens(model, prompt, n_new, temperature=0, use_cache=False, with_logits=True))
    compile_for_generation(model)
    assert model.compiled_steps.cudagraphs is False  # CPU
    compiled = list(generate_tokens(model, prompt, n_new, temperature=0, with_logits=True))
    for i, ((tok_a, log_a), (tok_b, log_b)) in enumerate(zip(compiled, fresh, strict=True)):
        assert (log_a - log_b).abs().max() < 1e-4, f"step {i}"
        assert torch.equal(tok_a, tok_b), f"step {i}"
    # One decode graph serves every position: a shorter prompt, other positions, no recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = torch.cat(list(generate_tokens(model, prompt[:, :3], 8, temperature=0)), dim=1)
    assert torch.equal(again, model.generate(prompt[:, :3], 8, temperature=0, use_cache=False)[:, 3:])


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_compiled_generation_matches_recomputation_and_compiles_decode_once():
    # RoPE: complex numbers in the compiled graph. (About 20 s on 2 CPU cores, compilation mostly.)
    check_compiled(make(pos="rope"), torch.randint(0, VOCAB, (1, 5)), 10)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_compiled_generation_past_the_context(pos):
    # 5 + 20 > block_size 16: past it the compiled prefill refills the cache at every step.
    check_compiled(make(pos=pos), torch.randint(0, VOCAB, (1, 5)), 20)


# ---- vocab_limit ----------------------------------------------------------------------------------------
def padded_model(limit: int) -> GPT:
    """A model whose every logit at ids >= limit is 10 and below it 0: unbounded sampling would pick
    a padding id nearly every time."""
    model = make(tie_weights=False)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
        model.ln_f.bias[0] = 1.0  # the final hidden state is e_0 at every position
        model.lm_head.weight.zero_()
        model.lm_head.weight[limit:, 0] = 10.0
    return model


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=50),
                                      dict(temperature=1.0, top_p=0.9)])
def test_vocab_limit_never_samples_past_the_limit(use_cache, sampling):
    limit = 30
    model = padded_model(limit)
    prompt = torch.randint(0, limit, (4, 3))
    g = torch.Generator().manual_seed(0)
    unbounded = model.generate(prompt, 20, use_cache=use_cache, generator=g, **sampling)[:, 3:]
    assert (unbounded >= limit).any()  # the test can fail
    out = list(generate_tokens(model, prompt, 20, use_cache=use_cache, generator=g, with_logits=True,
                               vocab_limit=limit, **sampling))
    assert all(tok.max() < limit and logits.shape == (4, limit) for tok, logits in out)


def test_vocab_limit_holds_in_the_static_path_and_for_the_trainers_samples():
    limit = 30
    model = static_eager(padded_model(limit))
    assert model.generate(torch.zeros(1, 2, dtype=torch.long), 20, vocab_limit=limit).max() < limit
    rt = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), precision="fp32", compile=False)
    ids = generate_sample(padded_model(limit), [1, 2], 20, rt, seed=0, vocab_limit=limit)
    assert len(ids) == 20 and max(ids) < limit
    assert max(generate_sample(padded_model(limit), [1, 2], 20, rt, seed=0)) >= limit  # without it


def test_bad_vocab_limit_is_refused():
    with pytest.raises(ValueError, match="vocab_limit"):
        make().generate(torch.zeros(1, 1, dtype=torch.long), 2, vocab_limit=0)


# ---- the padded GPT-2 experiment ----------------------------------------------------------------------
def test_gpt2_124m_pads_the_vocabulary_to_a_multiple_of_64():
    cfg = compose_train(["experiment=gpt2_124m"])
    assert cfg.model.vocab_size == 50304 and cfg.model.vocab_size % 64 == 0
    # The trainer keeps a model.vocab_size above the data's (GPT-2's tokenizer: 50257 ids).
    assert train._with_vocab(cfg.model, 50257).vocab_size == 50304
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert model.wte.weight.shape == (50304, 768) and model.lm_head.weight is model.wte.weight


# ---- on a GPU: bf16 cache, CUDA graphs -----------------------------------------------------------------
@pytest.mark.gpu
def test_compiled_generation_with_cuda_graphs_in_bf16():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=2, n_head=4, n_embd=128, norm="pre")).cuda().eval()
    prompt = torch.randint(0, 101, (1, 8), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = torch.cat(list(generate_tokens(model, prompt, 40, temperature=0)), dim=1)
        compile_for_generation(model)
        assert model.compiled_steps.cudagraphs
        first = torch.cat(list(generate_tokens(model, prompt, 40, temperature=0)), dim=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = list(generate_tokens(model, prompt, 40, temperature=0, with_logits=True))
    (caches,) = model.compiled_steps.caches.values()
    assert caches[0].k.dtype == torch.bfloat16  # the cache in the autocast dtype
    assert torch.equal(first, torch.cat([t for t, _ in second], dim=1))  # replays repeat exactly
    assert (first == eager).float().mean() > 0.9  # bf16 rounding may flip a near-tie late on
    logits = [lg for _, lg in second]
    assert not any(a.data_ptr() == b.data_ptr() for a, b in itertools.pairwise(logits))  # copies, not graph outputs

"""The model's parts against each other and against their definitions: explicit vs fused attention,
KV-cache generation vs recomputation, attention weights, sizes, initialisation and validation."""

import itertools
import math

import pytest
import torch
from conftest import ROOT, compose_train, preset_config

import cli
from model import GPT, ModelConfig
from model.generate import generate_tokens, sample_logits

VOCAB = 41
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))


def make(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPT(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("norm,pos", list(itertools.product(["post", "pre"], ["learned", "sinusoidal", "rope"])))
def test_explicit_and_sdpa_agree_forward_and_backward(norm, pos):
    explicit = make(norm=norm, pos=pos, attn="explicit")
    sdpa = make(norm=norm, pos=pos, attn="sdpa")
    sdpa.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, VOCAB, (3, 16))
    targets = torch.randint(0, VOCAB, (3, 16))
    la, loss_a = explicit(idx, targets)
    lb, loss_b = sdpa(idx, targets)
    assert (la - lb).abs().max() < 1e-5
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(explicit.named_parameters(), sdpa.parameters(), strict=True):
        assert (pa.grad - pb.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_kv_cache_matches_recomputation_also_past_block_size(pos):
    model = make(pos=pos, norm="pre").eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    n_new = 30  # 5 + 30 > block_size 16: crosses the context limit
    cached = list(generate_tokens(model, prompt, n_new, temperature=0, with_logits=True))
    fresh = list(generate_tokens(model, prompt, n_new, temperature=0, use_cache=False, with_logits=True))
    for (tok_a, log_a), (tok_b, log_b) in zip(cached, fresh, strict=True):
        assert (log_a - log_b).abs().max() < 1e-5
        assert torch.equal(tok_a, tok_b)
    assert torch.equal(model.generate(prompt, n_new, temperature=0),
                       model.generate(prompt, n_new, temperature=0, use_cache=False))


def test_generate_with_a_prompt_longer_than_the_context():
    model = make().eval()
    out = model.generate(torch.randint(0, VOCAB, (1, 40)), 3, temperature=0)
    assert out.shape == (1, 43)


def test_attention_weights_are_causal_and_normalised():
    model = make(attn="explicit").eval()
    trace = model.trace(torch.randint(0, VOCAB, (2, 16)), need_weights=True)
    assert len(trace.attentions) == 2
    for weights in trace.attentions:  # (B, nh, T, T)
        assert weights.shape == (2, 4, 16, 16)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 16), atol=1e-6)
        assert torch.all(weights.triu(diagonal=1) == 0)
        assert torch.all(weights.diagonal(dim1=-2, dim2=-1) > 0)


def test_sdpa_model_can_still_return_weights():
    model = make(attn="sdpa").eval()
    trace = model.trace(torch.randint(0, VOCAB, (1, 8)), need_weights=True)
    assert torch.all(trace.attentions[0].triu(diagonal=1) == 0)


def test_gpt2_preset_has_gpt2_parameter_count():
    with torch.device("meta"):
        model = GPT(preset_config("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768
    assert model.config.norm == "pre" and model.config.tie_weights


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds(name):
    fields = cli.model_preset(name)
    with torch.device("meta"):
        model = GPT(ModelConfig(**{**fields, "vocab_size": fields["vocab_size"] or 65}))
    assert model.config.n_layer == fields["n_layer"]


def test_small_preset_is_nanogpts_shakespeare_model():
    c = preset_config("small", vocab_size=65)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.norm) == (6, 6, 384, 256, "post")


def test_overrides_win_over_the_preset():
    c = compose_train(["model=tiny", "model.n_layer=8", "model.pos=rope"]).model
    assert c.n_layer == 8 and c.pos == "rope" and c.n_embd == cli.model_preset("tiny")["n_embd"]


def test_weights_are_tied_and_initialised_like_gpt2():
    model = GPT(ModelConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 2e-3
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert torch.all(model.h[0].attn.c_attn.bias == 0)


def test_untied_model_counts_both_matrices():
    tied, untied = make(), make(tie_weights=False)
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)


def test_loss_ignores_minus_one_targets():
    model = make()
    idx = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    logits, loss = model(idx, targets)
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss_masked = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, VOCAB), targets[:, :4].reshape(-1))
    assert torch.allclose(loss_masked, expected)
    assert not torch.allclose(loss, loss_masked)


def test_flops_and_mfu_follow_the_palm_formula():
    model = make()
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 16
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, temperature=0).item() == 1
    assert all(sample_logits(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_logits(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    picks = {sample_logits(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 3}
    picks = {sample_logits(logits, 5.0, top_k=100, generator=g).item() for _ in range(400)}
    assert picks == {0, 1, 2, 3}  # top_k above the vocabulary keeps everything


def test_same_generator_seed_gives_the_same_sample():
    model = make().eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make().generate(torch.zeros(1, 1, dtype=torch.long), 2, **kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_embd=20, n_head=4, pos="rope"), "head size"),
    (dict(norm="middle"), "norm"),
    (dict(pos="alibi"), "pos"),
    (dict(attn="flash"), "attn"),
    (dict(activation="relu"), "activation"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_configs_name_the_field(kwargs, field):
    base = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**base, **kwargs})


def test_missing_sizes_and_vocab_are_reported():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(vocab_size=10, block_size=8, n_head=2, n_embd=8)
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(preset_config("tiny"))


def test_too_long_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="block_size"):
        make()(torch.zeros(1, 17, dtype=torch.long))


def test_targets_may_be_a_non_contiguous_slice():
    model = make()
    seq = torch.randint(0, VOCAB, (2, 9))
    _, loss = model(seq[:, :-1], seq[:, 1:])
    assert torch.isfinite(loss)


def test_rope_rotates_each_channel_pair_by_position_times_frequency():
    from model.positions import apply_rope, rope_table
    hs, T, start, theta = 8, 5, 3, 10000.0
    x = torch.randn(2, 3, T, hs)  # (B, nh, T, hs)
    got = apply_rope(x, rope_table(16, hs, theta, x.device)[start:start + T])
    want = torch.empty_like(x)
    for t in range(T):
        for i in range(hs // 2):
            angle = (start + t) * theta ** (-2 * i / hs)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            want[..., t, 2 * i], want[..., t, 2 * i + 1] = a * c - b * s, a * s + b * c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # What RoPE is for: a query-key score depends on the distance between the two positions only.
    table = rope_table(16, hs, theta, x.device)
    q, k = torch.randn(hs), torch.randn(hs)

    def score(p_q, p_k):
        rq = apply_rope(q.view(1, 1, 1, hs), table[p_q:p_q + 1])
        rk = apply_rope(k.view(1, 1, 1, hs), table[p_k:p_k + 1])
        return (rq * rk).sum().item()
    assert score(7, 2) == pytest.approx(score(12, 7), abs=1e-5)


def test_rope_table_first_built_while_sampling_still_trains():
    from model import positions
    positions._ROPE_TABLES.clear()
    model = make(pos="rope")
    with torch.inference_mode():  # e.g. train.py's samples at an eval, before the next step
        model.eval().generate(torch.zeros(1, 1, dtype=torch.long), 3)
    _, loss = model.train()(torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt2_presets_take_gpt2s_gelu_and_the_default_is_the_exact_one():
    assert preset_config("gpt2").activation == "gelu_tanh"  # GPT-2's weights need its GELU
    assert preset_config("gpt2", activation="gelu").activation == "gelu"
    assert preset_config("tiny").activation == "gelu"
    assert ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4).activation == "gelu"

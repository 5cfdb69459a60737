"""Parity with Hugging Face transformers, in both directions (needs the optional `hf` extra).

No hub is reachable, so the references are random-init GPT2LMHeadModels saved with save_pretrained.
Weights are drawn wider than GPT-2's init (std 0.02 makes random models repeat one token forever), so
that greedy generation actually exercises different tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data.tokenizer import CharTokenizer, tokenizer_from_json, train_bpe  # noqa: E402
from engine.formats.hf import save_hf  # noqa: E402
from engine.formats.pretrained import from_pretrained, load_pretrained  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

pytestmark = pytest.mark.hf
TOL = 1e-4
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4


def hf_reference(tmp_path, activation="gelu_new", **kw):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=83, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                                     activation_function=activation, initializer_range=0.3,
                                     bos_token_id=None, eos_token_id=None, **kw)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def ours(activation="gelu_tanh", vocab_size=83, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, block_size=40, n_layer=3, n_head=4, n_embd=48, norm="pre", pos="learned",
               activation=activation)
    model = GPT(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def hf_greedy(model, idx, n):
    out = model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == idx.shape[1] + n  # no early stop: the comparison covers every token
    return out


def assert_parity(our_model, hf_model, vocab_size):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        diff = (our_model(idx)[0] - hf_model(idx).logits).abs().max().item()
    assert diff < TOL, f"max |logit diff| {diff:.2e}"
    prompt = idx[:2, :6]
    ours_tokens = our_model.generate(prompt, 30, temperature=0)
    assert torch.equal(ours_tokens, hf_greedy(hf_model, prompt, 30))
    assert len(set(ours_tokens[:, 6:].flatten().tolist())) > 2  # not one token repeated: a real comparison
    return diff


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_imported_hf_model_matches_its_logits_greedy_tokens_and_loss(tmp_path, activation):
    reference = hf_reference(tmp_path, activation)
    model = from_pretrained(tmp_path / "hf")
    assert model.config.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
    assert_parity(model, reference, 83)
    # A fine-tune from the import starts at the imported model's loss.
    idx = torch.randint(0, 83, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        hf_loss = reference(idx, labels=idx).loss
    assert abs(loss.item() - hf_loss.item()) < TOL


def test_sharded_safetensors_and_legacy_bin_import(tmp_path):
    reference = hf_reference(tmp_path)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # GPT-2's original release: pytorch_model.bin without the "transformer." prefix, no lm_head,
    # and a causal-mask buffer per layer.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    sd = {k.removeprefix("transformer."): v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    sd.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 40, 40)) for i in range(3)})
    torch.save(sd, legacy / "pytorch_model.bin")
    for path in (tmp_path / "sharded", legacy):
        assert_parity(from_pretrained(path), reference, 83)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_our_model_exported_reloads_in_transformers_with_same_logits_and_tokens(tmp_path, activation):
    bpe = train_bpe(iter([TEXT]), vocab_size=300)
    model = ours(activation, vocab_size=bpe.vocab_size)
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": bpe.to_json()}
    save_hf(ckpt, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.activation_function == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[activation]
    assert reloaded.config.eos_token_id == bpe.eot_id
    assert_parity(model, reloaded, bpe.vocab_size)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    sample = "Speak, speak. Before we proceed!"
    assert hf_tok(sample)["input_ids"] == bpe.encode(sample)
    assert hf_tok.decode(bpe.encode(sample)) == sample and hf_tok.eos_token == "<|endoftext|>"


def test_char_tokenizer_round_trips_through_autotokenizer(tmp_path):
    chars = CharTokenizer.from_text([TEXT])
    model = ours(vocab_size=chars.vocab_size)
    save_hf({"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": chars.to_json()},
            tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    sample = "Speak,\n\n  hear me.\n"
    ids = chars.encode(sample)
    assert hf_tok(sample)["input_ids"] == ids
    assert hf_tok.decode(ids) == sample
    # Importing the directory gives back a tokenizer with the same ids (a WordLevel one now).
    back = tokenizer_from_json(load_pretrained(tmp_path / "out")["tokenizer"])
    assert back.encode(sample) == ids and back.decode(ids) == sample


def test_ours_to_hf_to_ours_gives_identical_weights(tmp_path):
    bpe = train_bpe(iter([TEXT]), vocab_size=300)
    model = ours(vocab_size=bpe.vocab_size)
    ckpt = {"model": model.state_dict(), "model_config": model.config.to_dict(), "tokenizer": bpe.to_json()}
    save_hf(ckpt, tmp_path / "out")
    back = load_pretrained(tmp_path / "out")
    assert back["source"] == "hf" and back["model"].keys() == ckpt["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in ckpt["model"].items())
    arch = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "norm", "pos", "activation", "tie_weights")
    assert {k: back["model_config"][k] for k in arch} == {k: ckpt["model_config"][k] for k in arch}
    # Canonical form: the same string data/ stores, so a fine-tune's tokenizer check is an equality.
    assert back["tokenizer"] == bpe.to_json()


@pytest.mark.parametrize("setting", [{"norm": "post"}, {"pos": "rope"}])
def test_post_ln_and_rope_models_are_refused_before_writing(tmp_path, setting):
    model = ours(**setting)
    with pytest.raises(ValueError, match="cannot be expressed as GPT-2") as e:
        save_hf({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "out")
    key, value = next(iter(setting.items()))
    assert f"model.{key}={value}" in str(e.value)
    assert not (tmp_path / "out").exists()

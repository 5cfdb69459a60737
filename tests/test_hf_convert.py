"""Conversion to and from GPT-2's layout without transformers installed: config mapping for the four
GPT-2 sizes, refusals that name the setting, the weight mapping's inverse, and reading an HF-style
directory (written here with safetensors alone) through load_pretrained."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError
from engine.formats.hf import tokenizer_json_from_hf_dir
from engine.formats.pretrained import from_pretrained, load_pretrained
from model import GPT, ModelConfig
from model.gpt2 import (
    check_gpt2_expressible,
    from_hf_state_dict,
    model_config_from_hf,
    to_hf_config,
    to_hf_state_dict,
)

# The four released GPT-2 sizes, as their config.json files give them.
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}


def gpt2_like(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32, norm="pre", pos="learned",
               activation="gelu_tanh")
    return GPT(ModelConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize("name", sorted(GPT2_SIZES))
def test_gpt2_size_configs_map_to_our_config(name):
    n_layer, n_head, n_embd = GPT2_SIZES[name]
    hf = {"model_type": "gpt2", "activation_function": "gelu_new", "n_ctx": 1024, "n_positions": 1024,
          "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer, "vocab_size": 50257, "layer_norm_epsilon": 1e-5}
    cfg = ModelConfig(**model_config_from_hf(hf))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (n_layer, n_head, n_embd, 1024, 50257)
    assert (cfg.norm, cfg.pos, cfg.activation, cfg.tie_weights, cfg.bias) == ("pre", "learned", "gelu_tanh", True, True)
    assert to_hf_config(cfg)["activation_function"] == "gelu_new"
    assert {k: to_hf_config(cfg)[k] for k in ("n_layer", "n_head", "n_embd", "n_positions")} == \
        {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "n_positions": 1024}


@pytest.mark.parametrize("setting,value,named", [
    ("norm", "post", "model.norm=post"), ("pos", "rope", "model.pos=rope"),
    ("pos", "sinusoidal", "model.pos=sinusoidal"), ("tie_weights", False, "model.tie_weights=False"),
    ("bias", False, "model.bias=False"), ("causal", False, "model.causal=False")])
def test_inexpressible_models_are_refused_naming_the_setting(setting, value, named):
    cfg = gpt2_like(**{setting: value}).config
    with pytest.raises(ValueError, match="cannot be expressed as GPT-2") as e:
        check_gpt2_expressible(cfg)
    assert named in str(e.value) and "scripts/export.py" in str(e.value)


def test_exact_gelu_maps_to_hf_gelu():
    assert to_hf_config(gpt2_like(activation="gelu").config)["activation_function"] == "gelu"
    hf = {"model_type": "gpt2", "activation_function": "gelu", "n_embd": 32, "n_head": 4, "n_layer": 1}
    assert model_config_from_hf(hf)["activation"] == "gelu"


@pytest.mark.parametrize("change,named", [
    ({"activation_function": "relu"}, "activation_function='relu'"), ({"n_inner": 100}, "n_inner=100"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"), ({"model_type": "llama"}, "model_type='llama'")])
def test_hf_settings_we_cannot_run_are_refused(change, named):
    hf = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, **change}
    with pytest.raises(ValueError) as e:
        model_config_from_hf(hf)
    assert named in str(e.value)


def test_weight_mapping_is_an_exact_inverse():
    model = gpt2_like()
    sd = model.state_dict()
    hf_sd = to_hf_state_dict(sd, model.config.n_layer)
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    back = from_hf_state_dict(hf_sd, model.config.to_dict())
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def write_hf_style_dir(model: GPT, path, **config_extra):
    """What save_pretrained writes, made with safetensors alone (no tied lm_head in the file)."""
    path.mkdir()
    hf_sd = to_hf_state_dict(model.state_dict(), model.config.n_layer)
    del hf_sd["lm_head.weight"]
    save_file(hf_sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**to_hf_config(model.config), **config_extra}))


def test_hf_style_directory_loads_without_transformers(tmp_path):
    model = gpt2_like()
    write_hf_style_dir(model, tmp_path / "hf")
    ckpt = load_pretrained(tmp_path / "hf")
    assert ckpt["source"] == "hf" and ckpt["tokenizer"] is None
    loaded = from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.wte.weight
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_hf_directory_with_wrong_shapes_is_refused_naming_the_tensor(tmp_path):
    write_hf_style_dir(gpt2_like(), tmp_path / "hf", n_embd=64, n_head=4)
    with pytest.raises(CheckpointError, match="wte.weight has shape"):
        load_pretrained(tmp_path / "hf")


def test_gpt2_vocab_and_merges_become_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat, the end"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2's original release ships them
    rebuilt = Tokenizer.from_str(tokenizer_json_from_hf_dir(tmp_path))
    text = "the cat sat, the mat"
    assert rebuilt.encode(text).ids == tok.encode(text).ids
    assert rebuilt.decode(rebuilt.encode(text).ids) == text

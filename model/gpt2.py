"""Our GPT <-> Hugging Face's GPT-2 (`GPT2LMHeadModel`): the config and state-dict mapping, in memory.

Config: n_positions <-> block_size; activation_function "gelu_new" <-> "gelu_tanh", "gelu" <->
"gelu"; GPT-2 is always pre-LN, learned positions, biases, causal, MLP width 4C. Weights: the same
names under "transformer."; HF's Conv1D stores (in, out), our nn.Linear (out, in), so c_attn,
c_proj and c_fc weights are transposed (c_attn's q|k|v order is the same). Files and transformers
itself are engine/formats/hf.py's business.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig
from .gpt import GPT

# HF's activation names that compute exactly our two GELUs (gelu_new, gelu_fast and gelu_pytorch_tanh
# are the same tanh formula).
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu": "gelu"}
_OUR_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved per layer (the causal mask): not weights, dropped on import.
_HF_BUFFERS = ("attn.bias", "attn.masked_bias")


# ---- config ---------------------------------------------------------------------------------------
def check_gpt2_expressible(model_config: dict | ModelConfig) -> ModelConfig:
    """Return the config if GPT-2's architecture can express it, else raise ValueError naming the setting."""
    cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig(**model_config)
    hint = "export with scripts/export.py instead (causalgpt's own pickle-free format)"
    reasons = {
        "norm": (cfg.norm == "pre", "GPT-2 is pre-LN"),
        "pos": (cfg.pos == "learned", "GPT-2 has learned position embeddings"),
        "tie_weights": (cfg.tie_weights, "GPT-2 ties the LM head to the token embedding"),
        "bias": (cfg.bias, "GPT-2 has biases in every Linear and LayerNorm"),
        "causal": (cfg.causal, "GPT-2 always applies the causal mask"),
    }
    for key, (ok, why) in reasons.items():
        if not ok:
            raise ValueError(f"model.{key}={getattr(cfg, key)} cannot be expressed as GPT-2 ({why}); {hint}")
    return cfg


def to_hf_config(model_config: dict | ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The config.json fields of GPT2Config for our model (refuses inexpressible models)."""
    cfg = check_gpt2_expressible(model_config)
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": _OUR_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,  # torch's nn.LayerNorm default, which our blocks use
        "tie_word_embeddings": True,
        # GPT2Config defaults these to 50256, which is outside a small vocabulary.
        "bos_token_id": eot_id, "eos_token_id": eot_id,
    }


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Our ModelConfig (as a dict) for an HF GPT-2 config.json; ValueError naming any setting we lack."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; only GPT-2 (model_type 'gpt2') loads")
    act = hf.get("activation_function", "gelu_new")
    n_embd = hf.get("n_embd", 768)
    checks = [
        (act in _HF_ACTIVATIONS, f"activation_function={act!r} (supported: {sorted(_HF_ACTIVATIONS)})"),
        (hf.get("n_inner") in (None, 4 * n_embd), f"n_inner={hf.get('n_inner')} (our MLP is 4 * n_embd)"),
        (abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12,
         f"layer_norm_epsilon={hf.get('layer_norm_epsilon')} (ours is 1e-5)"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (not hf.get("add_cross_attention", False), "add_cross_attention=true"),
    ]
    for ok, setting in checks:
        if not ok:
            raise ValueError(f"{where}: {setting} cannot be expressed by causalgpt's GPT")
    cfg = ModelConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                      n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                      dropout=0.0,  # inference default; a fine-tune sets model.dropout itself
                      bias=True, norm="pre", pos="learned", causal=True,
                      tie_weights=hf.get("tie_word_embeddings", True), activation=_HF_ACTIVATIONS[act])
    return cfg.to_dict()


# ---- weights --------------------------------------------------------------------------------------
def _in_block(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether `name` (ours, without "transformer.") is h.<i>.<one of suffixes>."""
    return name.startswith("h.") and name.split(".", 2)[2] in suffixes


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> GPT2LMHeadModel's (transformer.* names, Conv1D weights transposed)."""
    out = {}
    for name, t in state_dict.items():
        t = t.t() if _in_block(name, _TRANSPOSED) else t  # nn.Linear (out, in) -> Conv1D (in, out)
        out[name if name == "lm_head.weight" else "transformer." + name] = t.contiguous()
    layers = {int(k.split(".")[2]) for k in out if k.startswith("transformer.h.")}
    if layers != set(range(n_layer)):
        raise ValueError(f"state dict has layers {sorted(layers)}, model.n_layer={n_layer}")
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], model_config: dict[str, Any],
                       where: str = "model weights") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or bare GPT2Model's) state dict -> ours, checked against model_config."""
    cfg = ModelConfig(**model_config)
    sd = {}
    for name, t in hf_sd.items():
        name = name.removeprefix("transformer.")
        if not _in_block(name, _HF_BUFFERS):
            t = t.t() if _in_block(name, _TRANSPOSED) else t  # Conv1D (in, out) -> nn.Linear (out, in)
            sd[name] = t.float().contiguous()  # fp32 master weights, whatever the file stored
    if cfg.tie_weights:
        sd.pop("lm_head.weight", None)  # stored by some writers, always equal to wte when tied
        if "wte.weight" in sd:
            sd["lm_head.weight"] = sd["wte.weight"]
    with torch.device("meta"):  # the names and shapes cfg builds, without memory or initialisation
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: not a GPT-2 of this config.json (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(sd[name].shape)}, config.json implies {shape}")
    return sd

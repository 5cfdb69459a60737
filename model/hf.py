"""Conversion between our GPT and Hugging Face's GPT-2 (`GPT2LMHeadModel`), in both directions.

What maps to what:
  - config: n_positions <-> block_size; activation_function "gelu_new" <-> activation "gelu_tanh",
    "gelu" <-> "gelu"; GPT-2 is always pre-LN, learned positions, biases, causal, MLP width 4C.
  - weights: same names under a "transformer." prefix; HF's Conv1D stores (in, out), our nn.Linear
    (out, in), so c_attn, c_proj and c_fc weights are transposed; the q|k|v order of c_attn is the same.
  - tokenizer: a `tokenizers` JSON is written as tokenizer.json + tokenizer_config.json; our char
    vocabulary becomes a WordLevel model with one token per character (a round trip, see tests).

Reading an HF directory needs only safetensors (or torch with weights_only=True for .bin files);
only writing one (save_hf) imports transformers, lazily, so the extra stays optional.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .config import ModelConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "transformers is not installed; install the optional extra: pip install -e '.[hf]'"
# HF's activation names that compute exactly our two GELUs (gelu_new, gelu_fast and gelu_pytorch_tanh
# are the same tanh formula).
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu": "gelu"}
_OUR_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved per layer (the causal mask): not weights, dropped on import.
_HF_BUFFERS = ("attn.bias", "attn.masked_bias")
_EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


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
def to_hf_state_dict(state_dict: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our GPT state dict -> GPT2LMHeadModel's (transformer.* names, Conv1D weights transposed)."""
    out = {}
    for name, t in state_dict.items():
        if name == "lm_head.weight":
            out[name] = t.contiguous()
            continue
        if name.startswith("h.") and name.split(".", 2)[2] in _TRANSPOSED:
            t = t.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        out["transformer." + name] = t.contiguous()
    _check_layers(out, n_layer, prefix="transformer.h.")
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], model_config: dict[str, Any],
                       where: str = "model weights") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or bare GPT2Model's) state dict -> ours, checked against model_config."""
    cfg = ModelConfig(**model_config)
    sd = {}
    for name, t in hf_sd.items():
        name = name.removeprefix("transformer.")
        if name.startswith("h.") and name.split(".", 2)[2] in _HF_BUFFERS:
            continue
        if name.startswith("h.") and name.split(".", 2)[2] in _TRANSPOSED:
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        sd[name] = t.float().contiguous()  # fp32 master weights, whatever the file stored
    if cfg.tie_weights:
        sd.pop("lm_head.weight", None)  # stored by some writers, always equal to wte when tied
        if "wte.weight" in sd:
            sd["lm_head.weight"] = sd["wte.weight"]
    expected = _expected_shapes(cfg)
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{where}: not a GPT-2 of this config.json (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]})")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(sd[name].shape)}, config.json implies {shape}")
    return sd


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C), "ln_f.weight": (C,),
              "ln_f.bias": (C,), "lm_head.weight": (V, C)}
    for i in range(cfg.n_layer):
        for ln in ("ln_1", "ln_2"):
            shapes[f"h.{i}.{ln}.weight"] = shapes[f"h.{i}.{ln}.bias"] = (C,)
        for mod, (n_out, n_in) in (("attn.c_attn", (3 * C, C)), ("attn.c_proj", (C, C)),
                                   ("mlp.c_fc", (4 * C, C)), ("mlp.c_proj", (C, 4 * C))):
            shapes[f"h.{i}.{mod}.weight"], shapes[f"h.{i}.{mod}.bias"] = (n_out, n_in), (n_out,)
    return shapes


def _check_layers(sd: dict, n_layer: int, prefix: str) -> None:
    layers = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if layers != set(range(n_layer)):
        raise ValueError(f"state dict has layers {sorted(layers)}, model.n_layer={n_layer}")


# ---- reading an HF GPT-2 directory (no transformers needed) ----------------------------------------
def is_hf_gpt2_dir(path: Path) -> bool:
    """True for a directory whose config.json says model_type gpt2."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "gpt2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_hf_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A local HF GPT-2 directory as a checkpoint-like dict (model, model_config, tokenizer, source)."""
    path = Path(path).expanduser()
    hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_config = model_config_from_hf(hf_config, where=str(path / "config.json"))
    files = _weight_files(path)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(_read_weights(f, device))
    sd = from_hf_state_dict(hf_sd, model_config, where=str(files[0] if len(files) == 1 else path))
    return {"model": sd, "model_config": model_config, "tokenizer": tokenizer_json_from_hf_dir(path),
            "source": "hf"}


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, else its sharded index, else pytorch_model.bin (or its index)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{path} has a GPT-2 config.json but no model.safetensors or pytorch_model.bin")


def _read_weights(f: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(f, device=str(device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from e
    try:  # weights_only: a .bin is a pickle, and must not run code on load
        sd = torch.load(f, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{f} is not a loadable weights-only torch file ({type(e).__name__})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f} does not hold a state dict")
    return sd


# ---- tokenizers -----------------------------------------------------------------------------------
def tokenizer_json_from_hf_dir(path: Path) -> str | None:
    """The directory's tokenizer.json, else one built from GPT-2's vocab.json + merges.txt, else None.

    Returned in `tokenizers`' canonical form (Tokenizer.to_str), the same string data/ stores for a
    run prepared with this tokenizer.json, so a fine-tune can check the two match by equality."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    if (path / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()
        except Exception as e:  # the Rust binding raises plain Exception for any parse error
            raise CheckpointError(f"{path / 'tokenizer.json'} is not a valid tokenizer.json ({e})") from e
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok.to_str()
    log.warning("%s has no tokenizer.json (nor vocab.json + merges.txt): loading the model without one", path)
    return None


def hf_tokenizer_files(tokenizer_json: str, model_max_length: int) -> tuple[dict[str, str], int | None]:
    """tokenizer.json and tokenizer_config.json contents that AutoTokenizer loads, and the eot id.

    A `tokenizers` JSON is written as is. Our char vocabulary ({"kind": "char", ...}) becomes a
    WordLevel model over its characters with a pre-tokenizer that isolates every character
    ([\\s\\S], since "." skips newlines) and a Fuse decoder (join without spaces): same ids, same text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    obj = json.loads(tokenizer_json)
    if isinstance(obj, dict) and obj.get("kind") == "char":
        vocab = {c: i for i, c in enumerate(obj["chars"])}
        unk = "<unk>" if obj.get("unk") else None
        if unk:
            vocab[unk] = len(obj["chars"])  # our CharTokenizer puts <unk> last
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or "<unk>"))  # absent unk: encode errors
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok = Tokenizer.from_str(tokenizer_json)
    eot = next((t for t in _EOT_TOKENS if tok.token_to_id(t) is not None), None)
    # tokenizer_class must be explicit: with model_type gpt2 AutoTokenizer would otherwise pick
    # GPT2Tokenizer, which re-applies GPT-2's own pre-tokenizer and breaks other vocabularies.
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}
    if eot is not None:
        tok_config.update(bos_token=eot, eos_token=eot)
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(tok_config, indent=2)}
    return files, None if eot is None else tok.token_to_id(eot)


# ---- writing an HF directory (needs transformers) --------------------------------------------------
def require_transformers() -> Any:
    """Import transformers, or raise ImportError with the one-line install hint."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return transformers


def save_hf(ckpt: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Write ckpt (model, model_config, tokenizer) as an HF GPT-2 directory; returns the file names.

    Refuses (ValueError naming the setting) before importing anything heavy when GPT-2 cannot
    express the model. transformers writes config.json, generation_config.json and model.safetensors
    itself, so the files match what its loader expects in whatever version is installed.
    """
    cfg = check_gpt2_expressible(ckpt["model_config"])
    transformers = require_transformers()
    out_dir = Path(out_dir)
    tok_files, eot_id = ({}, None)
    if ckpt.get("tokenizer"):
        tok_files, eot_id = hf_tokenizer_files(ckpt["tokenizer"], cfg.block_size)
    hf_config = transformers.GPT2Config(**to_hf_config(cfg, eot_id))
    with torch.device("meta"):  # skip a random init that the weights below replace (minutes for gpt2-xl)
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    if any(True for _ in hf_model.buffers()):  # older versions keep a mask buffer: it must be real
        hf_model = transformers.GPT2LMHeadModel(hf_config)
    sd = to_hf_state_dict(ckpt["model"], cfg.n_layer)
    result = hf_model.load_state_dict(sd, strict=False, assign=True)
    hf_model.tie_weights()
    # Only those mask buffers (absent from our dict) may be missing; anything else is a mismatch.
    missing = [k for k in result.missing_keys if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit GPT2LMHeadModel: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
    hf_model.save_pretrained(out_dir, max_shard_size="1000GB")  # one model.safetensors, not shards
    for name, text in tok_files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return sorted(p.name for p in out_dir.iterdir())

"""ModelConfig: the schema of configs/model/*.yaml, and the named size presets.

A config names a preset (`tiny`, `small`, `gpt2`, `gpt2-medium`) and may override any field;
fields left as None are filled from the preset in `__post_init__`, so each size is written down
in exactly one place (PRESETS below). Every choice is validated here, once, with a ValueError
that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMS = ("post", "pre")
POSITIONS = ("learned", "sinusoidal", "rope")
ATTENTIONS = ("explicit", "sdpa")
ACTIVATIONS = ("gelu", "gelu_tanh")

# The one place where each named size is defined. `tiny` trains on a laptop CPU in about a minute;
# `small` is nanoGPT's shakespeare_char model; `gpt2*` are GPT-2's shapes (pre-LN, learned positions).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, norm="post", pos="learned"),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, norm="post", pos="learned"),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                 norm="pre", pos="learned", activation="gelu_tanh"),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257,
                        norm="pre", pos="learned", activation="gelu_tanh"),
}


@dataclass
class ModelConfig:
    # Named size preset that fills every field left as None (tiny | small | gpt2 | gpt2-medium).
    preset: str | None = None
    # Number of token ids; None until the prepared data (meta.json) fills it in the trainer.
    vocab_size: int | None = None
    # Longest context the model is trained on (T); also the size of learned position tables.
    block_size: int | None = None
    # Number of transformer blocks.
    n_layer: int | None = None
    # Number of attention heads (nh); head size hs = n_embd // n_head.
    n_head: int | None = None
    # Width of the residual stream (C).
    n_embd: int | None = None
    # Dropout on attention weights and on each residual branch (0 for pre-training small data runs).
    dropout: float = 0.0
    # Biases in Linear and LayerNorm layers (GPT-2 has them).
    bias: bool = True
    # "post": the article's block, x = LN(x + f(x)); "pre": GPT-2's, x = x + f(LN(x)), plus a final LN.
    norm: str | None = None
    # Position information: "learned" table, fixed "sinusoidal" table, or "rope" rotations of q and k.
    pos: str | None = None
    # Attention implementation: "explicit" (the math step by step, can return weights) or "sdpa" (fused).
    attn: str = "sdpa"
    # The causal mask. False exists only to demonstrate leakage; never train a language model so.
    causal: bool = True
    # Share the token embedding matrix with the LM head.
    tie_weights: bool = True
    # MLP activation: exact "gelu", or "gelu_tanh" (GPT-2's approximation, needed for GPT-2 weights);
    # None: the preset's, else "gelu".
    activation: str | None = None
    # RoPE base frequency.
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"model.preset={self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        for key in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) is None:
                raise ValueError(f"model.{key} is not set: give it, or choose a preset (model.preset=tiny)")
        self.norm = self.norm or "post"
        self.pos = self.pos or "learned"
        self.activation = self.activation or "gelu"
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        for key, choices in (("norm", NORMS), ("pos", POSITIONS), ("attn", ATTENTIONS),
                             ("activation", ACTIVATIONS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not valid; choose one of {list(choices)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}; "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if self.pos == "rope" and self.head_size % 2 != 0:
            raise ValueError(f"model.pos=rope needs an even head size, but n_embd/n_head = {self.head_size}; "
                             "change model.n_embd or model.n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """Plain-data form stored in checkpoints (loads back with ModelConfig(**d))."""
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        return cls(preset=name, **overrides)

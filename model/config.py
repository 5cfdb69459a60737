"""ModelConfig: the schema of configs/model/*.yaml.

The named sizes (`tiny`, `small`, `gpt2`, `gpt2-medium`) are written down once, each in its YAML
file, which lists every field; Hydra composes `model=<name>` with any override, and code outside
Hydra reads a file with `cli.model_preset(name)`. Every choice is validated here, once, with a
ValueError that names the field and says how to fix it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ModelConfig:
    # The name of the size this config came from (configs/model/<preset>.yaml): a label for run
    # names and W&B tags; the sizes themselves are the fields below.
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
    norm: str = "post"
    # Position information: "learned" table, fixed "sinusoidal" table, or "rope" rotations of q and k.
    pos: str = "learned"
    # Attention implementation: "explicit" (the math step by step, can return weights) or "sdpa" (fused).
    attn: str = "sdpa"
    # The causal mask. False exists only to demonstrate leakage; never train a language model so.
    causal: bool = True
    # Share the token embedding matrix with the LM head.
    tie_weights: bool = True
    # MLP activation: exact "gelu", or "gelu_tanh" (GPT-2's approximation, needed for GPT-2 weights).
    activation: str = "gelu"
    # RoPE base frequency.
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if value is None and key != "vocab_size":  # the vocabulary may come from the data later
                raise ValueError(f"model.{key} is not set: give it, or start from a named size (model=tiny)")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
        for key, choices in (("norm", ("post", "pre")), ("pos", ("learned", "sinusoidal", "rope")),
                             ("attn", ("explicit", "sdpa")), ("activation", ("gelu", "gelu_tanh"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not valid; choose one of {list(choices)}")
        for failed, message in (
            (self.n_embd % self.n_head != 0, f"model.n_embd={self.n_embd} must be divisible by model.n_head="
             f"{self.n_head}; try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"),
            (self.pos == "rope" and self.head_size % 2 != 0, "model.pos=rope needs an even head size, but "
             f"n_embd/n_head = {self.head_size}; change model.n_embd or model.n_head"),
            (not 0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}"),
            (self.rope_theta <= 0, f"model.rope_theta must be positive, got {self.rope_theta}"),
        ):
            if failed:
                raise ValueError(message)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """Plain-data form stored in checkpoints (loads back with ModelConfig(**d))."""
        return asdict(self)

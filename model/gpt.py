"""GPT: token embedding + positions, a stack of masked-attention blocks, and a tied LM head.

    logits, loss = GPT(config)(idx, targets)     # idx (B, T) int64 -> logits (B, T, vocab)

Also here: `init_weights` (GPT-2's scheme), parameter and FLOP counts for MFU, `trace` (hidden states,
attention weights and input embeddings, for the leakage demonstration), and the cached steps that
generation (model/generate.py) runs: `step` (eager) and `decode`, its static-shape form (compiled).

Shape legend: B batch, T time, C channels (n_embd), V vocab, nh heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache
from .block import TransformerBlock
from .config import ModelConfig
from .generate import generate_tokens
from .linear import Linear
from .positions import rope_table, sinusoidal_table


@dataclass
class Trace:
    """Everything the analysis tools look at for one forward pass."""
    logits: torch.Tensor  # (B, T, V)
    embeds: torch.Tensor  # (B, T, C): token (+ position) embeddings fed to the first block
    hidden: list[torch.Tensor]  # n_layer x (B, T, C): the output of each block
    attentions: list[torch.Tensor] | None  # n_layer x (B, nh, T, T), when asked for


def embedding(n: int, dim: int) -> nn.Embedding:
    """nn.Embedding; on the meta device without its own N(0, 1) init: there is nothing to fill, and
    torch's normal_ for meta tensors imports torch._dynamo (half a second of sample.py's start-up)."""
    if torch.empty(0).is_meta:
        return nn.Embedding(n, dim, _weight=torch.empty(n, dim))
    return nn.Embedding(n, dim)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is not set: pass ModelConfig(vocab_size=...); "
                             "the trainer fills it from the prepared data's meta.json")
        self.config = config
        self.wte = embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":  # fixed, so a buffer (not saved: it is rebuilt from the config)
            self.register_buffer("pe", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        # Post-LN blocks already end in a LayerNorm; pre-LN needs one before the head.
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "pre" else nn.Identity()
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for weights, zero biases, and the projections that write
        into the residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth."""
        if self.wte.weight.is_meta:  # built for its shapes, or for weights about to be loaded: nothing to fill
            return
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()  # ones and zeros

    # ---- forward passes ---------------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) at absolute positions start_pos.. (or at `positions` (T,), a tensor)
        -> input embeddings (B, T, C)."""
        T = idx.shape[1]
        if positions is None and start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than model.block_size="
                             f"{self.config.block_size}; crop the input to the last block_size tokens")
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos in ("learned", "sinusoidal"):
            table = self.wpe.weight if self.config.pos == "learned" else self.pe  # (block_size, C)
            # A slice for consecutive positions: one view, where a lookup would first build an arange.
            x = x + (table[start_pos:start_pos + T] if positions is None else table[positions])  # (B, T, C)
        return x

    def rope(self, T: int, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """The RoPE rotations of positions start_pos.. (or `positions`) (T, hs/2), computed once per
        pass for every layer; None unless pos="rope"."""
        if self.config.pos != "rope":
            return None
        c = self.config
        table = rope_table(c.block_size, c.head_size, c.rope_theta, self.wte.weight.device)  # (block_size, hs/2)
        return table[start_pos:start_pos + T] if positions is None else table[positions]  # (T, hs/2)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V) for every position, and the mean cross-entropy against
        targets (B, T) when given (positions with target -1 are ignored)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        x = self.drop(self.embed(idx))
        rope = self.rope(idx.shape[1])
        for block in self.h:
            x, _ = block(x, rope=rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def trace(self, idx: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
              need_weights: bool = False) -> Trace:
        """A forward pass that keeps the input embeddings, every block's output and (optionally) the
        attention weights. Give `embeds` (B, T, C) instead of idx to differentiate with respect to them."""
        if embeds is None:
            embeds = self.embed(idx)
        hidden, attentions = [], []
        x = self.drop(embeds)
        rope = self.rope(embeds.shape[1])
        for block in self.h:
            x, weights = block(x, rope=rope, need_weights=need_weights)
            hidden.append(x)
            attentions.append(weights)
        logits = self.lm_head(self.ln_f(hidden[-1]))  # (B, T, V)
        return Trace(logits, embeds, hidden, attentions if need_weights else None)

    def new_caches(self, batch_size: int) -> list[KVCache]:
        """One empty KV cache per layer, sized for block_size positions, in the dtype the keys and
        values come out as: the autocast dtype under autocast (a float32 cache would double the
        memory read per step), else the weights' dtype."""
        c, device = self.config, self.wte.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.wte.weight.dtype
        return [KVCache(batch_size, c.n_head, c.block_size, c.head_size, device, dtype) for _ in range(c.n_layer)]

    def step(self, idx: torch.Tensor, caches: list[KVCache], start_pos: int = 0,
             positions: torch.Tensor | None = None) -> torch.Tensor:
        """Feed new tokens idx (B, T) at positions start_pos.. through the caches (appended after
        their valid positions); return the logits of the last position (B, V). A prefill is a step
        with the whole prompt. With `positions`, the static-shape form (see decode)."""
        x = self.embed(idx, start_pos, positions)
        if self.training:  # dropout is the identity in eval: skip the call on the per-token path
            x = self.drop(x)
        rope = self.rope(idx.shape[1], start_pos, positions)
        for block, cache in zip(self.h, caches, strict=True):
            x, _ = block(x, rope=rope, cache=cache, positions=positions)
        return self.lm_head(self.ln_f(x[:, -1, :]))  # (B, V)

    def decode(self, idx: torch.Tensor, caches: list[KVCache], positions: torch.Tensor) -> torch.Tensor:
        """step with idx (B, T) at positions (T,), a tensor, written into the caches there, attention
        over each whole cache under a length mask. No shape and no Python value depends on the
        position, so one compiled graph (and one CUDA graph) serves every decode step. Positions must
        be < block_size (unchecked: a check would read the tensor back from the device)."""
        return self.step(idx, caches, positions=positions)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
        vocab_limit: sample only ids below it (a vocabulary padded past the tokenizer's)."""
        new = list(generate_tokens(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, use_cache=use_cache, generator=generator,
                                   vocab_limit=vocab_limit))
        return torch.cat([idx, *new], dim=1) if new else idx

    # ---- sizes ------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once). non_embedding=True leaves out the tables that
        are only looked up (positions; the token table too when it is not the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.pos == "learned":
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * nh * hs * T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_size * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

"""The causalgpt model: a decoder-only transformer built around masked multi-head attention."""

from .attention import KVCache, MaskedMultiHeadAttention
from .block import MLP, TransformerBlock
from .config import ModelConfig
from .gpt import GPT, Trace

__all__ = ["GPT", "KVCache", "MLP", "MaskedMultiHeadAttention", "ModelConfig", "Trace", "TransformerBlock"]

"""File formats: our export and Hugging Face GPT-2 directories, and `load_pretrained`, one loader for
every model file (pretrained.py; HF directories: hf.py). Training checkpoints are engine/checkpoint.py's;
the in-memory mapping between our parameter names and GPT-2's is model/gpt2.py.
"""

from .pretrained import from_pretrained, load_pretrained

__all__ = ["from_pretrained", "load_pretrained"]

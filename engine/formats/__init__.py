"""File formats: our export and Hugging Face GPT-2 directories, and `load_pretrained`, one loader for
every model file (pretrained.py; HF directories: hf.py). Training checkpoints are engine/checkpoint.py's;
the in-memory mapping between our parameter names and GPT-2's is model/gpt2.py.
"""

from ..checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .pretrained import from_pretrained, load_pretrained

__all__ = ["CheckpointError", "from_pretrained", "load_checkpoint", "load_pretrained", "model_from_checkpoint",
           "save_checkpoint"]

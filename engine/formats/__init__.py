"""File formats: our export and Hugging Face directories, and one loader for every model file
(training checkpoints themselves are engine/checkpoint.py's).

- pretrained.py  `load_pretrained(path)`: a checkpoint, a run directory, our safetensors export or a
                 Hugging Face GPT-2 directory, told apart by what is on disk; our export format
- hf.py          Hugging Face GPT-2 directories: read without transformers, written with it

model/ stays the network alone (it reads and writes no file); the mapping between our parameter
names and GPT-2's, which touches no disk, is model/gpt2.py.
"""

from ..checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .pretrained import from_pretrained, load_pretrained

__all__ = ["CheckpointError", "from_pretrained", "load_checkpoint", "load_pretrained", "model_from_checkpoint",
           "save_checkpoint"]

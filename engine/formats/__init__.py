"""File formats: everything that turns a model into files and files back into a model.

- checkpoint.py  training checkpoints (.pt, weights_only-loadable plain data), written atomically
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

"""The data package: raw text -> token files -> training batches.

- config.py     DataConfig (schema of configs/data/*.yaml) and DataError
- sources.py    where text comes from (tiny Shakespeare, the Python stdlib, files, HF datasets)
- tokenizer.py  char-level and byte-level BPE tokenizers behind one interface, StreamDecoder
- prepare.py    prepare(cfg) -> cached directory of train.bin / val.bin / meta.json / tokenizer.json
- loader.py     BatchLoader (random windows, DDP-aware, resumable) and val_batches

Only the config is imported here, so `import data` stays cheap; import the modules you use.
"""

from data.config import DataConfig, DataError

__all__ = ["DataConfig", "DataError"]

"""The data package: raw text -> token files -> training batches.

- config.py     DataConfig (schema of configs/data/*.yaml), DataError and warn_user
- sources.py    where text comes from (open_corpus -> Corpus): tiny Shakespeare, the Python stdlib,
                local files, Hugging Face datasets (hub, local save_to_disk, builders)
- tokenizer.py  char-level and byte-level BPE tokenizers behind one interface, decode_stream
- hub.py        what comes from the Hugging Face hub, pinned to a commit (no remote code)
- prepare.py    prepare(cfg) -> cached directory of train.bin / val.bin / meta.json / tokenizer.json,
                safe to call from every rank at once
- prepared.py   the layout of a prepared directory: read_meta and the checks against meta.json
- atomic.py     atomic writes (temp file, fsync, rename, directory fsync) and the builders' file lock (filelock)
- loader.py     BatchLoader (random windows, DDP-aware, resumable) and val_batches
- progress.py   progress of long work: a bar on a terminal, else a log line with the time left

Only the config is imported here, so `import data` stays cheap; import the modules you use.
"""

from data.config import DataConfig, DataError

__all__ = ["DataConfig", "DataError"]

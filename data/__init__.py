"""The data package: raw text -> token files -> training batches.

sources.py (where text comes from) -> tokenizer.py (char-level or byte-level BPE) -> prepare.py
(a cached directory of train.bin / val.bin / meta.json / tokenizer.json, whose layout and checks
are prepared.py) -> loader.py (BatchLoader, val_batches). config.py holds DataConfig and DataError;
hub.py what comes from the Hugging Face hub; atomic.py atomic writes and the builders' file lock;
progress.py the progress of long work.

Nothing is imported here, so `import data` stays cheap; import the modules you use.
"""

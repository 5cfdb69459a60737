"""The training engine: small helpers that train.py's loop calls. No Hydra here (they take dataclasses).

- config.py     TrainConfig, OptimConfig, LoggerConfig: the schemas of configs/train.yaml, optim/, logger/
- runtime.py    setup_runtime(): rank, world size, device, precision, autocast, compile, CPU threads
- parallel.py   DDP / FSDP2 wrapping, gradient-sync toggling, full (unsharded) state dicts
- optim.py      AdamW (decay on 2-D weights only) or Muon + AdamW; warmup + cosine / WSD / constant schedules
- guard.py      the optimiser update skipped on a NaN/inf loss, decided on the device (no host sync)
- state.py      checkpoint payloads, RNG states, what resume= means, LoopState, TrainingError
- evaluate.py   loss over fixed batches (DDP/FSDP-aware), a generated sample
- metrics.py    metrics.jsonl and Weights & Biases (imported lazily)
- signals.py    SIGTERM / Ctrl-C: save last.pt, then stop cleanly
- formats/      file formats: checkpoints, our safetensors export, Hugging Face GPT-2 directories,
                and load_pretrained(path), which tells them apart
"""

"""The training engine: small helpers that train.py's loop calls. No Hydra here (they take dataclasses).

- config.py     TrainConfig, OptimConfig, LoggerConfig: the schemas of configs/train.yaml, optim/, logger/
- runtime.py    setup_runtime(): rank, world size, device, precision, autocast, compile, CPU threads
- parallel.py   DDP / FSDP2 wrapping; telling a lost peer from a failure
- optim.py      AdamW (decay on 2-D weights only) or Muon + AdamW; warmup + cosine / WSD / constant schedules
- step.py       the optimisation step, defined once; its NaN/inf guard decided on the device (no host sync)
- state.py      TrainState (Stateful): model, optimizer, scaler, counters, data position, RNG; ranks that fail together; what resume= means
- checkpoint.py the one checkpoint module: write (atomic, history), read (validation), choose (the order)
- evaluate.py   loss over fixed batches (DDP/FSDP-aware), a generated sample
- metrics.py    metrics.jsonl and Weights & Biases (imported lazily)
- signals.py    SIGTERM / Ctrl-C: save last.pt, then stop cleanly
- formats/      model files: our safetensors export, Hugging Face GPT-2 dirs; load_pretrained() tells them apart
"""

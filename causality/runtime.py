"""Device, precision and compile set-up for inference (sampling, benchmarks, the leakage checks).

Device and precision are resolved by the trainer's own helpers (engine/runtime.py), so `device=auto`
and `precision=auto` mean the same in train.py and sample.py; inference adds no process group.
"""

from __future__ import annotations

import contextlib

import torch

from engine.runtime import DTYPES, pick_device, pick_precision
from model import GPT


def resolve(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    """The device and autocast dtype, chosen exactly as the trainer chooses them (engine/runtime.py):
    auto -> cuda, else mps, else cpu; bf16 on CUDA that supports it, fp16 on older CUDA, fp32 elsewhere."""
    dev = pick_device(device)
    return dev, DTYPES[pick_precision(precision, dev)]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes; a no-op in fp32, so fp32 results stay bit-exact."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_for_generation(model: GPT) -> GPT:
    """Compile what generation runs: `model.step` (prefill and one-token decode with the KV cache)
    and `forward` (recompute without the cache). model/generate.py calls these two by name, so the
    compiled versions are installed on the instance; the weights are shared, nothing is copied.
    dynamic=True because the cache length and the prompt length change from call to call."""
    model.step = torch.compile(model.step, dynamic=True)  # type: ignore[method-assign]
    model.forward = torch.compile(model.forward, dynamic=True)  # type: ignore[method-assign]
    return model


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

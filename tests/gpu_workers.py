"""The GPU suite's workers, each run as its own process by tests/test_gpu_figures.py (scale, fsdp) and
scripts/gpu_suite.py (env): `python tests/gpu_workers.py env|scale|fsdp SPEC` prints one JSON line."""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from test_gpu_figures import FIGURES, ROOT  # this file runs as a script: tests/ is on sys.path


def one_step(spec: dict, preset: str, mode: str) -> dict:
    """Build the preset on the device and train one step (forward, backward, clip, AdamW) in mode
    plain, checkpointed (each block recomputed in backward) or fsdp; peak memory over all of it."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    import cli
    from engine.config import OptimConfig
    from engine.optim import build_optimizer
    from engine.parallel import wrap_model
    from engine.runtime import Runtime, setup_runtime
    from engine.step import clip_grad_norm
    from model import GPT, ModelConfig

    class Checkpointed(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor, **kwargs):
            return checkpoint(self.block, x, use_reentrant=False, **kwargs)

    class OneRank(Runtime):  # engine.parallel shards only when distributed: one rank counts here
        @property
        def distributed(self) -> bool:
            return True

    rt = setup_runtime(spec["device"], spec["precision"], "false", 1 if spec["device"] == "cpu" else 0)
    cfg = ModelConfig(**{**cli.model_preset(preset), **({"block_size": spec["block_size"]} if spec["block_size"] else {})})
    cuda = rt.device_type == "cuda"
    gc.collect()  # the previous variant's model and optimizer: gone before this one is measured
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        with rt.device:
            model = GPT(ModelConfig(**{**cfg.to_dict(), "vocab_size": cfg.vocab_size or 65}))
        train_model = model
        if mode == "checkpointed":
            model.h = nn.ModuleList(Checkpointed(b) for b in model.h)
        elif mode == "fsdp":
            import torch.distributed as dist
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{spec['store']}", rank=0,
                                    world_size=1, **({"device_id": rt.device} if cuda else {}))
            rt = OneRank(**{k: getattr(rt, k) for k in ("rank", "local_rank", "world_size", "device", "precision",
                                                        "compile")})
            train_model, _ = wrap_model(model, rt, "fsdp")
        optimizer = build_optimizer(model, OptimConfig(), rt.device_type)
        x = torch.randint(0, model.config.vocab_size, (spec["batch_size"], cfg.block_size + 1), device=rt.device)
        with rt.autocast():
            _, loss = train_model(x[:, :-1], x[:, 1:])  # (B, T) inputs and targets
        loss.backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
    except torch.cuda.OutOfMemoryError as e:
        return {"ok": False, "error": f"out of memory: {str(e).splitlines()[0]}", "mem_mb": None}
    finally:
        if mode == "fsdp":
            rt.close()
    return {"ok": True, "error": None, "loss": round(loss_value, 4), "step_s": round(time.perf_counter() - t0, 3),
            "mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "params": model.num_params(), "block_size": cfg.block_size}


def worker_scale(spec: dict) -> dict:
    out = {"preset": None, "params": None, "batch_size": spec["batch_size"], "block_size": None, "tried": [],
           "plain": None, "checkpointed": None}
    for preset in spec["presets"]:  # largest first
        plain, ckpt = one_step(spec, preset, "plain"), one_step(spec, preset, "checkpointed")
        out["tried"].append({"preset": preset, "plain": plain["ok"], "checkpointed": ckpt["ok"]})
        if plain["ok"] or ckpt["ok"]:
            done = plain if plain["ok"] else ckpt
            out.update(preset=preset, params=done["params"], block_size=done["block_size"], plain=plain,
                       checkpointed=ckpt)
            break
    return out


def worker_fsdp(spec: dict) -> dict:
    store = Path(tempfile.mkdtemp(prefix="gpu_figures-")) / "store"  # the file store wants a path not there yet
    try:
        return one_step({**spec, "store": str(store)}, spec["presets"][0], "fsdp")
    finally:
        store.unlink(missing_ok=True)
        store.parent.rmdir()


def worker_env(spec: dict) -> dict:
    """Versions, the device and whether Hydra imports, for the suite's report."""
    import importlib.metadata
    import platform

    from engine.runtime import setup_runtime

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
        hydra_ok = True
    except ImportError:
        hydra_ok = False
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), device_name=platform.processor() or platform.machine(),
                capability=None, precision_auto="fp32", peak_flops=None, cpus=os.cpu_count(), hydra=hydra_ok,
                packages={d: version(d) for d in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "numpy",
                          "tokenizers", "tqdm", "safetensors", "matplotlib", "pytest", "triton", "wandb", "datasets")})
    if info["cuda_available"]:
        rt = setup_runtime("cuda", "auto", "false")
        info.update(device_name=torch.cuda.get_device_name(0), precision_auto=rt.precision, peak_flops=rt.peak_flops(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return {**info, "figures": FIGURES}  # the suite's record of a part that did not run


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps({"env": worker_env, "scale": worker_scale, "fsdp": worker_fsdp}[sys.argv[1]](json.loads(sys.argv[2]))))

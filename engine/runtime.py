"""The one runtime-setup function, so that the same train.py runs on a CPU, one GPU, or under
`torchrun --nproc_per_node=N`: `setup_runtime` reads torchrun's environment, joins the process group
(gloo on CPU, nccl on CUDA), resolves device, precision and compile, and returns them in one
`Runtime`. Nothing happens at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import logging
import os
import re
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak FLOP/s (vendor data sheets) by GPU model and form factor (None: any),
# for MFU. Matched whole (peak_flops_for): an L40 is no L4, an H100 PCIe no SXM. A GPU not listed gets no
# MFU (an honest blank, not a neighbour's figure); `peak_flops=` gives one by hand.
PEAK_FLOPS: dict[tuple[str, str | None], float] = {
    ("H100", "SXM"): 989e12, ("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12,
    ("H200", "SXM"): 989e12, ("H200", "NVL"): 835e12, ("GH200", None): 989e12,
    ("A100", None): 312e12,
    ("L4", None): 121e12, ("L40", None): 181e12, ("L40S", None): 362e12,
    ("RTX 4090", None): 165e12, ("RTX 3090", None): 71e12,
    ("V100", None): 125e12,  # fp16 (no bf16)
}
_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE"}
_FORM_WORDS = {"PCIE": "PCIe", "NVL": "NVL"}  # and SXM<n>; neither: an SXM board ("NVIDIA H100 80GB HBM3")
_MEMORY_WORD = re.compile(r"\d+GB|HBM\w*")


def peak_flops_for(name: str) -> float | None:
    """PEAK_FLOPS of a torch.cuda.get_device_name ("NVIDIA A100-SXM4-80GB"), or None: its model is the
    name without vendor, memory and form-factor words."""
    words = [w for w in re.split(r"[\s_-]+", name.upper()) if w and w not in _VENDOR_WORDS]
    form = next((_FORM_WORDS[w] for w in words if w in _FORM_WORDS), "SXM")
    model = " ".join(w for w in words if w not in _FORM_WORDS and not re.fullmatch(r"SXM\d*", w)
                     and not _MEMORY_WORD.fullmatch(w))
    return PEAK_FLOPS.get((model, form), PEAK_FLOPS.get((model, None)))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Runtime:
    rank: int  # global rank (0 in a single process)
    local_rank: int  # rank on this machine: picks the GPU
    world_size: int
    device: torch.device
    precision: str  # resolved: bf16 | fp16 | fp32
    compile: bool

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (fp32: no autocast, weights and activations in float32)."""
        return DTYPES[self.precision]

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (weights stay fp32; matmuls run in dtype)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def peak_flops(self, override: float | None = None) -> float | None:
        """Peak FLOP/s for MFU: the override, else PEAK_FLOPS by GPU name, else None (CPU, fp32, unlisted)."""
        if override:
            return float(override)
        if self.device_type == "cuda" and self.precision != "fp32":  # fp32 peaks differ: no guess
            return peak_flops_for(torch.cuda.get_device_name(self.device))
        return None

    def max_over_ranks(self, value: float) -> float:
        """The largest of every rank's value (one small all-reduce; free in one process), so that all
        ranks stop together, or run as many forwards as the rank with the most batches."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def close(self, failed: bool = False) -> None:
        """Leave the process group, all ranks at once. After a failure NCCL's is aborted instead:
        destroying it would wait for collectives that the other ranks will never join."""
        if dist.is_available() and dist.is_initialized():
            if failed and dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                # Together: a rank tearing down its gloo pairs while another still has work in flight
                # with it (FSDP's last collectives) aborted that one at exit (terminate called...).
                # The DDP/FSDP wrappers hold the group in reference cycles: collected now, not at exit.
                gc.collect()
                with contextlib.suppress(RuntimeError):  # a peer is gone already: nothing left to wait for
                    dist.barrier()
                dist.destroy_process_group()


def pick_device(name: str) -> torch.device:
    """auto: cuda, else mps, else cpu; a device named but missing here is refused."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in available.items() if ok))
    if name not in available:
        raise ValueError(f"device={name!r} is not valid; choose one of ['auto', 'cpu', 'cuda', 'mps']")
    if not available[name]:
        raise ValueError(f"device={name} was asked for but is not available here; use device=auto or cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":  # CPU autocast to bf16 is slower than fp32 on most CPUs, and mps is patchy
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"precision={name!r} is not valid; choose one of ['auto', 'bf16', 'fp16', 'fp32']")
    return name


def setup_runtime(device: str = "auto", precision: str = "auto", compile: str = "auto",
                  threads: int = 0, dist_timeout_s: float = 1800) -> Runtime:
    """Join torchrun's process group if launched by it, and resolve device, precision and compile.
    dist_timeout_s: how long a collective waits for the other ranks before it fails."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        # TF32 matmuls and convolutions: ~free speed for the fp32 parts on Ampere and newer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "mps":
            raise ValueError("torchrun with device=mps is not supported; use device=cpu (gloo) or CUDA")
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=(
            dev if dev.type == "cuda" else None), timeout=datetime.timedelta(seconds=dist_timeout_s))
    if dev.type == "cpu":
        _set_cpu_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        _keep_freed_memory()
    resolved = pick_precision(precision, dev)
    do_compile = dev.type == "cuda" if compile == "auto" else compile == "true"
    if dev.type == "cpu" and resolved == "fp16" and rank == 0 and not (flags := cpu_flags()) & {"avx512_fp16", "amx_fp16"}:
        log.warning("precision=fp16 on a CPU without fp16 math (no AVX512-FP16 or AMX-FP16): every op converts, "
                    "and a training step runs ~7-16x slower than fp32 (measured on AVX-512 and AVX2 CPUs); "
                    "use precision=bf16%s or fp32", " (this CPU has AVX512-BF16)" if "avx512_bf16" in flags else "")
    log.info("runtime: rank %d/%d, device %s, precision %s, compile %s, %d CPU threads",
             rank, world_size, dev, resolved, do_compile, torch.get_num_threads())
    return Runtime(rank, local_rank, world_size, dev, resolved, do_compile)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere an empty set)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed blocks: a step frees and re-allocates the same activation buffers
    (MBs each), which glibc served with fresh mmaps, page-faulting them in again (~2,000 faults a step
    for the tiny model: BENCHMARKS.md, training)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # the largest value glibc accepts on 64-bit
    libc.mallopt(m_trim_threshold, 2**30)


def _set_cpu_threads(threads: int, local_world_size: int) -> None:
    """threads=N: exactly N. 0: an OMP_NUM_THREADS set outside torchrun (whose OMP_NUM_THREADS=1 would idle
    cores), else the cores this process may use, shared among the ranks on this machine."""
    if threads == 0:
        if os.environ.get("OMP_NUM_THREADS") and "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)


def peak_memory_mb(rt: Runtime) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on CPU."""
    if rt.device_type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

"""GPUs: memory as the driver reports it, and how many cards the model states need.

Capacities are NVML's total memory (what `nvidia-smi` prints, in MiB), not the marketing number:
an "80 GB" H100 reports 81,559 MiB, an A100 80GB 81,920 MiB. The CUDA context and allocator
overhead come out of that total; they are planned separately, not hidden in the capacity.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from .errors import PlanError

MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    aliases: tuple[str, ...] = ()


def _gpu(name: str, mib: int, *aliases: str) -> Gpu:
    return Gpu(name, mib * MIB, aliases)


GPUS: tuple[Gpu, ...] = (
    _gpu("H100-80GB", 81559, "h100", "h100-sxm", "h100-pcie"),
    _gpu("H200-141GB", 143771, "h200"),
    _gpu("A100-80GB", 81920, "a100-80gb", "a100"),
    _gpu("A100-40GB", 40960, "a100-40gb"),
    _gpu("L40S-48GB", 46068, "l40s"),
    _gpu("L4-24GB", 23034, "l4"),
    _gpu("RTX-4090-24GB", 24564, "rtx4090", "4090"),
    _gpu("RTX-3090-24GB", 24576, "rtx3090", "3090"),
    _gpu("V100-32GB", 32768, "v100-32gb", "v100"),
    _gpu("V100-16GB", 16384, "v100-16gb"),
    _gpu("T4-16GB", 15360, "t4"),
)
DEFAULT_GPU = "H100-80GB"

_BY_NAME = {alias.lower(): g for g in GPUS for alias in (g.name, *g.aliases)}


def get_gpu(name: str) -> Gpu:
    gpu = _BY_NAME.get(name.strip().lower())
    if gpu is not None:
        return gpu
    close = difflib.get_close_matches(name.strip().lower(), _BY_NAME, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    known = ", ".join(g.name for g in GPUS)
    raise PlanError(f"unknown GPU {name!r}{hint} (known: {known}; or give --gpu-mem)")


def gpus_needed(required_bytes: int, gpu_bytes: int) -> int:
    """Fewest GPUs whose memory holds `required_bytes` when it is sharded evenly across them:
    ceil(required / capacity). 840 GB of model states on 80 GB cards needs 11."""
    return max(1, math.ceil(required_bytes / gpu_bytes))

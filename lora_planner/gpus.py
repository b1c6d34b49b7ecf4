"""GPUs: memory as the driver reports it, peak dense throughput, an hourly price, and how many
cards the model states need.

Capacities are NVML's total memory (what `nvidia-smi` prints, in MiB), not the marketing number:
an "80 GB" H100 reports 81,559 MiB, an A100 80GB 81,920 MiB. The CUDA context and allocator
overhead come out of that total; they are planned separately, not hidden in the capacity.

Peak TFLOP/s are the vendors' dense (no 2:4 sparsity) tensor-core figures for the 16-bit format
training uses: bf16 where the card has it, fp16 on V100 and T4, which have no bf16. Sources are
NVIDIA's datasheets (H100, H200, A100, L40S, L4, V100, T4) and architecture whitepapers (Ada for
the RTX 4090, Ampere GA102 for the RTX 3090; for GeForce cards the figure is fp16 with fp32
accumulation, the mode bf16 training runs in, half of the fp16-accumulate figure).

Prices are on-demand US dollars per GPU-hour as of 2026-11: round figures chosen as assumptions,
not quotes from any provider. Override them with `--price` or a price file (see `cost`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

from .errors import PlanError

MIB = 2**20


PRICES_AS_OF = "2026-11"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    aliases: tuple[str, ...] = ()
    peak_tflops: float | None = None  # dense 16-bit tensor-core TFLOP/s (None: unknown card)
    price_per_hour: float | None = None  # USD per GPU-hour, on demand (None: unknown)


def _gpu(name: str, mib: int, tflops: float, price: float, *aliases: str) -> Gpu:
    return Gpu(name, mib * MIB, aliases, tflops, price)


GPUS: tuple[Gpu, ...] = (
    _gpu("H100-80GB", 81559, 989.4, 3.00, "h100", "h100-sxm"),
    # The PCIe card has the same 80 GB and NVML total as the SXM one, but fewer SMs and lower clocks.
    _gpu("H100-PCIe-80GB", 81559, 756.0, 2.50, "h100-pcie"),
    _gpu("H200-141GB", 143771, 989.4, 3.50, "h200"),
    _gpu("A100-80GB", 81920, 312.0, 1.80, "a100-80gb", "a100"),
    _gpu("A100-40GB", 40960, 312.0, 1.30, "a100-40gb"),
    _gpu("L40S-48GB", 46068, 362.05, 1.00, "l40s"),
    _gpu("L4-24GB", 23034, 121.0, 0.50, "l4"),
    _gpu("RTX-4090-24GB", 24564, 165.2, 0.40, "rtx4090", "4090"),
    _gpu("RTX-3090-24GB", 24576, 71.0, 0.25, "rtx3090", "3090"),
    _gpu("V100-32GB", 32768, 125.0, 0.55, "v100-32gb", "v100"),
    _gpu("V100-16GB", 16384, 125.0, 0.45, "v100-16gb"),
    _gpu("T4-16GB", 15360, 65.0, 0.30, "t4"),
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


def with_memory(gpu: Gpu, size_text: str) -> Gpu:
    """The same GPU kind (throughput, price) with its memory overridden, e.g. from `--gpu-mem 24GB`."""
    from dataclasses import replace

    from .units import parse_bytes

    return replace(gpu, name=f"{size_text} GPU", memory_bytes=parse_bytes(size_text))

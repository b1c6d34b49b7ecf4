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

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import PlanError

MIB = 2**20


PRICES_AS_OF = "2026-11"


@dataclass(frozen=True)
class Gpu:
    """A kind of GPU: its memory in bytes, dense 16-bit throughput and on-demand price."""

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

def _key(name: str) -> str:
    """A GPU name as people type it, reduced to letters and digits: `H100 80GB`, `h100_80gb` and
    `h100-80` all become `h10080gb` or `h10080`."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _spellings(g: Gpu) -> set[str]:
    """Every key a card answers to: its name, its aliases, and its name without the `GB` suffix."""
    keys = {_key(n) for n in (g.name, *g.aliases)}
    keys |= {k[:-2] for k in keys if k.endswith("gb")}
    return keys


_BY_NAME = {key: g for g in GPUS for key in _spellings(g)}


def get_gpu(name: str) -> Gpu:
    """A catalog GPU by name or alias, ignoring case, spaces, `-` and `_` and a trailing `GB`
    (`h100`, `h100-80`, `h100_80gb`, `H100 80GB` are one card)."""
    gpu = _BY_NAME.get(_key(name))
    if gpu is not None:
        return gpu
    import difflib  # only an unknown name needs it

    names = {n.lower(): g for g in GPUS for n in (g.name, *g.aliases)}
    close = difflib.get_close_matches(name.strip().lower(), names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    known = ", ".join(g.name for g in GPUS)
    raise PlanError(f"unknown GPU {name!r}{hint} (known: {known}; or give --gpu-mem)")


def device_allowance(peak_bytes: int, gpu: Gpu) -> int:
    """What a GPU process needs above its allocator-level peak: the CUDA context and the caching
    allocator's slack (`memory.device_overhead_term`, an allowance, not a measurement). The one
    place the fit rule reads it; `gpu` is passed so a per-kind allowance can replace the flat one."""
    from .memory import device_overhead_term

    return device_overhead_term(peak_bytes, gpu.name).bytes


def fits(peak_bytes: int, gpu: Gpu) -> bool:
    """The fit rule, the only one: a step fits one GPU when its per-GPU allocator peak plus the
    device allowance is at most the GPU's memory, peak + allowance(peak) <= capacity. Used by the
    plan's GPU counts, `--fit`, the capacity report and the measurement's out-of-memory verdict."""
    from .allowance import fits as within_capacity

    return within_capacity(peak_bytes, device_allowance(peak_bytes, gpu), gpu.memory_bytes)


@lru_cache(maxsize=32)  # asked once per method of a plan, for one GPU
def largest_fitting_peak(gpu: Gpu) -> int:
    """The largest per-GPU peak that `fits` this GPU (-1 if none): found by bisection over `fits`,
    which grows with the peak, so it follows whatever allowance `device_allowance` applies."""
    if not fits(0, gpu):
        return -1
    lo, hi = 0, gpu.memory_bytes + 1  # fits(lo); not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid, gpu) else (lo, mid)
    return lo


def with_memory(gpu: Gpu, size_text: str) -> Gpu:
    """The same GPU kind (throughput, price) with its memory overridden, e.g. from `--gpu-mem 24GB`."""
    from dataclasses import replace

    from .units import parse_bytes

    return replace(gpu, name=f"{size_text} GPU", memory_bytes=parse_bytes(size_text))

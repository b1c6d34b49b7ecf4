"""GPUs: memory as the driver reports it, peak dense throughput, an hourly price, and how many
cards the model states need.

Capacities are NVML's total memory (what `nvidia-smi` prints, in MiB), not the marketing number:
an "80 GB" H100 reports 81,559 MiB, an A100 80GB 81,920 MiB. The CUDA context and allocator
overhead come out of that total; they are planned separately, not hidden in the capacity.

Peak TFLOP/s are the vendors' dense (no 2:4 sparsity) tensor-core figures for the 16-bit format
training uses: bf16 where the card has it, fp16 on V100 and T4, which have no bf16. Where a sheet
gives only the figure with sparsity, dense is half of it. For GeForce and RTX workstation cards the
figure is fp16/bf16 with fp32 accumulation, the mode bf16 training runs in. Each entry names its
source; NVIDIA publishes no sheet for AWS's A10G, so it carries the A10's figure, an assumption.

Prices are on-demand US dollars per GPU-hour as of 2026-11: round figures chosen as assumptions,
not quotes from any provider, and only for the cards that have always had one here; the others
have none (cost is unknown without `--price`). Override them with `--price` or a price file (see
`cost`). A GPU given only by its memory (`--gpu-mem`) has neither throughput nor price.
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
    source: str = ""  # where the throughput figure comes from


def _gpu(name: str, mib: int, tflops: float, price: float | None, source: str, *aliases: str) -> Gpu:
    return Gpu(name, mib * MIB, aliases, tflops, price, source)


GPUS: tuple[Gpu, ...] = (
    _gpu("H100-80GB", 81559, 989.4, 3.00, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 "
         "1,979 TFLOPS with sparsity", "h100", "h100-sxm"),
    # The PCIe card has the same 80 GB and NVML total as the SXM one, but fewer SMs and lower clocks.
    _gpu("H100-PCIe-80GB", 81559, 756.0, 2.50, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: "
         "BF16 1,513 TFLOPS with sparsity", "h100-pcie"),
    _gpu("H200-141GB", 143771, 989.4, 3.50, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 "
         "1,979 TFLOPS with sparsity", "h200"),
    _gpu("A100-80GB", 81920, 312.0, 1.80, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS "
         "(624 with sparsity)", "a100-80gb", "a100"),
    _gpu("A100-40GB", 40960, 312.0, 1.30, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS "
         "(624 with sparsity)", "a100-40gb"),
    _gpu("L40S-48GB", 46068, 362.05, 1.00, "NVIDIA L40S GPU datasheet: BF16 733 TFLOPS with sparsity",
         "l40s"),
    _gpu("L4-24GB", 23034, 121.0, 0.50, "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with "
         "sparsity", "l4"),
    _gpu("RTX-4090-24GB", 24564, 165.2, 0.40, "NVIDIA Ada Lovelace GPU architecture whitepaper, "
         "GeForce RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense", "rtx4090", "4090"),
    _gpu("RTX-3090-24GB", 24576, 71.0, 0.25, "NVIDIA Ampere GA102 GPU architecture whitepaper, GeForce "
         "RTX 3090: FP16/BF16 tensor with FP32 accumulate 71 TFLOPS dense", "rtx3090", "3090"),
    _gpu("V100-32GB", 32768, 125.0, 0.55, "NVIDIA V100 Tensor Core GPU datasheet, SXM2: FP16 tensor "
         "125 TFLOPS (no bf16)", "v100-32gb", "v100"),
    _gpu("V100-16GB", 16384, 125.0, 0.45, "NVIDIA V100 Tensor Core GPU datasheet, SXM2: FP16 tensor "
         "125 TFLOPS (no bf16)", "v100-16gb"),
    _gpu("T4-16GB", 15360, 65.0, 0.30, "NVIDIA T4 Tensor Core GPU datasheet: FP16/FP32 mixed 65 "
         "TFLOPS (no bf16)", "t4"),
    # Cards added later carry no price: none was chosen for them (give --price).
    _gpu("A10G-24GB", 23028, 125.0, None, "NVIDIA A10 Tensor Core GPU datasheet: BF16 125 TFLOPS "
         "(250 with sparsity); AWS's A10G has no NVIDIA sheet, the A10's figure is an assumption",
         "a10g"),
    _gpu("RTX-A6000-48GB", 49140, 154.8, None, "NVIDIA Ampere GA102 GPU architecture whitepaper, "
         "RTX A6000: FP16/BF16 tensor with FP32 accumulate 154.8 TFLOPS dense (309.7 with sparsity)",
         "rtx-a6000", "a6000"),
    _gpu("RTX-5090-32GB", 32607, 209.5, None, "NVIDIA RTX Blackwell GPU architecture whitepaper, "
         "GeForce RTX 5090: FP16/BF16 tensor with FP32 accumulate 209.5 TFLOPS dense", "rtx5090", "5090"),
    _gpu("B200-180GB", 183359, 2250.0, None, "NVIDIA HGX B200 datasheet: FP16/BF16 tensor 36 PFLOPS "
         "with sparsity for 8 GPUs, 2.25 PFLOPS dense per GPU", "b200"),
    # AMD: ROCm's VRAM pool (rocminfo: 201,310,208 KB; torch: "total capacity of 191.98 GiB")
    _gpu("MI300X-192GB", 196592, 1307.4, None, "AMD Instinct MI300X accelerator datasheet: peak BF16 "
         "1,307.4 TFLOPS dense (2,614.9 with sparsity)", "mi300x", "mi300"),
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


def with_memory(gpu: Gpu, size_text: str, keep_kind: bool = False) -> Gpu:
    """A GPU of `size_text` memory (`--gpu-mem 24GB`). With `keep_kind` (`--gpu h100 --gpu-mem
    40GB`: the user named the card) only the memory changes: the name, throughput and price stay.
    Otherwise the card is known only by its memory, with no known throughput or price: memory is
    planned, time and cost only with `--tflops` and `--price` (a 24 GB card is not an H100)."""
    from dataclasses import replace

    from .units import parse_bytes

    if keep_kind:
        sized = replace(gpu, memory_bytes=parse_bytes(size_text))
    else:  # a card known only by its memory: its throughput and price are unknown (--tflops, --price)
        sized = replace(gpu, name=f"{size_text} GPU", memory_bytes=parse_bytes(size_text),
                        peak_tflops=None, price_per_hour=None, source="")
    if not fits(0, sized):  # no step could fit: every fit figure would be -1
        from .units import format_bytes

        allowance = format_bytes(device_allowance(0, sized))
        raise PlanError(f"--gpu-mem {size_text} is not more than the {allowance} a CUDA process takes "
                        "before its first tensor (the device allowance)")
    return sized

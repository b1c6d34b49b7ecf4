"""The device allowance: what a GPU process holds beyond the allocator-level peak the plan follows.

The plan's peak is the live tensors of one training step. What `nvidia-smi` (NVML) shows a process
using is more, and each part below is a named term with its source:

- `cuda_context_bytes`: the CUDA context (driver state, the local-memory reservation, the kernel
  images loaded for this GPU's architecture). It depends on the GPU generation, the CUDA version
  and `CUDA_MODULE_LOADING` (LAZY, the default torch sets since 2.x, loads kernels on first use).
  NVIDIA documents no figure; the prior is an assumption until GPU readings fit it.
- `cublas_workspace_bytes`: torch gives each (cuBLAS handle, stream) a cuBLAS workspace and a
  cuBLASLt workspace, both from the caching allocator, and hands out one handle per thread; a
  training step runs matrix products on the main thread (forward, optimizer) and on autograd's
  device thread (backward), so two of each. torch's defaults (aten/src/ATen/cuda/
  CublasHandlePool.cpp, `CUBLAS_WORKSPACE_CONFIG` and `CUBLASLT_WORKSPACE_SIZE` unset): cuBLAS
  4096 KiB x 2 + 16 KiB x 8 = 8,519,680 B, or 4096 KiB x 8 = 32 MiB on sm_90 (Hopper) exactly;
  cuBLASLt 1 MiB (capped at the cuBLAS size).
- `allocator_segment_bytes`: the caching allocator (c10/cuda/CUDACachingAllocator.cpp) rounds
  every request to 512 B (kMinBlockSize), carves requests of at most 1 MiB from 2 MiB segments
  (kSmallBuffer), requests under 10 MiB from 20 MiB segments (kLargeBuffer), and rounds larger ones
  to 2 MiB (kRoundLarge). At the peak, at least one partly used segment of each pool stays reserved
  and the large allocations end on a 2 MiB boundary.
- `allocator_cache_bytes`: blocks freed earlier in the step stay cached (reserved, not allocated)
  and fragment; the prior is a fraction of the peak, an assumption until readings fit it.

`fit_allowance` fits the two assumed terms (context and cache fraction) from GPU records: NVML
growth - measured allocator peak against that peak, a straight line. The fitted values go into
`FITTED` for the GPU generation they were read on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MIB = 2**20
KIB = 2**10

# Prior for the CUDA context of a torch process with cuBLAS loaded, any generation: an assumption
# (the figure the planner has always allowed), replaced per generation by `FITTED` once measured.
CONTEXT_PRIOR_BYTES = 500 * MIB
# Prior for freed-but-cached and fragmented blocks, as a fraction of the allocator-level peak.
CACHE_FRACTION_PRIOR = 0.05

# torch's default cuBLAS and cuBLASLt workspaces (CublasHandlePool.cpp, `parseChosenWorkspaceSize`,
# `parseCUDABlasLtWorkspaceSize`).
CUBLAS_WORKSPACE_DEFAULT = 4096 * KIB * 2 + 16 * KIB * 8
CUBLAS_WORKSPACE_HOPPER = 4096 * KIB * 8  # sm_90 only: later generations get the default
CUBLASLT_WORKSPACE = 1024 * KIB
# Threads that issue matrix products in a training step: the main thread and autograd's.
CUBLAS_HANDLES = 2

# The caching allocator's constants (CUDACachingAllocator.cpp).
MIN_BLOCK = 512  # kMinBlockSize: every request rounds up to a multiple of it
SMALL_SEGMENT = 2 * MIB  # kSmallBuffer: the segment requests <= 1 MiB come from
LARGE_SEGMENT = 20 * MIB  # kLargeBuffer: the segment requests < 10 MiB come from
ROUND_LARGE = 2 * MIB  # kRoundLarge: larger requests round up to it

# GPU generations by CUDA compute capability (major, minor), as torch reports it.
GENERATIONS = {(7, 0): "volta", (7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere", (8, 7): "ampere",
               (8, 9): "ada", (9, 0): "hopper", (10, 0): "blackwell", (12, 0): "blackwell",
               # ROCm's torch reports gfx942 (MI300X) as (9, 4); hipBLASLt's workspace is assumed
               # to be cuBLAS's default until readings say otherwise
               (9, 4): "cdna3"}
# The catalog's GPUs (`gpus.GPUS`) by generation.
GPU_GENERATIONS = {"H100-80GB": "hopper", "H100-PCIe-80GB": "hopper", "H200-141GB": "hopper",
                   "A100-80GB": "ampere", "A100-40GB": "ampere", "RTX-3090-24GB": "ampere",
                   "L40S-48GB": "ada", "L4-24GB": "ada", "RTX-4090-24GB": "ada",
                   "V100-32GB": "volta", "V100-16GB": "volta", "T4-16GB": "turing",
                   "A10G-24GB": "ampere", "RTX-A6000-48GB": "ampere", "RTX-5090-32GB": "blackwell",
                   "B200-180GB": "blackwell", "MI300X-192GB": "cdna3"}
DEFAULT_GENERATION = "hopper"  # the default GPU's (H100)


@dataclass(frozen=True)
class Fitted:
    """Values fitted from GPU readings for one generation, with where they came from."""

    context_bytes: int
    cache_fraction: float
    source: str  # the records file and how many ok jobs


# generation -> fitted values. Empty until GPU records are committed (see `fit_allowance`).
FITTED: dict[str, Fitted] = {}


def generation_of(gpu_name: str | None = None, capability: tuple[int, int] | None = None) -> str:
    """The GPU generation from a catalog name or a compute capability; the default GPU's when
    neither is known (a GPU given only by its memory)."""
    if capability is not None and tuple(capability) in GENERATIONS:
        return GENERATIONS[tuple(capability)]
    if capability is not None and capability[0] >= 10:
        return "blackwell"
    return GPU_GENERATIONS.get(gpu_name or "", DEFAULT_GENERATION)


def cuda_context_bytes(generation: str) -> int:
    """CUDA context of a torch process: the fitted value for the generation, else the prior
    (`CONTEXT_PRIOR_BYTES`, an assumption)."""
    fitted = FITTED.get(generation)
    return fitted.context_bytes if fitted else CONTEXT_PRIOR_BYTES


def cublas_workspace_bytes(generation: str, handles: int = CUBLAS_HANDLES) -> int:
    """handles x (torch's default cuBLAS workspace + its 1 MiB cuBLASLt workspace); the cuBLAS one
    is 32 MiB on Hopper (sm_90) and 8,519,680 B on every other generation."""
    per = CUBLAS_WORKSPACE_HOPPER if generation == "hopper" else CUBLAS_WORKSPACE_DEFAULT
    return handles * (per + CUBLASLT_WORKSPACE)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def allocator_segment_bytes(allocator_peak: int) -> int:
    """Reserved beyond the peak by segment sizes: the peak rounded up to 2 MiB (kRoundLarge) plus a
    partly used 2 MiB small segment and 20 MiB large segment kept at the peak. Per-request 512-byte
    rounding (< 512 B per live tensor) is below this term's resolution and left in the fitted cache."""
    return round_up(allocator_peak, ROUND_LARGE) - allocator_peak + SMALL_SEGMENT + LARGE_SEGMENT


def cache_fraction(generation: str) -> float:
    fitted = FITTED.get(generation)
    return fitted.cache_fraction if fitted else CACHE_FRACTION_PRIOR


def allocator_cache_bytes(allocator_peak: int, generation: str) -> int:
    """Freed-but-cached and fragmented blocks: cache fraction x peak (prior 5%, an assumption)."""
    return int(allocator_peak * cache_fraction(generation))


@dataclass(frozen=True)
class Allowance:
    """The device allowance above an allocator-level peak, term by term (bytes)."""

    generation: str
    context: int
    cublas_workspaces: int
    segments: int
    cache: int
    fitted: bool

    @property
    def total(self) -> int:
        return self.context + self.cublas_workspaces + self.segments + self.cache


def allowance(allocator_peak: int, gpu_name: str | None = None,
              capability: tuple[int, int] | None = None) -> Allowance:
    """Every term of the allowance for a step whose allocator-level peak is `allocator_peak`."""
    generation = generation_of(gpu_name, capability)
    return Allowance(generation, cuda_context_bytes(generation), cublas_workspace_bytes(generation),
                     allocator_segment_bytes(allocator_peak),
                     allocator_cache_bytes(allocator_peak, generation), generation in FITTED)


def fits(per_gpu_peak: int, allowance_bytes: int, capacity: int) -> bool:
    """The one fit rule: a step fits a GPU when its per-GPU peak plus the device allowance is at
    most the GPU's memory (NVML's total)."""
    return per_gpu_peak + allowance_bytes <= capacity


def fit_allowance(points: Iterable[tuple[int, int]], generation: str) -> Fitted | None:
    """Least-squares line through (allocator peak, NVML growth - allocator peak) of ok GPU jobs.

    The measured allocator peak already holds the cuBLAS workspaces (torch takes them from the
    caching allocator), so growth - allocator peak = context + segments + cache fraction x peak:
    the intercept less the segments' mean (`allocator_segment_bytes` with the 2 MiB rounding at
    its mean, 1 MiB) is the context, the slope the cache fraction. None with fewer than two
    distinct peaks."""
    pairs = [(int(peak), int(growth) - int(peak)) for peak, growth in points]
    if len({p for p, _ in pairs}) < 2:
        return None
    n = len(pairs)
    mean_x = sum(p for p, _ in pairs) / n
    mean_y = sum(e for _, e in pairs) / n
    sxx = sum((p - mean_x) ** 2 for p, _ in pairs)
    slope = sum((p - mean_x) * (e - mean_y) for p, e in pairs) / sxx
    intercept = mean_y - slope * mean_x
    segments = SMALL_SEGMENT + LARGE_SEGMENT + ROUND_LARGE // 2
    return Fitted(int(round(intercept - segments)), slope, f"least squares over {n} ok jobs")

"""The largest micro-batch and the longest sequence that fit a GPU, method by method.

"Fits" means the step's allocator-level peak plus the device allowance (CUDA context and caching
slack, `timeline.device_overhead_bytes`) is at most the GPU's memory. The peak grows with batch size
and with sequence length, so each limit is found by bisection over the planner itself: no second
formula to drift from the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .gpus import Gpu
from .spec import ModelSpec, TrainSetup

MAX_BATCH = 1 << 16


@dataclass(frozen=True)
class Fit:
    max_batch_size: int  # at the setup's sequence length; 0: not even one sequence fits
    max_seq_len: int  # at the setup's batch size, up to the model's context; 0: nothing fits
    seq_limit: int  # the longest sequence searched (the model's context length)


def largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), assuming fits is monotone (true, then false); 0 if
    fits(1) is false."""
    if not fits(1):
        return 0
    lo, hi = 1, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def step_fits(spec: ModelSpec, setup: TrainSetup, gpu: Gpu) -> bool:
    """Peak plus the device allowance within the GPU's memory."""
    from .plan import make_plan

    plan = make_plan(spec, (setup,), gpu).plans[0]
    extra = plan.device_overhead.bytes if plan.device_overhead else 0
    return plan.memory["peak"].bytes + extra <= gpu.memory_bytes


def fit_limits(spec: ModelSpec, setup: TrainSetup, gpu: Gpu) -> Fit:
    """Largest batch at `setup.seq_len`, longest sequence at `setup.batch_size`."""
    batch = largest(lambda b: step_fits(spec, setup.with_(batch_size=b), gpu), MAX_BATCH)
    seq = largest(lambda s: step_fits(spec, setup.with_(seq_len=s), gpu), spec.max_positions)
    return Fit(batch, seq, spec.max_positions)

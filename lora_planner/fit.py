"""The largest micro-batch and the longest sequence that fit a GPU, method by method.

"Fits" is the one fit rule (`gpus.fits`): the step's per-GPU allocator peak plus the device
allowance is at most the GPU's memory. The peak grows with batch size and with sequence length, so
each limit is found by bisection over a verdict the caller supplies (the CLI passes the planner's
own), so there is no second formula to drift from the plan and this module needs nothing of `plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .spec import TrainSetup

MAX_BATCH = 1 << 16

Verdict = Callable[[TrainSetup], bool]  # does this setup's step fit (the planner's `fits`)?


@dataclass(frozen=True)
class Fit:
    max_batch_size: int  # at the setup's sequence length; 0: not even one sequence fits
    max_seq_len: int  # at the setup's batch size, up to the model's context; 0: nothing fits
    seq_limit: int  # the longest sequence searched (the model's context length)


def largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), assuming fits is monotone (true, then false); 0 if
    fits(1) is false. `high` is tried second, then n doubles from 1 until it no longer fits, then
    bisection: about 2 log2(answer) verdicts rather than log2(high), which matters where each verdict
    is a recording of its own (`recorded.RecordedModel`)."""
    if not fits(1):
        return 0
    if fits(high):
        return high
    lo, hi = 1, high - 1  # fits(lo); the answer is in [lo, hi]
    while 2 * lo <= hi:
        if not fits(2 * lo):
            hi = 2 * lo - 1
            break
        lo *= 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_limits(step_fits: Verdict, setup: TrainSetup, seq_limit: int) -> Fit:
    """Largest batch at `setup.seq_len`, longest sequence (up to `seq_limit`) at `setup.batch_size`."""
    batch = largest(lambda b: step_fits(setup.with_(batch_size=b)), MAX_BATCH)
    seq = largest(lambda s: step_fits(setup.with_(seq_len=s)), seq_limit)
    return Fit(batch, seq, seq_limit)


def with_fit(plan, setups: Sequence[TrainSetup], step_fits: Verdict, seq_limit: int):
    """`plan` (a `plan.Plan`) with each method's `fit` filled in; `setups` are the plan's, in order."""
    plans = tuple(replace(p, fit=fit_limits(step_fits, s, seq_limit))
                  for p, s in zip(plan.plans, setups, strict=True))
    return replace(plan, plans=plans)

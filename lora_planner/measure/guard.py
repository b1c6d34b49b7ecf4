"""The memory guard: refuse, before any model is built, a step that cannot fit where it would run.

A CPU step that does not fit in host RAM does not fail cleanly: the process grows until the kernel's
out-of-memory killer ends it (or something else on the machine). The planner knows the step's peak
before anything is allocated, so a job compares it with the memory available and stops in one line.
"""

from __future__ import annotations

import os

from ..errors import PlanError
from ..units import format_bytes


def host_available_bytes() -> int | None:
    """Host RAM available to a new allocation: /proc/meminfo's MemAvailable (Linux), else free
    pages x page size; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cuda_free_bytes(index: int = 0) -> int:
    """Free memory on torch's CUDA device `index` (`torch.cuda.mem_get_info`)."""
    import torch

    return int(torch.cuda.mem_get_info(index)[0])


def check_fits(planned: int, available: int | None, where: str, advice: str) -> None:
    """Raise a one-line `PlanError` when the planned peak exceeds the memory available."""
    if available is None or planned <= available:
        return
    raise PlanError(f"the planned peak {format_bytes(planned, 'GB')} exceeds the "
                    f"{format_bytes(available, 'GB')} of {where} available; {advice}, "
                    f"or --force to run it anyway")

"""Byte quantities in and out. Inside the planner every size is an int of bytes.

GB and MB are decimal (10^9, 10^6); GiB and MiB are binary (2^30, 2^20). One word never means both.
"""

from __future__ import annotations

import re

from .errors import PlanError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# compiled on first use (`re` caches it): the plain plan reads no size
_SIZE = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$"


# The most a size or a count may be: a petabyte of GPU memory, 10^15 parameters or tokens (the
# largest models and pretraining runs are thousands of times smaller). Far above real values, and
# small enough that every product stays an exact int and every float finite.
MAX_BYTES = 10**15
MAX_COUNT = 10**15


def parse_bytes(text: str, most: int = MAX_BYTES) -> int:
    """'80GB' -> 80,000,000,000; '80GiB' -> 85,899,345,920; '81559MiB' -> 85,520,809,984."""
    match = re.match(_SIZE, text) if len(text) <= 100 else None
    if not match or match.group(2).upper() not in UNITS:
        raise PlanError(f"cannot read size {text!r}: write a number and a unit such as 80GB, 80GiB, 81559MiB")
    number, unit = match.groups()
    value = round(float(number) * UNITS[unit.upper()])
    if value <= 0:
        raise PlanError(f"size {text!r} must be positive")
    if value > most:
        raise PlanError(f"size {text!r} is more than {format_bytes(most)}")
    return value


def parse_count(text: str, most: int = MAX_COUNT, what: str = "parameter count") -> int:
    """A parameter count: '70e9', '70B', '1.5b', '124439808'; from 1 to `most`. `what` names the
    value in an error (a token count reads the same)."""
    cleaned = text.strip().replace(",", "").replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(cleaned[-1:].upper(), 1)
    if scale != 1:
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned) * scale
    except ValueError:
        raise PlanError(f"cannot read {what} {text!r}: write e.g. 70e9 or 70B") from None
    if value < 1 or value != value or value == float("inf"):
        raise PlanError(f"{what} {text!r} must be a positive number")
    if value > most:
        raise PlanError(f"{what} {text!r} is more than {most:,}")
    return round(value)


_LADDERS = {"GB": ("B", "KB", "MB", "GB", "TB"), "GIB": ("B", "KiB", "MiB", "GiB", "TiB")}


def format_bytes(n: int, system: str = "GB") -> str:
    """Render bytes in decimal (GB: KB, MB, GB, TB) or binary (GiB: KiB, MiB, GiB, TiB) units,
    picking the largest unit of that system that keeps the number at 1 or more."""
    ladder = _LADDERS[system.upper()]
    unit = ladder[0]
    for candidate in ladder:
        if abs(n) >= UNITS[candidate.upper()]:
            unit = candidate
    value = n / UNITS[unit.upper()]
    if value == int(value):
        return f"{int(value):,} {unit}"
    if abs(value) < 10:
        return f"{value:,.2f} {unit}"
    return f"{value:,.1f} {unit}"

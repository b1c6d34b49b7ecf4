"""Values from outside checked once, at the edge: config.json fields, option values, adapter configs.

Each check returns the value in the type the planner uses, or raises `PlanError` with one line that
names the field and the allowed range. JSON parses `NaN`, `Infinity` and 1e19 as floats and `true`
as a bool that is also an int, so every number is checked for its type, finiteness and range here,
not where it is used (where a NaN turns into `$nan` or an infinity into an OverflowError).
"""

from __future__ import annotations

import math

from .errors import PlanError


def _shown(value: object) -> str:
    """The offending value, cut so that a 5,000-digit integer or a long string stays one short line."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _fmt(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    fmt = _fmt
    if lo is not None and hi is not None:
        if lo_open or hi_open:
            return f"in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}{')' if hi_open else ']'}"
        return f"from {fmt(lo)} to {fmt(hi)}"
    if lo is not None:
        return f"{'above' if lo_open else 'at least'} {fmt(lo)}"
    if hi is not None:
        return f"{'below' if hi_open else 'at most'} {fmt(hi)}"
    return "finite"


def printable(text: str) -> str:
    """`text` as given when it prints on one line, else its repr (a newline or a control character
    in a path would split an error line or hide what follows)."""
    return text if text.isprintable() else repr(text)


def whole_number(name: str, value: object, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi]. An int (not a bool) or a float without a fraction (4096.0);
    a string, a bool, NaN, an infinity or a fraction is refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{name} must be a whole number {_range(lo, hi)}, got {_shown(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise PlanError(f"{name} must be a whole number {_range(lo, hi)}, got {_shown(value)}")
        if not lo <= value <= hi:  # compared as a float: int(1e300) is exact but pointless
            raise PlanError(f"{name} must be a whole number {_range(lo, hi)}, got {value:g}")
        value = int(value)
    if not lo <= value <= hi:
        raise PlanError(f"{name} must be a whole number {_range(lo, hi)}, got {_shown(value)}")
    return value


def real_number(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float in the range (bounds closed unless `lo_open` / `hi_open`).
    A bool, a string, NaN and the infinities are refused."""
    shown = (f"{name} must be a finite number{'' if lo is None and hi is None else ' '}"
             f"{_range(lo, hi, lo_open, hi_open) if lo is not None or hi is not None else ''}, "
             f"got {_shown(value)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(shown)
    try:
        x = float(value)
    except OverflowError:  # an int past 1.8e308
        raise PlanError(shown) from None
    if not math.isfinite(x):
        raise PlanError(shown)
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise PlanError(shown)
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise PlanError(shown)
    return x


def flag(name: str, value: object, default: bool) -> bool:
    """A JSON true/false; null (or absent) is `default`. A string such as "false" is refused rather
    than read as True."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PlanError(f"{name} must be true or false, got {_shown(value)}")
    return value


def text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{name} must be a string, got {_shown(value)}")
    return value


def regex(name: str, pattern: str, max_length: int = 1000, shown: str | None = None):
    """`pattern` compiled, or one line: a bad regex, one nested past the parser's recursion limit
    ('(' * 1000), or one longer than `max_length` characters is refused. `shown` is what the error
    quotes (the user's text, when `pattern` wraps it)."""
    import re

    quoted = _shown(pattern if shown is None else shown)
    if len(pattern) > max_length:
        raise PlanError(f"{name} is a regular expression of {len(pattern):,} characters; "
                        f"at most {max_length:,} are read")
    try:
        return re.compile(pattern)
    except RecursionError:
        raise PlanError(f"{name} {quoted} is not a regex Python can compile: "
                        "nested too deeply") from None
    except (re.error, OverflowError, ValueError) as exc:
        raise PlanError(f"{name} {quoted} is not a valid regex: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


# The largest LoRA rank read from an option or an adapter config: far above any layer's width.
MAX_LORA_RANK = 2**20

# A config file is a few kilobytes; one that is larger is not a config (or is a device such as
# /proc/self/mem): read at most this much.
MAX_CONFIG_BYTES = 4 * 2**20


def read_small_file(path, what: str = "config", max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """A small file's bytes: at most `max_bytes` read (a device such as /dev/zero or a huge file
    costs one line, not the memory), any OSError one line naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise PlanError(f"cannot read {printable(str(path))}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise PlanError(f"{printable(str(path))} is larger than {max_bytes // 2**20} MiB; "
                        f"a {what} file is small")
    return data


def read_json_file(path, what: str = "config", max_bytes: int = MAX_CONFIG_BYTES):
    """A small JSON file's value: at most `max_bytes` read, UTF-8, nesting within Python's limits;
    anything else one line naming the file."""
    return parse_json(read_small_file(path, what, max_bytes), printable(str(path)))


def parse_json(data: bytes | str, where: str):
    """JSON text (bytes must be UTF-8) -> value, or one line naming `where`: bad bytes, bad JSON and
    nesting deeper than the parser's recursion limit are all refused."""
    import json

    try:
        text_ = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text_)
    except UnicodeDecodeError as exc:
        raise PlanError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except RecursionError:
        raise PlanError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts (4,300)
        raise PlanError(f"{where}: a JSON number too long to read") from None

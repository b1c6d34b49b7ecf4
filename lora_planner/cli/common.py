"""What every command of the CLI shares: the user-error type and the list-option parsers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from ..errors import MEASURE_EXTRA, PlanError


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def format_message(self) -> str:
        # One line whatever the message quotes: a file name or a value may hold a line break or
        # another control character, which is shown escaped (\n, \x1e).
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in self.message)


def _missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that cannot be imported (None in sys.modules: blocked, as a test
    does to stand for a missing package)."""
    import importlib.util
    import sys

    missing = []
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:
                missing.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def need_measure_extra(what: str, modules: tuple[str, ...] = ("torch", "transformers")) -> None:
    """Stop in one line, naming every missing module, when a command needs the `measure` extra and
    the base install lacks it."""
    missing = _missing(modules)
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: {MEASURE_EXTRA}")


def split_values(values: tuple[str, ...]) -> tuple[str, ...]:
    """Options that repeat or take commas: `--rank 1,8 --rank 64` -> ('1', '8', '64')."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def parse_ranks(values: tuple[str, ...]) -> tuple[int, ...]:
    """LoRA ranks from repeated or comma-separated options, duplicates dropped, default (8,)."""
    ranks = []
    for v in split_values(values):
        try:
            rank = int(v)
        except ValueError:
            raise PlanError(f"rank must be a whole number, got {v!r}") from None
        if rank <= 0:
            raise PlanError(f"rank must be a positive integer, got {rank}")
        ranks.append(rank)
    return tuple(dict.fromkeys(ranks)) or (8,)


T = TypeVar("T")


def adapter_call(call: Callable[[], T], needs: str = "adapter commands",
                 os_error: Callable[[OSError], str] | None = None) -> T:
    """Call into the adapter library: a user mistake, a missing extra (torch, safetensors) or a file
    that cannot be read or written becomes one line and exit 2. `needs` names what needs the extra."""
    try:
        return call()
    except PlanError as exc:
        raise UserError(str(exc)) from None
    except ImportError as exc:
        missing = ", ".join(_missing(("torch", "safetensors")) or [exc.name or "a module"])
        raise UserError(f"{needs} need torch and safetensors ({missing} missing): {MEASURE_EXTRA}") from None
    except OSError as exc:
        text = os_error(exc) if os_error else f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
        raise UserError(text) from None

"""What every command of the CLI shares: the user-error type and the list-option parsers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from ..errors import PlanError


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def format_message(self) -> str:
        # One line whatever the message quotes: a file name or a value may hold a line break or
        # another control character, which is shown escaped (\n, \x1e).
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in self.message)


MEASURE_EXTRA = "pip install 'lora-plan[measure]'"


def need_measure_extra(what: str, modules: tuple[str, ...] = ("torch", "transformers")) -> None:
    """Stop in one line when a command needs the `measure` extra and the base install lacks it."""
    import importlib.util
    import sys

    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked, as a test does to stand for a missing package
                raise UserError(f"{what} needs {name}: {MEASURE_EXTRA}")
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"{what} needs {name}: {MEASURE_EXTRA}")


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
        raise UserError(f"{needs} need torch and safetensors ({exc.name} is missing): "
                        "pip install 'lora-plan[measure]'") from None
    except OSError as exc:
        text = os_error(exc) if os_error else f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
        raise UserError(text) from None

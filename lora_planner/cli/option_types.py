"""Click types and callbacks for option values, declared once and shared by every command.

Each wraps a check of `lora_planner.validate` (the rules for values from outside live there), so an
option and a config.json field refuse NaN, the infinities and absurd sizes in the same words, and
the page (`serve`), which parses with these same click options, refuses them too.
"""

from __future__ import annotations

import click

from ..errors import PlanError
from ..spec import SHAPE_LIMITS
from ..validate import MAX_LORA_RANK, real_number

# Most LoRA ranks one plan compares side by side: each is a full plan (and a search with --fit),
# so a list of thousands would plan for minutes before answering.
MAX_RANKS = 64
# Far above any layer's width (PEFT accepts a rank above min(in, out); the plan notes it as wasted).
MAX_RANK = MAX_LORA_RANK
# Sizes in whole-number options (batch, sequence, GPUs, buckets): far above any real run, and
# small enough that every byte count stays a quickly computed int.
MAX_BATCH = 2**20
MAX_SEQ_LEN = 2**30
MAX_GPUS = 2**20
MAX_PARAMETERS = 10**15
MAX_LAYERS = SHAPE_LIMITS["num_layers"][1]  # trace --layers: a slice of at most a model's own depth
# A seq-cls head's outputs and stored fine-tunes: far above real use, small enough to plan at once.
MAX_LABELS = 10**6
MAX_TASKS = 10**6


class FiniteFloat(click.ParamType):
    """A finite number in a range: NaN, the infinities and values out of range are refused (click's
    FloatRange lets NaN through, and `type=float` takes 'inf')."""

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def convert(self, value, param, ctx) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return real_number("the value", number, self.lo, self.hi, lo_open=self.lo_open,
                               hi_open=self.hi_open)
        except PlanError as exc:
            self.fail(str(exc).removeprefix("the value "), param, ctx)

    def __repr__(self) -> str:
        return f"FiniteFloat({self.lo}, {self.hi})"


def bounded_int(lo: int, hi: int) -> click.IntRange:
    return click.IntRange(min=lo, max=hi)


def check_ranks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """--rank R[,R]: every value a whole number from 1 to MAX_RANK, at most MAX_RANKS of them, all
    checked before anything is planned; the values are passed on as given."""
    if not values:
        return values
    texts = [v.strip() for value in values for v in value.split(",") if v.strip()]
    bad = []
    ranks = set()
    for text in texts:
        try:
            rank = int(text)
        except ValueError:
            bad.append(text)
            continue
        if not 1 <= rank <= MAX_RANK:
            bad.append(text)
        ranks.add(rank)
    rule = f"each rank must be a positive whole number up to {MAX_RANK:,}, at most {MAX_RANKS} ranks"
    if bad:
        shown = ", ".join(repr(b) if not b.isprintable() or len(b) > 20 else b for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise click.BadParameter(f"{rule}; got {shown}{more}", ctx, param)
    if len(ranks) > MAX_RANKS:
        raise click.BadParameter(f"{rule}; got {len(ranks):,} ranks", ctx, param)
    return values


def check_targets(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """--targets: every `re:` pattern compiled now (a bad or absurdly nested regex is one line,
    not a RecursionError in the middle of planning); the values are passed on as given."""
    from ..validate import regex

    for value in values:
        for target in (v.strip() for v in value.split(",")):
            if target.startswith("re:"):
                try:
                    regex("target", target[3:])
                except PlanError as exc:
                    raise click.BadParameter(str(exc), ctx, param) from None
    return values


def check_output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """-o FILE: a file name, not empty text (which names the current folder)."""
    if value is not None and not value.strip():
        raise click.BadParameter("a file name is needed, got an empty one", ctx, param)
    return value

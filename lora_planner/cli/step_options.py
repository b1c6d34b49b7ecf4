"""The options that shape one training step (batch, sequence, checkpointing, attention).

Shared by `plan` and `report capacity`, so both read the same flags with the same help.
"""

from __future__ import annotations

from collections.abc import Callable

import click


def step_options(f: Callable) -> Callable:
    """Add --batch-size, --seq-len, --grad-checkpointing and --attention to a click command."""
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Micro-batch size (sequences per step per GPU)."),
        click.option("--seq-len", type=click.IntRange(min=1), default=None,
                     help="Tokens per sequence. Default: 2,048, or the model's context when that is "
                          "shorter (GPT-2: 1,024)."),
        click.option("--grad-checkpointing/--no-grad-checkpointing", default=False, show_default=True,
                     help="Hugging Face per-layer checkpointing: keep layer inputs, recompute in "
                          "backward."),
        click.option("--attention", type=click.Choice(["sdpa", "eager"]), default="sdpa",
                     show_default=True,
                     help="sdpa: flash / memory-efficient kernels (no s x s scores kept); eager: keeps "
                          "them."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def dropout_option(f: Callable) -> Callable:
    """Add --dropout P: every dropout of the model at P, instead of the rates its config states."""
    return click.option(
        "--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, metavar="P",
        help="Set every dropout of the model (attention, residual, embedding) to P. Default: the "
             "rates config.json states (GPT-2's class default 0.1 where it states none; others 0). "
             "Each dropout keeps a mask for backward.")(f)

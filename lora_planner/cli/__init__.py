"""The `lora-plan` command line: click only (parse, call, render).

The main group lives here; its subcommands are named with the module that defines them and are
imported only when used, so `lora-plan --model 70b` loads nothing of `measure` or `reports`.
"""

from __future__ import annotations

import importlib

import click

from .. import __version__
from ..errors import PlanError
from .common import UserError

# name -> (module under lora_planner.cli, attribute): loaded on first use.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("commands", "plan_command"),
    "models": ("commands", "models_command"),
    "trace": ("commands", "trace_command"),
    "serve": ("serve", "serve_command"),
    "measure": ("measure", "measure_group"),
    "report": ("report", "report_group"),
    "adapter": ("adapter", "adapter_group"),
}

# One-line summaries for `lora-plan --help`, so listing the commands imports none of them.
SUMMARIES: dict[str, str] = {
    "plan": "Memory by term, the step's peak, GPUs, time, cost and checkpoints (the default).",
    "models": "List the model catalog.",
    "trace": "Trace one real training step on CPU beside the prediction (needs torch).",
    "serve": "A local page to click through a plan (GET /api/plan answers as --format json).",
    "measure": "Fine-tune GPT-2 for real and set measured memory beside the plan (needs torch).",
    "report": "Write markdown capacity, validation and adapter reports.",
    "adapter": "Singular values of a LoRA adapter or full update; resize it to a smaller rank.",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs, and runs
    `plan` when no command is named: `lora-plan --model 70b` is `lora-plan plan --model 70b`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module_name, attribute = SUBCOMMANDS[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(SUMMARIES.items()))

    def invoke(self, ctx: click.Context):
        """Run the subcommand. A user mistake found anywhere below it (`PlanError`, from the
        planner, a job or a report) ends here as one line and exit 2: no command catches it."""
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # A bad option value is a user mistake like any other: one line and exit 2, without
            # the usage block click prints above it (`--help` shows the usage).
            exc.ctx = None
            raise
        except OSError as exc:
            # A path the user gave that cannot be read or written (a name too long, a device, a
            # folder where a file belongs, a full disk): one line naming it, not a traceback.
            from ..validate import printable

            where = f"{printable(str(exc.filename))}: " if exc.filename else ""
            raise UserError(f"{where}{exc.strerror or exc}") from None
        except PlanError as exc:
            raise UserError(str(exc)) from None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in SUBCOMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = ["plan", *args]
        return super().parse_args(ctx, args)


# Every subcommand reads its choices in any case (--method LoRA, --device CPU): click folds the value
# and the choices alike before comparing, and passes on the choice as the command spells it.
@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "token_normalize_func": str.lower})
@click.version_option(__version__, prog_name="lora-plan")
def main() -> None:
    """Plan the memory, GPUs and checkpoints of a fine-tune before you rent anything.

    With no command, `plan` runs, so every option of `lora-plan plan --help` works here:

    \b
        lora-plan --model 70b --rank 8
        lora-plan --model llama-3.1-8b --method lora --rank 1,8,64 --targets all-linear
        lora-plan --params 70e9 --method full --precision bf16 --gpu-mem 80GB
        lora-plan --model 8b --method lora --batch-size 8 --seq-len 4096 --grad-checkpointing --fit
        lora-plan --model ./my-model/config.json --format json

    See `lora-plan plan --help` for the plan's options (model, method, rank, precision, GPU,
    sharding, time and cost).
    """

"""`lora-plan report capacity|validation`: parse, call the report writers, say what was written.

Only click and the standard library are imported here at module level: this module is registered
on the main command, and the plain planning path must not load pandas or matplotlib.
"""

from __future__ import annotations

import shlex

import click

# The planner's own modules are light (stdlib only); pandas and matplotlib load inside the commands.
from ..gpus import DEFAULT_GPU
from ..optimizers import OPTIMIZERS
from ..precision import DEFAULT_PRECISION
from ..reports.capacity import DEFAULT_MODELS, DEFAULT_RANKS, DEFAULT_TASKS
from .common import UserError, adapter_call, parse_ranks, split_values
from .option_types import MAX_TASKS, FiniteFloat, check_output_file, check_ranks, check_targets
from .step_options import precision_option, step_options


def _command_line(ctx: click.Context) -> str:
    """The command as the user gave it (options they set, in declaration order), to be written
    into the report so that it can be made again."""
    words = ["lora-plan", "report", ctx.info_name]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words += [str(v) for v in value]
            continue
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            words.append(flag if value else param.secondary_opts[0])
        else:
            for v in value if param.multiple else (value,):
                words += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return shlex.join(words)


def _need_pandas() -> None:
    """Tables need pandas (charts only want matplotlib, and go without it); say so in one line."""

    try:
        import pandas  # noqa: F401
    except ImportError:
        from ..errors import REPORTS_EXTRA

        raise UserError(f"reports need pandas: {REPORTS_EXTRA}") from None


def _report(written) -> None:
    for warning in written.warnings:
        click.echo(f"warning: {warning}", err=True)
    images = len(written.images)
    click.echo(f"wrote {written.markdown} and {images} image{'s' if images != 1 else ''}")


@click.group("report")
def report_group() -> None:
    """Write markdown reports: capacity planning, predictions against measurements, adapter spectra.

    \b
        lora-plan report capacity -o capacity.md
        lora-plan report validation results/measure/*.jsonl -o validation.md
    """


@report_group.command("capacity")
@click.option("--models", "--model", "models", multiple=True, metavar="NAME[,NAME]",
              help="Models to compare: catalog names or aliases, or local config.json paths "
                   f"[default: {', '.join(DEFAULT_MODELS)}].")
@click.option("--methods", "--method", "methods", multiple=True, metavar="M[,M]",
              help="Methods: full, lora, qlora [default: all three].")
@click.option("--ranks", "--rank", "ranks", multiple=True, metavar="R[,R]", callback=check_ranks,
              help=f"LoRA ranks [default: {','.join(map(str, DEFAULT_RANKS))}].")
@click.option("--targets", "targets", multiple=True, metavar="T[,T]", callback=check_targets,
              help="LoRA targets, as for `lora-plan plan` [default: PEFT's default for each family].")
@click.option("--gpu", "gpu_name", default=DEFAULT_GPU, show_default=True,
              help="GPU kind, as for `lora-plan plan --gpu`.")
@click.option("--gpu-mem", "gpu_mem", metavar="SIZE",
              help="Override the GPU's memory: 80GB, 80GiB, 81559MiB.")
@precision_option(DEFAULT_PRECISION)
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adamw", show_default=True)
@click.option("--tasks", type=click.IntRange(1, MAX_TASKS), default=DEFAULT_TASKS, show_default=True,
              help="Storage section: N fine-tunes as N full copies or one base plus N adapters.")
@step_options
@click.option("--units", type=click.Choice(["GB", "GiB"]), default="GB", show_default=True,
              help="GB = 10^9 bytes, GiB = 2^30 bytes.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), callback=check_output_file,
              default="capacity.md",
              show_default=True, help="Markdown file to write; the PNG plots go beside it, named after it.")
@click.pass_context
def capacity_command(ctx, models, methods, ranks, targets, gpu_name, gpu_mem, precision, optimizer, tasks,
                     batch_size, seq_len, grad_checkpointing, attention, units, output) -> None:
    """Compare models, methods and ranks on one GPU: a markdown report with tables and plots.

    Trainable parameters, memory by term, GPUs needed, checkpoint sizes, trainable parameters
    against rank, and storage for N fine-tunes; every number is the planner's own.

    \b
        lora-plan report capacity -o capacity.md
        lora-plan report capacity --models 8b,70b --ranks 4,16 --gpu l40s -o l40s.md
        lora-plan report capacity --models gpt2 --methods lora --precision bf16 -o gpt2.md
    """
    from pathlib import Path

    from ..gpus import get_gpu, with_memory
    from ..plan import METHODS, check_methods
    from ..reports.capacity import CapacitySettings, write_capacity_report
    from ..spec import DEFAULT_SEQ_LEN, TrainSetup

    _need_pandas()
    try:
        chosen_methods = check_methods(split_values(methods) or METHODS)
        gpu = get_gpu(gpu_name)
        if gpu_mem:
            gpu = with_memory(gpu, gpu_mem)
        settings = CapacitySettings(
            models=split_values(models) or DEFAULT_MODELS,
            methods=tuple(dict.fromkeys(chosen_methods)),
            ranks=parse_ranks(ranks) if ranks else DEFAULT_RANKS,
            gpu=gpu,
            setup=TrainSetup(targets=split_values(targets) or ("default",), precision=precision,
                             optimizer=optimizer, tasks=tasks, batch_size=batch_size,
                             seq_len=seq_len or DEFAULT_SEQ_LEN,
                             grad_checkpointing=grad_checkpointing, attention=attention),
            unit=units,
            seq_len_from_model=seq_len is None,
        )
        written = write_capacity_report(settings, Path(output), _command_line(ctx))
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    _report(written)


@report_group.command("validation")
@click.argument("records", nargs=-1, required=True, metavar="RECORDS.jsonl...")
@click.option("--units", type=click.Choice(["GB", "GiB"]), default="GB", show_default=True,
              help="GB = 10^9 bytes, GiB = 2^30 bytes.")
@click.option("--worst", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many of the largest errors to list per device.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), callback=check_output_file,
              default="validation.md",
              show_default=True, help="Markdown file to write; the scatter plots go beside it.")
@click.pass_context
def validation_command(ctx, records, units, worst, output) -> None:
    """Predicted against measured memory, from the JSONL records `lora-plan measure` writes.

    Per device: each job's predicted and measured peaks and relative errors, their median, p90 and
    maximum, the worst cases, whether out-of-memory failures were foreseen, the provenance of every
    record, and a predicted-versus-measured scatter plot. A folder stands for its *.jsonl files.
    A missing file, a corrupt line or a record of another format is listed in the report with its
    file and line (and warned about here); the rest is still reported. With no usable record at
    all, the report says so and the command exits with 1.

    \b
        lora-plan report validation results/measure/*.jsonl -o validation.md
        lora-plan report validation results/ --units GiB --worst 10 -o validation.md
    """
    from pathlib import Path

    from ..reports.validation import write_validation_report

    _need_pandas()
    try:
        written = write_validation_report(records, Path(output), _command_line(ctx), units, worst)
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    _report(written)
    if not written.records:
        click.echo("error: no usable record in the input; the report says why", err=True)
        ctx.exit(1)


@report_group.command("adapter")
@click.argument("adapters", nargs=-1, metavar="ADAPTER...")
@click.option("--diff", "diffs", nargs=2, multiple=True, metavar="BASE FINETUNED",
              help="Also a full fine-tune's update: two safetensors checkpoints (repeatable).")
@click.option("--keep", type=FiniteFloat(0, 1, lo_open=True), default=0.9, show_default=True,
              help="Energy share the recommended rank keeps in every layer.")
@click.option("--units", type=click.Choice(["GB", "GiB"]), default="GB", show_default=True,
              help="GB = 10^9 bytes, GiB = 2^30 bytes.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), callback=check_output_file,
              default="adapters.md",
              show_default=True, help="Markdown file to write; the cumulative-energy plot goes beside it.")
@click.pass_context
def adapter_command(ctx, adapters, diffs, keep, units, output) -> None:
    """Spectra of LoRA adapters (and full updates): one section each, with a cumulative-energy plot.

    \b
        lora-plan report adapter ./lora-r8 ./lora-r1 -o adapters.md
        lora-plan report adapter ./lora-r8 --diff base.safetensors tuned.safetensors -o adapters.md
    """
    from pathlib import Path

    from ..adapter_rank import analyze_adapter, diff_checkpoints
    from ..reports.adapters import write_adapter_report

    if not adapters and not diffs:
        raise UserError("give at least one adapter folder or --diff BASE FINETUNED")

    def write():
        series = [(f"adapter {path}", analyze_adapter(path, keep=keep)) for path in adapters]
        series += [(f"full update {tuned}", diff_checkpoints(base, tuned, keep=keep))
                   for base, tuned in diffs]
        return write_adapter_report(series, Path(output), _command_line(ctx), units)

    _report(adapter_call(write, "adapter reports",
                         lambda exc: f"cannot write {output}: {exc.strerror or exc}"))

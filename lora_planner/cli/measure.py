"""`lora-plan measure run|sweep`: parse, call the job or the sweep, print the record.

Only click and the standard library at module level: this group is registered on the planning
CLI, which must start without torch.
"""

from __future__ import annotations

import json
import shlex
import sys

import click

from ..errors import PlanError
from .common import UserError, need_measure_extra, split_values
from .option_types import FiniteFloat
from .step_options import dropout_option, lora_dropout_option, precision_option, step_options


def resolve_device(device: str) -> str:
    """`auto` picks cuda when a CUDA device is there; asking for cuda without one is an error."""
    if device == "cpu":
        return "cpu"
    need_measure_extra(f"--device {device}", ("torch",))
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise PlanError(f"--device cuda: no CUDA device is available here (torch {torch.__version__}); "
                        "use --device cpu")
    return "cuda" if available else "cpu"


def _command_line() -> str:
    return shlex.join(["lora-plan", *sys.argv[1:]])


def _percent(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:+.1f}%"


@click.group("measure")
def measure_group() -> None:
    """Fine-tune GPT-2 for real and set measured memory beside the plan.

    \b
        lora-plan measure run --model gpt2 --method lora --rank 8 --steps 10 -o results.jsonl
        lora-plan measure run --model ./config.json --method full --precision amp --device cuda
        lora-plan measure sweep benchmarks/gpu_grid.toml -o results/gpu_grid.jsonl
        lora-plan measure sweep --set model=gpt2 --grid method=full,lora --grid rank=1,8 -o r.jsonl
    """


@measure_group.command("run")
@click.option("--model", default="gpt2", show_default=True, metavar="NAME|PATH",
              help="A catalog name (gpt2, gpt2-medium, ...) or a local config.json or its folder.")
@click.option("--weights", metavar="DIR", help="Start from the pretrained weights in a local folder.")
@click.option("--method", type=click.Choice(["full", "lora"]), default="lora", show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--targets", multiple=True, metavar="T[,T]",
              help="LoRA targets, matched as the planner matches them (default: the family's).")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha; scaling alpha/r.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) instead.")
@lora_dropout_option
@dropout_option
@step_options
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@precision_option("fp32", runs="A measured job runs fp32, amp (autocast in --amp-dtype) and pure-bf16 "
                                "(a bf16 model): a plain torch loop keeps no fp32 master copy.")
@click.option("--amp-dtype", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True,
              help="Autocast's 16-bit type under --precision amp; fp16 adds a grad scaler (planned "
                   "as amp too: its few scalars move no byte term).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: cuda when there is one.")
@click.option("--optimizer-impl", type=click.Choice(["foreach", "fused", "for-loop"]), default="foreach",
              show_default=True, help="AdamW's kernel, forced (as the planner's --optimizer-impl).")
@click.option("--loss", type=click.Choice(["standard", "chunked", "fused-linear"]), default="standard",
              show_default=True,
              help="The model's own loss, torchtune's chunked cross-entropy, or Liger's fused linear "
                   "cross-entropy (CUDA, needs liger-kernel).")
@click.option("--loss-chunks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chunks of the chunked cross-entropy.")
@click.option("--data", default="qa", show_default=True, metavar="qa|synthetic|FILE",
              help="The built-in Q/A set, random tokens, or a local text file (byte-level ids).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-adapter", metavar="DIR", help="Save the trained adapter in PEFT's layout.")
@click.option("-o", "--output", metavar="FILE", help="Append the record to this JSONL file.")
@click.option("--force", is_flag=True,
              help="Run even when the planned peak exceeds the memory available (host RAM on CPU, "
                   "free GPU memory on CUDA).")
@click.option("--format", "fmt", type=click.Choice(["summary", "json"]), default="summary",
              show_default=True,
              help="summary: one line (what ran, predicted and measured peak, speed); json: the record "
                   "as one JSON line, as -o appends it (the summary then goes to stderr).")
def run_command(model, weights, method, rank, targets, alpha, rslora, lora_dropout, dropout, batch_size,
                seq_len, grad_checkpointing, attention, steps, lr, precision, amp_dtype, device,
                optimizer_impl, loss, loss_chunks, data, seed, save_adapter, output, force,
                fmt="summary") -> None:
    """Fine-tune once, read peak memory and speed, print one summary line (--format json: the
    record).

    Before the model is built, a job whose planned peak exceeds the memory available is refused
    in one line (--force runs it anyway).

    \b
        lora-plan measure run --model gpt2 --method lora --rank 8 --targets c_attn --steps 5
        lora-plan measure run --model gpt2-medium --method full --batch-size 8 --seq-len 1024 \\
            --precision amp --grad-checkpointing --device cuda -o results.jsonl
    """
    need_measure_extra("lora-plan measure run")
    from ..adapter_rank import ADAPTER_FILES
    from ..files import check_folder_target, check_output_file
    from ..measure.job import Job, run_job
    from ..measure.records import append_record

    job = Job.from_dict(dict(
        model=model, weights=weights, method=method, rank=rank, targets=split_values(targets),
        alpha=alpha, rslora=rslora, lora_dropout=lora_dropout, dropout=dropout, batch_size=batch_size,
        seq_len=seq_len, steps=steps, lr=lr, precision=precision, amp_dtype=amp_dtype,
        grad_checkpointing=grad_checkpointing, attention=attention, device=resolve_device(device),
        data=data, seed=seed, optimizer_impl=optimizer_impl, loss=loss, loss_chunks=loss_chunks,
    ))
    # Where the results go is checked before the job trains, not found wanting after it.
    if output:
        check_output_file(output, "the results file")
    if save_adapter:
        check_folder_target(save_adapter, ADAPTER_FILES)
    record = run_job(job, None, _command_line(), save_adapter, force=force)
    if fmt == "json":
        click.echo(json.dumps(record))
    if output:
        try:
            append_record(output, record)
        except OSError as exc:  # a record that cost a training run is printed, never lost in a traceback
            if fmt != "json":
                click.echo(json.dumps(record), err=True)
            where = "on stdout above" if fmt == "json" else "the JSON line above"
            click.echo(f"error: cannot append the record to {output} ({exc.strerror or exc}); "
                       f"the record is {where}", err=True)
            sys.exit(1)
    click.echo(run_summary(record, output), err=fmt == "json")


def run_summary(record: dict, output: str | None = None) -> str:
    """One line for a measured job: status, what ran, predicted and measured peak with the error,
    speed, and where the record went."""
    s, m = record["settings"], record["measured"]
    method = s["method"] + (f" r={s['rank']}" if s["method"] != "full" else "")
    peak = m["peak_allocated"]
    speed = f"; {m['tokens_per_s']:,.0f} tokens/s" if m.get("tokens_per_s") else ""
    return (f"{record['status']}: {s['model']} {method}, {s['precision']}, batch {s['batch_size']} x "
            f"{s['seq_len']} tokens, {s['steps']} steps on {s['device']}: predicted peak "
            f"{record['predicted']['peak']:,} B, measured {'n/a' if peak is None else f'{peak:,} B'} "
            f"({_percent(record['relative_error']['peak_allocated'])}){speed}"
            + (f"; appended to {output}" if output else "")
            + (f"; {record['error']}" if record["error"] else ""))


@measure_group.command("sweep")
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "fixed", multiple=True, metavar="KEY=VALUE",
              help="A fixed setting for every job (over the spec's): --set steps=5.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2",
              help="A grid axis (over the spec's): --grid rank=1,8,64 --grid targets=c_attn,all-linear.")
@click.option("-o", "--output", required=True, metavar="FILE", help="The JSONL results file (appended).")
@click.option("--dry-run", is_flag=True,
              help="Plan and list the jobs as JSON lines (id, done, predicted peak, settings); run none.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--timeout", type=FiniteFloat(0, None, lo_open=True), metavar="SECONDS",
              help="Kill a job that runs longer and record it as `timeout`.")
@click.option("--devices", metavar="I[,I]",
              help="GPUs to run on, one job per GPU at a time (CUDA_VISIBLE_DEVICES set per job): "
                   "indices or UUIDs, 0,1,2,3.")
@click.option("--shard", metavar="K/N",
              help="Run every N-th job from the K-th (0 <= K < N): one task of an array job.")
@click.option("--wait", is_flag=True,
              help="When another sweep holds the results file, start once it ends (default: refuse).")
def sweep_command(spec, fixed, grid, output, dry_run, progress, timeout, devices, shard, wait) -> None:
    """Run a grid of jobs, one subprocess each; rerun to resume where it stopped.

    SPEC is a TOML, YAML or JSON file with `fixed` and `grid` tables; --set and --grid add to it
    or replace its keys. An out-of-memory job is recorded as `oom` and the sweep goes on.

    One sweep at a time writes a results file (another is refused, or waits with --wait). Ctrl-C
    stops after the running job and keeps its record; Ctrl-C again (or SIGTERM) kills it too.
    Either way the sweep exits non-zero and the same command resumes it.

    \b
        lora-plan measure sweep benchmarks/gpu_grid.toml -o results/gpu_grid.jsonl
        lora-plan measure sweep --set model=gpt2 --set steps=5 --grid method=full,lora \\
            --grid rank=1,8 -o results.jsonl
        lora-plan measure sweep benchmarks/gpu_grid.toml --devices 0,1,2,3 --timeout 900 -o r.jsonl
        lora-plan measure sweep benchmarks/gpu_grid.toml --shard $SLURM_ARRAY_TASK_ID/8 \\
            -o results/grid-$SLURM_ARRAY_TASK_ID.jsonl
    """
    from ..measure.records import load_records, skipped_warning
    from ..measure.sweep import check_jobs, expand, load_spec, parse_assignments, parse_shard, run_sweep

    if not dry_run:
        need_measure_extra("lora-plan measure sweep", ("torch", "transformers", "tqdm"))
    try:
        chosen_shard = parse_shard(shard) if shard else None
        gpus = split_values((devices,)) if devices else ()
        plan = load_spec(spec) if spec else {"fixed": {}, "grid": {}}
        plan["fixed"] |= parse_assignments(fixed, as_lists=False)
        plan["grid"] |= parse_assignments(grid, as_lists=True)
        if gpus:
            plan["fixed"]["device"] = "cuda"
        device = plan["fixed"].get("device", "auto")
        # Listing a GPU grid needs no GPU; running one does.
        if "device" not in plan["grid"] and not (dry_run and device == "cuda"):
            plan["fixed"]["device"] = resolve_device(device)
        jobs = expand(plan)
        if dry_run:
            from ..measure.sweep import shard_jobs

            jobs = shard_jobs(jobs, chosen_shard)
            predictions = check_jobs(jobs)
            found, skipped = load_records(output)
            if skipped:
                click.echo(f"warning: {skipped_warning(skipped)}", err=True)
            done = {record["id"] for record in found}
            for job in jobs:
                click.echo(json.dumps({"id": job.id, "done": job.id in done,
                                       "predicted_peak": predictions[job.id]["peak"],
                                       "settings": job.to_dict()}))
            return
        result = run_sweep(jobs, output, _command_line(), progress=progress, timeout=timeout, devices=gpus,
                           shard=chosen_shard, wait=wait,
                           warn=lambda text: click.echo(f"warning: {text}", err=True))
    except OSError as exc:  # the results file cannot be read or written: one line, not a traceback
        raise UserError(f"{exc.filename or output}: {exc.strerror or exc}") from None
    click.echo(result.summary(), err=True)
    if result.stopped_by is not None:
        sys.exit(128 + result.stopped_by)  # as a shell reports a command a signal ended

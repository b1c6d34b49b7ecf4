"""`lora-plan adapter analyze|resize|diff`: parse, call `adapter_rank`, render.

Only click and light core modules at module level; torch and safetensors load inside the verbs.
"""

from __future__ import annotations

import json

import click
from tabulate import tabulate

from ..gpus import DEFAULT_GPU
from ..precision import DEFAULT_PRECISION, PRECISIONS
from ..units import format_bytes
from .common import UserError, adapter_call
from .option_types import MAX_RANK, FiniteFloat
from .step_options import step_options


def _share(x: float) -> str:
    return f"{100 * x:.1f}%"


def _out_x_in(shape: tuple[int, int], stored_in_out: bool = False) -> str:
    """A module's shape the one way round every adapter table shows it: outputs x inputs (a
    nn.Linear weight's own order; ΔW = B·A is (out, in)). GPT-2's Conv1D and embeddings store
    their weight (in, out), so a checkpoint tensor of theirs is turned round."""
    out_f, in_f = (shape[1], shape[0]) if stored_in_out else (shape[0], shape[1])
    return f"{out_f}x{in_f}"


def _layer_rows(analysis, stored_in_out: frozenset[str] = frozenset()) -> list[list]:
    rows = []
    for layer in analysis.layers:
        values = layer.singular_values
        top = layer.to_dict(analysis.levels)["cumulative_energy"]
        rows.append([layer.name, _out_x_in(layer.shape, layer.name in stored_in_out), layer.rank,
                     f"{values[0]:.4g}" if values else "-", _share(top[0]) if top else "-",
                     *[layer.energy_rank(level) for level in analysis.levels]])
    return rows


def _layer_table(analysis, rank_header: str, stored_in_out: frozenset[str] = frozenset()) -> str:
    headers = ["layer", "out x in", rank_header, "σ1", "top-1 energy",
               *[f"rank@{level:g}" for level in analysis.levels]]
    return tabulate(_layer_rows(analysis, stored_in_out), headers=headers, disable_numparse=True)


def stored_in_out(names: list[str], *checkpoints: str) -> frozenset[str] | None:
    """Which of these weights a checkpoint stores (in, out) rather than nn.Linear's (out, in): the
    Conv1D layers and embeddings of the model its config.json describes, by the planner's own
    module layout (a name matches a module path, or one ends with the other after a dot). None when
    no checkpoint has a config.json the planner reads: the orientation is then unknown."""
    import os

    from ..architecture import layout
    from ..errors import PlanError
    from ..spec import spec_from_config_file

    for checkpoint in checkpoints:
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
        config = os.path.join(folder, "config.json")
        if not os.path.isfile(config):
            continue
        try:
            arch = layout(spec_from_config_file(config))
        except PlanError:
            continue
        paths = [m.path for m in arch.modules if m.kind in ("conv1d", "embedding")]
        return frozenset(n for n in names if any(
            n == p or n.endswith("." + p) or p.endswith("." + n) for p in paths))
    return None


def _stats_line(summary: dict) -> str:
    parts = [f"{level}: median {s['median']:g}, max {s['max']}"
             for level, s in summary["energy_rank"].items()]
    return "energy ranks across layers  " + "; ".join(parts)


def _adapter_text(analysis, savings: dict | None, units: str) -> str:
    a, s = analysis.source, analysis.summary
    lines = [f"adapter {a['path']}: {a['modules']} layers, r={a['r']}, lora_alpha={a['lora_alpha']}, "
             f"rsLoRA {'on' if a['use_rslora'] else 'off'}, {a['dtype']}, {a['params']:,} params, "
             f"{format_bytes(a['file_bytes'], units)}",
             "",
             _layer_table(analysis, "r"),
             "",
             _stats_line(s),
             f"recommended rank {s['recommended_rank']} ({s['recommended_rule']})",
             f"  params {s['now']['params']:,} -> {s['at_recommended_rank']['params']:,}, adapter file "
             f"{format_bytes(s['now']['bytes'], units)} -> "
             f"{format_bytes(s['at_recommended_rank']['bytes'], units)}",
             f"  per-layer ranks at {s['keep']:g} instead: {s['per_layer_ranks']['params']:,} params, "
             f"{format_bytes(s['per_layer_ranks']['bytes'], units)} "
             "(lora-plan adapter resize --energy)"]
    if savings:
        now, new = savings["now"], savings["at_recommended_rank"]
        lines.append(f"  through the planner, {savings['model']} ({', '.join(savings['targets'])}, batch "
                     f"{savings['batch_size']} x {savings['seq_len']} tokens, {savings['precision']}): peak "
                     f"{format_bytes(now['peak_bytes'], units)} at r={now['rank']} -> "
                     f"{format_bytes(new['peak_bytes'], units)} at r={new['rank']}, saves "
                     f"{format_bytes(savings['saved_peak_bytes'], units)}")
        lines += [f"  note: {n}" for n in savings["notes"]]
    lines += [f"note: {n}" for n in analysis.notes]
    return "\n".join(lines)


def _adapter_explanation(analysis, savings: dict | None) -> str:
    """The summary's formulas with this adapter's numbers put in."""
    s, a = analysis.summary, analysis.source
    width = {"fp32": 4, "bf16": 2, "fp16": 2}[a["dtype"]]
    dims = sum(layer.shape[0] + layer.shape[1] for layer in analysis.layers)
    lines = [
        "singular values: ΔW = s·B·A with s = alpha/r (alpha/sqrt(r) with rsLoRA); B = Q_B R_B, Aᵀ = Q_A R_A "
        "(thin QR); σ(ΔW) = σ(s·R_B·R_Aᵀ), an r x r SVD",
        "rank@F: min k with σ1² + ... + σk² >= F·(σ1² + ... + σr²)",
        f"recommended_rank: max over {s['layers']} layers of rank@{s['keep']:g} = {s['recommended_rank']}",
        f"params: sum over layers of r·(d + k); at rank {s['recommended_rank']} in every layer (never above "
        f"its own r): {s['at_recommended_rank']['params']:,} (sum of d + k = {dims:,})",
        f"adapter bytes: 8 + safetensors header + params x {width} B ({a['dtype']}) + other tensors: "
        f"{s['now']['bytes']:,} -> {s['at_recommended_rank']['bytes']:,}",
    ]
    if savings:
        lines.append(f"peak: the planner's `lora-plan plan --model {savings['model_arg']} --method lora "
                     f"--rank "
                     f"{savings['now']['rank']},{savings['at_recommended_rank']['rank']} --targets "
                     f"{','.join(savings['targets'])} --seq-len {savings['seq_len']} --batch-size "
                     f"{savings['batch_size']} --precision {savings['precision']} --gpu {savings['gpu']}` "
                     f"peaks, {savings['now']['peak_bytes']:,} - "
                     f"{savings['at_recommended_rank']['peak_bytes']:,} = {savings['saved_peak_bytes']:,} B")
    return "\n".join(lines)


def _diff_text(analysis, units: str) -> str:
    d, s = analysis.source, analysis.summary
    turned = stored_in_out([x.name for x in analysis.layers], d["finetuned"], d["base"])
    lines = [f"full update {d['finetuned']} - {d['base']}: {d['tensors']} tensors, {d['params']:,} params",
             "",
             _layer_table(analysis, "full rank", turned or frozenset()),
             "",
             _stats_line(s),
             f"a LoRA of rank {s['recommended_rank']} could hold >= {s['keep']:g} of every tensor's update: "
             f"{s['lora_params_at_recommended_rank']:,} params against {s['full_params']:,}"]
    lines += [f"note: {n}" for n in analysis.notes]
    if turned is None:
        lines.append("note: out x in as stored: no config.json beside the checkpoints says which "
                     "weights are Conv1D or embeddings (stored in x out)")
    return "\n".join(lines)


@click.group("adapter")
def adapter_group() -> None:
    """What a LoRA adapter learned: singular values, energy ranks, a smaller rank, resizing.

    \b
        lora-plan adapter analyze ./my-adapter
        lora-plan adapter analyze ./my-adapter --model llama-3.1-8b --keep 0.95 --format json
        lora-plan adapter resize ./my-adapter --energy 0.9 -o ./my-adapter-small
        lora-plan adapter diff ./base-model ./finetuned-model --include 'attn|mlp'
    """


_format = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                       show_default=True)
_units = click.option("--units", type=click.Choice(["GB", "GiB"]), default="GB", show_default=True,
                      help="GB = 10^9 bytes, GiB = 2^30 bytes.")
_keep = click.option("--keep", type=FiniteFloat(0, 1, lo_open=True), default=0.9, show_default=True,
                     help="Energy share (sum of squared singular values) the recommended rank keeps "
                          "in every layer.")


@adapter_group.command("analyze")
@click.argument("path", metavar="ADAPTER")
@_keep
@click.option("--model", "model_name", metavar="NAME|PATH",
              help="Also plan training this model with the adapter's targets at its rank and at the "
                   "recommended rank, and show the peak memory saved.")
@click.option("--gpu", "gpu_name", default=DEFAULT_GPU, show_default=True, help="GPU kind for --model.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULT_PRECISION,
              show_default=True, help="Storage convention for --model's plan.")
@step_options
@_units
@_format
@click.option("--explain", is_flag=True, help="Show the summary's formulas with the numbers put in.")
def analyze_command(path, keep, model_name, gpu_name, precision, batch_size, seq_len, grad_checkpointing,
                    attention, units, fmt, explain) -> None:
    """Singular values of each layer's ΔW = scaling·B·A, and whether a smaller rank would do.

    ADAPTER is a folder in PEFT's layout (adapter_model.safetensors, adapter_config.json) or a
    .safetensors file. The spectrum comes from the factors (QR of B and A, then an r x r SVD),
    never a d x k matrix. rank@F is the fewest directions holding the share F of the layer's energy.
    """
    from ..adapter_rank import analyze_adapter, planner_savings
    from ..spec import TrainSetup

    analysis = adapter_call(lambda: analyze_adapter(path, keep=keep))
    savings = None
    if model_name:
        setup = TrainSetup(precision=precision, batch_size=batch_size, seq_len=seq_len or 0,
                           grad_checkpointing=grad_checkpointing, attention=attention)
        savings = adapter_call(lambda: planner_savings(analysis, model_name, setup, gpu_name))
    if fmt == "json":
        values = analysis.to_dict()
        if savings:
            values["summary"]["planner"] = savings
        click.echo(json.dumps(values, indent=2))
    else:
        click.echo(_adapter_text(analysis, savings, units))
        if explain:
            click.echo("\n" + _adapter_explanation(analysis, savings))


@adapter_group.command("resize")
@click.argument("path", metavar="ADAPTER")
@click.option("--rank", type=click.IntRange(1, MAX_RANK),
              help="The same rank R in every layer (at most its own).")
@click.option("--energy", type=FiniteFloat(0, 1, lo_open=True),
              help="Per layer, the fewest directions holding this share of sum σ².")
@click.option("--fro", type=FiniteFloat(0, 1, lo_open=True),
              help="Per layer, the fewest directions holding this share of the Frobenius norm.")
@click.option("--sv-ratio", type=FiniteFloat(1, None),
              help="Per layer, every direction with σ >= σ1 / X.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the resized adapter (PEFT's layout).")
@_units
@_format
def resize_command(path, rank, energy, fro, sv_ratio, output, units, fmt) -> None:
    """Write the best rank-k approximation of each layer's ΔW in PEFT's layout.

    A dynamic criterion (--energy, --fro, --sv-ratio) picks k per layer and writes the ranks that
    differ from `r` into `rank_pattern`. lora_alpha is kept: each layer's scaling becomes alpha/k
    (alpha/sqrt(k) with rsLoRA) and the factors absorb the change, so scaling·B·A is exactly the
    truncated ΔW. Prints each layer's relative Frobenius error ||ΔW - ΔW_k|| / ||ΔW||.
    """
    from ..adapter_rank import resize_adapter
    from ..spectrum import Criterion

    chosen = {k: v for k, v in {"rank": rank, "energy": energy, "fro": fro, "sv_ratio": sv_ratio}.items()
              if v is not None}
    if len(chosen) != 1:
        raise UserError("give exactly one of --rank, --energy, --fro, --sv-ratio")
    (kind, value), = chosen.items()
    resized = adapter_call(lambda: resize_adapter(path, Criterion(kind, float(value)), output))
    if fmt == "json":
        click.echo(json.dumps(resized.to_dict(), indent=2))
        return
    rows = [[x.name, _out_x_in(x.shape), x.rank, x.new_rank, f"{x.frobenius_error:.4f}"]
            for x in resized.layers]
    click.echo(tabulate(rows, headers=["layer", "out x in", "r", "new r", "rel. Frobenius error"],
                        disable_numparse=True))
    worst = max(resized.layers, key=lambda x: x.frobenius_error)
    click.echo(f"\nwrote {resized.output} ({resized.criterion.describe()}): r={resized.config['r']}, "
               f"{len(resized.config['rank_pattern'])} layers in rank_pattern; "
               f"params {resized.params[0]:,} -> "
               f"{resized.params[1]:,}, file {format_bytes(resized.file_bytes[0], units)} -> "
               f"{format_bytes(resized.file_bytes[1], units)}; largest error {worst.frobenius_error:.4f} "
               f"({worst.name})")
    click.echo("lora_alpha kept; each layer's scaling is alpha/k at its new rank k, folded into the factors")
    for note in resized.notes:
        click.echo(f"note: {note}")


@adapter_group.command("diff")
@click.argument("base", metavar="BASE")
@click.argument("finetuned", metavar="FINETUNED")
@click.option("--include", metavar="REGEX", help="Only tensors whose name matches this regex.")
@_keep
@_units
@_format
def diff_command(base, finetuned, include, keep, units, fmt) -> None:
    """Singular values of a full fine-tune's update, W_finetuned - W_base, tensor by tensor.

    BASE and FINETUNED are safetensors files or checkpoint folders (sharded or not). Every weight
    of two or more dimensions in both is read one tensor at a time, so a large model is never in
    memory twice. Answers: how low-rank was the full update?
    """
    from ..adapter_rank import diff_checkpoints
    from ..errors import PlanError
    from ..validate import regex

    if include:
        try:
            regex("--include", include)
        except PlanError as exc:
            raise UserError(str(exc)) from None
    analysis = adapter_call(lambda: diff_checkpoints(base, finetuned, include=include, keep=keep))
    if fmt == "json":
        click.echo(json.dumps(analysis.to_dict(), indent=2))
    else:
        click.echo(_diff_text(analysis, units))

"""The adapter section of the markdown reports: spectra, energy ranks and a recommended rank, with a
cumulative-energy plot per layer.

Takes `adapter_rank.Analysis` values (an adapter's ΔW = scaling·B·A, or a full fine-tune's
W_after - W_before) and writes markdown; numbers are the analysis's own, nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..adapter_rank import Analysis
from ..files import write_text
from ..spectrum import cumulative_energy
from ..units import format_bytes
from .markdown import Written, code, image
from .plots import PlotsUnavailable, _save, figure_class


def _share(x: float) -> str:
    return f"{100 * x:.1f}%"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence], text_columns: int = 1) -> str:
    from tabulate import tabulate

    align = ("left",) * text_columns + ("right",) * (len(headers) - text_columns)
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    return tabulate(cells, headers=list(headers), tablefmt="github", disable_numparse=True, colalign=align)


def layer_table(analysis: Analysis) -> str:
    """One row per layer: shape, rank, σ1, the top direction's energy share, the energy ranks."""
    headers = ["layer", "shape", "rank", "σ1", "top-1 energy", *[f"rank@{x:g}" for x in analysis.levels]]
    rows = []
    for layer in analysis.layers:
        values = layer.singular_values
        top = cumulative_energy(values)[0] if values else 0.0
        rows.append([code(layer.name), f"{layer.shape[0]}x{layer.shape[1]}", layer.rank,
                     f"{values[0]:.4g}" if values else "-", _share(top),
                     *[layer.energy_rank(x) for x in analysis.levels]])
    return _md_table(headers, rows)


def summary_lines(analysis: Analysis, unit: str = "GB") -> list[str]:
    """The summary as markdown bullets: energy ranks across layers, the recommended rank, savings."""
    s = analysis.summary
    lines = [f"- energy rank at {level} across {s['layers']} layers: min {v['min']}, median {v['median']:g}, "
             f"max {v['max']}" for level, v in s["energy_rank"].items()]
    lines.append(f"- recommended rank **{s['recommended_rank']}**: {s['recommended_rule']}")
    if analysis.kind == "adapter":
        now, new, dyn = s["now"], s["at_recommended_rank"], s["per_layer_ranks"]
        lines.append(f"- parameters {now['params']:,} -> {new['params']:,} at rank {s['recommended_rank']} "
                     f"({dyn['params']:,} with per-layer ranks); adapter file "
                     f"{format_bytes(now['bytes'], unit)} -> {format_bytes(new['bytes'], unit)} "
                     f"({format_bytes(dyn['bytes'], unit)})")
        planner = s.get("planner")
        if planner:
            lines.append(f"- through the planner for {planner['model']} (batch {planner['batch_size']} x "
                         f"{planner['seq_len']} tokens, {planner['precision']}): peak "
                         f"{format_bytes(planner['now']['peak_bytes'], unit)} at r={planner['now']['rank']} "
                         f"-> {format_bytes(planner['at_recommended_rank']['peak_bytes'], unit)} at "
                         f"r={planner['at_recommended_rank']['rank']}")
    else:
        lines.append(f"- a LoRA of that rank has {s['lora_params_at_recommended_rank']:,} parameters on "
                     f"these tensors, against their {s['full_params']:,}")
    lines += [f"- note: {n}" for n in analysis.notes]
    return lines


def adapter_section(title: str, analysis: Analysis, unit: str = "GB", level: int = 2,
                    plot: Path | None = None, markdown_path: Path | None = None) -> str:
    """A markdown section for one analysis: what was read, the summary, the per-layer table."""
    src = analysis.source
    if analysis.kind == "adapter":
        what = (f"Adapter {code(src['path'])}: {src['modules']} layers, r={src['r']}, "
                f"lora_alpha={src['lora_alpha']}, rsLoRA {'on' if src['use_rslora'] else 'off'}, "
                f"{src['dtype']}, {src['params']:,} parameters. Singular values of ΔW = scaling·B·A "
                "from the factors (QR of B and A, then an r x r SVD).")
    else:
        what = (f"Full update {code(src['finetuned'])} - {code(src['base'])}: {src['tensors']} tensors, "
                f"{src['params']:,} parameters, singular values of each difference.")
    parts = [f"{'#' * level} {title}", "", what, "", *summary_lines(analysis, unit), ""]
    if plot is not None and markdown_path is not None:
        parts += [image(f"cumulative energy, {title}", plot, markdown_path), ""]
    parts += ["rank@F: the fewest directions holding the share F of the layer's energy (sum of squared "
              "singular values).", "", layer_table(analysis), ""]
    return "\n".join(parts)


def cumulative_energy_plot(series: Sequence[tuple[str, Analysis]], path: Path,
                           levels: Sequence[float] = (0.9, 0.99)) -> Path:
    """One panel per analysis: each layer's cumulative energy share against the rank k kept, thin
    lines, with the median layer in black and the energy levels dashed. The rank axis is logarithmic
    past 16 directions, and small ranks are marked point by point (a rank-1 adapter is one point)."""
    import math

    Figure = figure_class()
    cols = min(len(series), 3)
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(series):]:
        ax.set_visible(False)
    for ax, (label, analysis) in zip(axes, series, strict=False):
        curves = [cumulative_energy(layer.singular_values) for layer in analysis.layers]
        width = max(len(c) for c in curves)
        small = width <= 16
        marker = "o" if small else None
        for curve in curves:
            ax.plot(range(1, len(curve) + 1), curve, color="#4C72B0", alpha=0.35, linewidth=0.8,
                    marker=marker, markersize=3)
        padded = [c + [1.0] * (width - len(c)) for c in curves]
        median = [sorted(col)[len(col) // 2] for col in zip(*padded, strict=True)]
        ax.plot(range(1, width + 1), median, color="black", linewidth=1.6, marker=marker, markersize=4,
                label="median layer")
        for level in levels:
            ax.axhline(level, color="#C44E52", linestyle="--", linewidth=0.8)
        if small:
            ax.set_xticks(range(1, width + 1))
            ax.set_xlim(0.5, width + 0.5)
        else:
            ax.set_xscale("log")
            ax.set_xlim(1, width)
        ax.set_ylim(0, 1.02)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("directions kept (rank k)")
        ax.set_ylabel("share of energy (sum σ²)")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def write_adapter_report(series: Sequence[tuple[str, Analysis]], output: Path, command: str,
                         unit: str = "GB") -> Written:
    """A markdown report with one section per analysis and one cumulative-energy plot beside it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    images: list[Path] = []
    plot = output.with_name(f"{output.stem}-cumulative-energy.png")
    try:
        images.append(cumulative_energy_plot(series, plot))
    except PlotsUnavailable as exc:
        warnings.append(f"no plot: {exc}")
    parts = ["# Adapter rank analysis", "", f"Made by {code(command)}.", ""]
    if images:
        parts += [image("cumulative energy per layer", images[0], output), ""]
    for label, analysis in series:
        parts.append(adapter_section(label, analysis, unit))
    write_text(output, "\n".join(parts).rstrip() + "\n")
    return Written(output, tuple(images), tuple(warnings))

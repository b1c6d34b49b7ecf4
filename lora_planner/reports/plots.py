"""PNG charts for the reports, drawn with matplotlib's Agg renderer (no display needed).

matplotlib is optional: `figure_class` raises `PlotsUnavailable` when it is missing, and the
reports are then written without images and say so. Figures are made with `Figure` directly, not
pyplot, so no global backend or window state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..files import replacing

# Fixed colours per memory term, so the same term looks the same in every chart.
TERM_COLOURS = {
    "weights": "#4C72B0",
    "gradients": "#DD8452",
    "master_weights": "#55A868",
    "optimizer_states": "#C44E52",
    "activations": "#8172B3",
}


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported; the report goes on without images."""


def figure_class():
    """matplotlib's `Figure`, or `PlotsUnavailable` when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotsUnavailable(f"matplotlib is not installed ({exc})") from None
    return Figure


def _grid(count: int, width: float = 5.0, height: float = 3.6):
    Figure = figure_class()
    cols = min(count, 2)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _save(fig, path: Path) -> Path:
    # No "Software" entry: the file then depends only on the data and the matplotlib version.
    with replacing(path) as temporary:
        fig.savefig(temporary, format="png", dpi=90, metadata={"Software": None})
    return path


def memory_breakdown(rows: Sequence[dict], terms: Sequence[str], unit: tuple[str, int],
                     path: Path) -> Path:
    """Stacked bars, one per method, one panel per model: each memory term on top of the last, and
    the plan's peak as a black mark.

    `rows` carry `model`, `label`, `peak` and the bytes of each term; `unit` is (name, bytes per
    unit).
    """
    unit_name, unit_bytes = unit
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        labels = [r["label"] for r in mine]
        bottom = [0.0] * len(mine)
        for term in terms:
            heights = [r[term] / unit_bytes for r in mine]
            ax.bar(labels, heights, bottom=bottom, label=term.replace("_", " "),
                   color=TERM_COLOURS.get(term))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        # The peak is the highest point of the step's timeline, not the sum of the terms: activations
        # are freed as backward runs, and short-lived temporaries add to whichever phase makes them.
        ax.scatter(labels, [r["peak"] / unit_bytes for r in mine], marker="_", s=300, color="black",
                   label="peak", zorder=3)
        ax.set_title(model)
        ax.set_ylabel(f"memory ({unit_name})")
        ax.tick_params(axis="x", labelrotation=45)
    # One legend for all panels, below them, where it covers no bar.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=6, fontsize="small")
    return _save(fig, path)


def memory_versus_rank(rows: Sequence[dict], gpu: tuple[str, int], unit: tuple[str, int],
                       path: Path) -> Path:
    """Peak memory against LoRA rank, one line per adapter method, one panel per model, with the
    GPU's capacity as a dashed line. `rows` carry `model`, `method`, `rank`, `peak`."""
    unit_name, unit_bytes = unit
    gpu_name, gpu_bytes = gpu
    adapters = [r for r in rows if r["rank"] is not None]
    models = list(dict.fromkeys(r["model"] for r in adapters))
    fig, axes = _grid(max(len(models), 1))
    for ax, model in zip(axes, models, strict=False):
        for method in dict.fromkeys(r["method"] for r in adapters if r["model"] == model):
            points = sorted((r["rank"], r["peak"] / unit_bytes) for r in adapters
                            if r["model"] == model and r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.axhline(gpu_bytes / unit_bytes, linestyle="--", color="grey", label=f"one {gpu_name}")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in adapters if r["model"] == model})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_title(model)
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel(f"peak ({unit_name})")
        ax.legend(fontsize="small")
    return _save(fig, path)


def gpus_versus_model_size(rows: Sequence[dict], gpu_name: str, path: Path) -> Path:
    """GPUs needed against total parameters, one line per method and rank; each method has its
    own line style, so ranks that need the same GPUs stay visible as overlapping lines of one kind.
    `rows` carry `model`, `total_params`, `method`, `label`, `gpus_needed`."""
    styles = {"full": "-", "lora": "--", "qlora": ":"}
    fig, (ax,) = _grid(1, width=7.0, height=4.5)
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        # None: no GPU count fits (the activations alone overflow one GPU); no point to draw
        points = sorted((r["total_params"], r["gpus_needed"]) for r in mine if r["gpus_needed"] is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle=styles.get(mine[0]["method"], "-"))
    sizes = sorted({(r["total_params"], r["model"]) for r in rows})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([n for n, _ in sizes], [name for _, name in sizes], rotation=20)
    ax.minorticks_off()
    most = max((r["gpus_needed"] for r in rows if r["gpus_needed"] is not None), default=1)
    ticks = [2**i for i in range(most.bit_length() + 1) if 2**i <= 2 * most]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("model (by parameter count)")
    ax.set_ylabel(f"GPUs needed ({gpu_name})")
    ax.legend(fontsize="small")
    return _save(fig, path)


def predicted_versus_measured(series: dict[str, Sequence[tuple[int, int]]], title: str,
                              unit: tuple[str, int], path: Path) -> Path:
    """Scatter of predicted (x) against measured (y) peaks, log-log, with the line y = x.
    `series` maps a legend label to (predicted, measured) pairs in bytes."""
    unit_name, unit_bytes = unit
    fig, (ax,) = _grid(1, width=6.0, height=5.0)
    values = [v / unit_bytes for points in series.values() for pair in points for v in pair if v > 0]
    for label, points in series.items():
        kept = [(p / unit_bytes, m / unit_bytes) for p, m in points if p > 0 and m > 0]  # log axes: no 0
        ax.scatter([p for p, _ in kept], [m for _, m in kept], label=label)
    if values:
        low, high = min(values) / 1.5, max(values) * 1.5
        ax.plot([low, high], [low, high], linestyle="--", color="grey", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted peak ({unit_name})")
    ax.set_ylabel(f"measured peak ({unit_name})")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)

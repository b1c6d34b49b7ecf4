"""The capacity report: models x methods x ranks on one kind of GPU, as markdown with plots.

Every number comes from the planner's JSON (`contract.to_dict(make_plan(...))`), read by key; this
module only arranges and formats it. A column of the summary is data (`Column`): a plan key that
appears later (a time or a cost) becomes a column by adding one entry to `SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..contract import to_dict
from ..errors import REPORTS_EXTRA
from ..files import write_text
from ..gpus import DEFAULT_GPU, MIB, Gpu, get_gpu
from ..plan import MEMORY_KEYS, METHODS, make_plan
from ..precision import get_precision
from ..spec import TrainSetup, default_seq_len
from ..stacks import resolve
from ..units import UNITS, format_bytes
from . import markdown as md
from . import plots
from .markdown import Written

DEFAULT_MODELS = ("gpt2", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b")
DEFAULT_RANKS = (1, 8, 64)
DEFAULT_TASKS = 10

MEMORY_LABELS = {"weights": "weights", "gradients": "gradients", "master_weights": "fp32 master weights",
                 "optimizer_states": "optimizer states", "activations": "activations", "peak": "peak"}


@dataclass(frozen=True)
class Column:
    """One summary column: a header, the keys that reach its value in one `plans[i]` entry of the
    plan JSON, and how the cell is written (a key of `CELL_FORMATS`)."""

    header: str
    path: tuple[str, ...]
    kind: str


CELL_FORMATS: dict[str, Callable[[object, str], str]] = {
    "count": lambda v, unit: f"{v:,}",
    "percent": lambda v, unit: f"{v:.4g}%",
    "bytes": lambda v, unit: format_bytes(v, unit),
    "int": lambda v, unit: "does not fit" if v is None else str(v),
    "text": lambda v, unit: str(v),
}

SUMMARY_COLUMNS: tuple[Column, ...] = (
    Column("trainable params", ("trainable_params",), "count"),
    Column("trainable %", ("trainable_percent",), "percent"),
    *(Column(MEMORY_LABELS[key], ("memory_bytes", key), "bytes") for key in MEMORY_KEYS),
    Column("peak phase", ("peak_phase",), "text"),
    Column("+ CUDA context/cache", ("device_overhead_bytes",), "bytes"),
    Column("GPUs needed", ("gpus_needed",), "int"),
    Column("checkpoint", ("checkpoint_bytes",), "bytes"),
)


@dataclass(frozen=True)
class CapacitySettings:
    """What the report compares. `setup` holds everything but method and rank."""

    models: tuple[str, ...] = DEFAULT_MODELS
    methods: tuple[str, ...] = METHODS
    ranks: tuple[int, ...] = DEFAULT_RANKS
    gpu: Gpu = field(default_factory=lambda: get_gpu(DEFAULT_GPU))
    setup: TrainSetup = field(default_factory=lambda: TrainSetup(tasks=DEFAULT_TASKS))
    unit: str = "GB"
    # No --seq-len given: each model plans at 2,048 tokens or its context when shorter.
    seq_len_from_model: bool = False


def setups_for(settings: CapacitySettings) -> tuple[TrainSetup, ...]:
    """Full fine-tuning once, each adapter method at each rank, in the order asked."""
    setups: list[TrainSetup] = []
    for method in dict.fromkeys(settings.methods):
        if method == "full":
            setups.append(settings.setup.with_(method="full"))
        else:
            setups += [settings.setup.with_(method=method, rank=r) for r in dict.fromkeys(settings.ranks)]
    return tuple(setups)


def plan_dicts(settings: CapacitySettings) -> list[dict]:
    """The planner's JSON for each model, exactly as `lora-plan --format json` would print it."""
    from ..resolve import resolve_model

    setups = setups_for(settings)
    # Two names for one model (an alias and its name) plan it once.
    specs = {spec.name: spec for spec in map(resolve_model, settings.models)}
    return [to_dict(make_plan(spec, _at_seq_len(setups, spec, settings), settings.gpu))
            for spec in specs.values()]


def _at_seq_len(setups: tuple[TrainSetup, ...], spec, settings: CapacitySettings) -> tuple[TrainSetup, ...]:
    if not settings.seq_len_from_model:
        return setups
    return tuple(s.with_(seq_len=default_seq_len(spec)) for s in setups)


def plan_label(entry: dict) -> str:
    return entry["method"] if entry["rank"] is None else f"{entry['method']} r={entry['rank']}"


def _lookup(entry: dict, path: Sequence[str]):
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def summary_frame(plans: Sequence[dict], unit: str, columns: Sequence[Column] = SUMMARY_COLUMNS):
    """One row per model and method. A column no plan has a value for is left out."""
    import pandas as pd

    entries = [(p, e) for p in plans for e in p["plans"]]
    present = [c for c in columns if any(_lookup(e, c.path) is not None for _, e in entries)]
    rows = []
    for plan, entry in entries:
        row = {"model": plan["model"]["name"], "method": plan_label(entry)}
        for c in present:
            value = _lookup(entry, c.path)
            row[c.header] = "-" if value is None else CELL_FORMATS[c.kind](value, unit)
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "method", *(c.header for c in present)])


def _full_trainable(plan: dict) -> int:
    full = [e for e in plan["plans"] if e["method"] == "full"]
    return full[0]["trainable_params"] if full else plan["model"]["total_params"]


def rank_frame(plans: Sequence[dict], unit: str):
    """Trainable parameters at each rank and the reduction against full fine-tuning
    (full trainable / adapter trainable). LoRA and QLoRA train the same adapters, so each rank
    appears once."""
    import pandas as pd

    rows = []
    for plan in plans:
        full = _full_trainable(plan)
        seen = set()
        for e in plan["plans"]:
            if e["rank"] is None or e["rank"] in seen:
                continue
            seen.add(e["rank"])
            rows.append({"model": plan["model"]["name"], "rank": str(e["rank"]),
                         "trainable params": f"{e['trainable_params']:,}",
                         "% of model": f"{e['trainable_percent']:.4g}%",
                         "reduction vs full": f"{full / e['trainable_params']:,.1f}x",
                         "adapter checkpoint": format_bytes(e["checkpoint_bytes"], unit)})
    return pd.DataFrame(rows, columns=["model", "rank", "trainable params", "% of model",
                                       "reduction vs full", "adapter checkpoint"])


def storage_frame(plans: Sequence[dict], tasks: int, unit: str):
    """N fine-tunes kept: N full checkpoints for full fine-tuning, one base plus N adapters for
    LoRA and QLoRA (the plan's `storage_bytes`), and how many times smaller than N full copies."""
    import pandas as pd

    rows = []
    for plan in plans:
        for e in plan["plans"]:
            store = e["storage_bytes"]
            kept = store["full_copies"] if e["method"] == "full" else store["base_plus_adapters"]
            rows.append({"model": plan["model"]["name"], "method": plan_label(e),
                         "one fine-tune": format_bytes(e["checkpoint_bytes"], unit),
                         f"{tasks} fine-tunes": format_bytes(kept, unit),
                         f"{tasks} full copies": format_bytes(store["full_copies"], unit),
                         "smaller by": f"{store['full_copies'] / kept:,.1f}x"})
    return pd.DataFrame(rows)


def plot_rows(plans: Sequence[dict]) -> list[dict]:
    """Raw numbers for the charts, one dict per model and method, read from the plan JSON."""
    return [
        {"model": p["model"]["name"], "total_params": p["model"]["total_params"],
         "label": plan_label(e), "method": e["method"], "rank": e["rank"],
         "gpus_needed": e["gpus_needed"], **e["memory_bytes"]}
        for p in plans for e in p["plans"]
    ]


def _draw(plans: Sequence[dict], settings: CapacitySettings, out: Path) -> dict[str, Path]:
    rows = plot_rows(plans)
    unit = (settings.unit, UNITS[settings.unit.upper()])
    terms = [k for k in MEMORY_KEYS if k != "peak"]
    images = {
        "Memory by term, per method": plots.memory_breakdown(
            rows, terms, unit, out.with_name(f"{out.stem}-memory-breakdown.png")),
        "GPUs needed per model size": plots.gpus_versus_model_size(
            rows, settings.gpu.name, out.with_name(f"{out.stem}-gpus-per-model.png")),
    }
    if any(r["rank"] is not None for r in rows):
        images["Peak memory versus LoRA rank"] = plots.memory_versus_rank(
            rows, (settings.gpu.name, settings.gpu.memory_bytes), unit,
            out.with_name(f"{out.stem}-memory-vs-rank.png"))
    return images


def _setup_fields(setup: TrainSetup, seq_len_from_model: bool = False) -> str:
    """Every field of the training setup but method and rank (which vary across the table)."""
    values = {k: v for k, v in dataclasses.asdict(setup).items() if k not in ("method", "rank")}
    if seq_len_from_model:
        values["seq_len"] = f"{setup.seq_len} (or the model's context when shorter)"
    return ", ".join(f"{k}={','.join(v) if isinstance(v, tuple | list) else v}" for k, v in values.items())


def settings_section(plans: Sequence[dict], settings: CapacitySettings, command: str) -> list[str]:
    precision = get_precision(settings.setup.precision)
    gpu = settings.gpu
    lines = [
        "## Settings and conventions", "",
        f"- made by: {md.code(command)}",
        "- models: " + "; ".join(
            f"{p['model']['name']} ({p['model']['family']}, {p['model']['total_params']:,} parameters"
            + (f", {p['model']['source']}" if p["model"]["source"] else "") + ")" for p in plans),
        f"- methods: {', '.join(dict.fromkeys(settings.methods))}" + (
            f"; LoRA ranks: {', '.join(str(r) for r in dict.fromkeys(settings.ranks))}"
            if set(settings.methods) - {"full"} else ""),
        f"- precision: {precision.name} ({precision.summary}); optimizer: {settings.setup.optimizer}",
        f"- GPU: {gpu.name}, {gpu.memory_bytes:,} bytes ({gpu.memory_bytes / MIB:,.0f} MiB) as the "
        "driver reports it; GPUs needed: the fewest over ddp/zero1/zero2/zero3/fsdp whose per-GPU peak "
        "plus the CUDA allowance fits (`-`: none does; a micro-batch's activations alone overflow one GPU)",
    ]
    for p in plans:
        targets = next((e["target_modules"] for e in p["plans"] if e["rank"] is not None), None)
        if targets:
            lines.append(f"- LoRA targets for {p['model']['name']}: {', '.join(targets)}")
    if any(e.get("peak_phase") for p in plans for e in p["plans"]):
        lines.append("- peak: the highest point of the training step's memory timeline (forward, backward, "
                     "optimizer), reached in the `peak phase`; `+ CUDA context/cache` is the device's own "
                     "allowance, outside the peak")
    lines += [
        f"- training setup: {_setup_fields(resolve(settings.setup), settings.seq_len_from_model)}",
        "- checkpoints: single safetensors files, header included; storage compares "
        f"{settings.setup.tasks} full copies with one base plus {settings.setup.tasks} adapters",
        f"- sizes in {md.unit_phrase(settings.unit)}; parameter counts are exact",
    ]
    notes = dict.fromkeys(n for p in plans for n in p["notes"])
    lines += [f"- note: {n}" for n in notes]
    return lines


def capacity_markdown(plans: Sequence[dict], settings: CapacitySettings, command: str,
                      images: dict[str, Path] | None, out: Path, no_plots_reason: str = "") -> str:
    tasks = settings.setup.tasks
    lines = [
        "# Fine-tuning capacity", "",
        "Trainable parameters, memory by term, GPUs needed and checkpoint sizes for each model and "
        "method, as `lora-plan` plans them.", "",
        *settings_section(plans, settings, command), "",
        "## Summary", "",
        md.table(summary_frame(plans, settings.unit), 2), "",
    ]
    ranks = rank_frame(plans, settings.unit)
    if not ranks.empty:
        lines += ["## Trainable parameters versus rank", "",
                  "Reduction = parameters trained in full fine-tuning / parameters trained with the "
                  "adapters. QLoRA trains the same adapters as LoRA.", "",
                  md.table(ranks), ""]
    lines += [f"## Storage for {tasks} fine-tunes", "",
              f"Full fine-tuning keeps {tasks} full checkpoints; LoRA and QLoRA keep one base "
              f"checkpoint plus {tasks} adapters.", "",
              md.table(storage_frame(plans, tasks, settings.unit), 2), "",
              "## Plots", ""]
    if images:
        for alt, path in images.items():
            lines += [f"### {alt}", "", md.image(alt, path, out), ""]
    else:
        lines += [f"No plots: {no_plots_reason}. Install them with {REPORTS_EXTRA}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_capacity_report(settings: CapacitySettings, out: Path, command: str) -> Written:
    """Plan, draw (when matplotlib is there) and write the markdown to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plans = plan_dicts(settings)
    warnings: list[str] = []
    reason = ""
    try:
        images = _draw(plans, settings, out)
    except plots.PlotsUnavailable as exc:
        images, reason = {}, str(exc)
        warnings.append(f"{reason}: the report has no plots")
    write_text(out, capacity_markdown(plans, settings, command, images, out, reason))
    return Written(out, tuple(images.values()), tuple(warnings))

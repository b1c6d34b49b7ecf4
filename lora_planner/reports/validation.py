"""The validation report: the planner's predictions against measured peaks, from JSONL records.

A record is one measured job (format 1, `lora_planner.record_schema`, written by `lora-plan
measure`). Bad input never stops the report: a missing file, a line that is not JSON, or a record
of another format becomes a `Problem` with its file and line, listed in the report, and the
readable records are reported as usual.

Only jobs that finished (`ok`) enter the error statistics: a job that ran out of memory, failed or
timed out has at most a partial peak. Those go to a table of whether the plan foresaw them, by the
one fit rule (`allowance.fits`: planned peak + device allowance within the device's memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..allowance import fits
from ..errors import REPORTS_EXTRA
from ..files import write_text
from ..record_schema import STATUSES, Skipped, nvml_growth, predicted_device_peak, read_records_file
from ..record_schema import check_record as check_record  # the one check every reader uses
from ..record_schema import relative_error as relative_error
from ..record_schema import whole as _whole
from ..units import UNITS, format_bytes
from . import markdown as md
from . import plots
from .markdown import Written


def allocator_peak(measured: dict) -> int | None:
    """The allocator's peak (CUDA), or the live-tensor tracer's (CPU): `peak_allocated`."""
    return _whole(measured.get("peak_allocated"))


def device_growth(measured: dict) -> int | None:
    """What the device (NVML) saw the job add: peak used - baseline used before CUDA started.
    The CUDA context, cuBLAS workspaces and the allocator's cache are in it; the planned peak is
    not, so it is set beside the planned peak + the device allowance."""
    return nvml_growth(measured)


def planned_peak(predicted: dict) -> int | None:
    return _whole(predicted.get("peak"))


@dataclass(frozen=True)
class Metric:
    """A measured peak compared with a predicted one: its name in the report, how each is read
    (from `measured`, from `predicted`), and the key of its stored error under `relative_error`."""

    name: str
    read: Callable[[dict], int | None]
    error_key: str
    predicted: Callable[[dict], int | None] = planned_peak


METRICS = (
    Metric("allocator peak", allocator_peak, "peak_allocated"),
    Metric("device growth (NVML)", device_growth, "nvml_peak_used", predicted_device_peak),
)

# The tracer's categories at the measured peak (`measured.at_peak`), by the planned term each one
# is compared with; buffers, inputs and temporaries have no planned term.
TRACED_TERMS = {"parameters": "weights", "gradients": "gradients", "optimizer_states": "optimizer_states",
                "activations": "activations"}

# Input that could not be used, and where it is (`file` or `file:line`): the records reader's own
# type, so a skipped line and a missing file are reported alike.
Problem = Skipped


@dataclass(frozen=True)
class Loaded:
    """One usable record and the `file:line` it came from."""

    record: dict
    where: str


def _files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    """The files to read: each path, or the *.jsonl files of a folder."""
    files, problems = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                problems.append(Problem(str(path), "folder holds no .jsonl files"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(str(path), "no such file"))
    return files, problems


def read_records(paths: Iterable[str | Path]) -> tuple[list[Loaded], list[Problem]]:
    """Every usable record in the files, and a `Problem` for everything else: a file that cannot
    be read, and each non-blank line `record_schema.check_record` refuses (the rest of its file
    is read as usual)."""
    files, problems = _files(paths)
    loaded: list[Loaded] = []
    for path in files:
        try:
            found, skipped = read_records_file(path)
        except OSError as exc:
            problems.append(Problem(str(path), f"cannot read ({exc.strerror or exc})"))
            continue
        loaded += [Loaded(record, f"{path}:{number}") for number, record in found]
        problems += skipped
    return loaded, problems


def metric_error(record: dict, metric: Metric) -> float | None:
    """The record's own relative error when it has one, else computed from its figures; None for
    a job that did not finish (its peak is partial)."""
    if record["status"] != "ok":
        return None
    stored = (record.get("relative_error") or {}).get(metric.error_key)
    if isinstance(stored, int | float) and not isinstance(stored, bool):
        return float(stored)
    return relative_error(metric.predicted(record["predicted"]), metric.read(record["measured"]))


def device_label(device: dict) -> str:
    return f"{device.get('kind', '?')}: {device.get('name') or 'unnamed device'}"


def group_by_device(loaded: Sequence[Loaded]) -> dict[str, list[Loaded]]:
    """Records keyed by device kind and name, in the order first seen."""
    groups: dict[str, list[Loaded]] = {}
    for item in loaded:
        groups.setdefault(device_label(item.record["device"]), []).append(item)
    return groups


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _bytes(value, unit: str) -> str:
    return "-" if value is None else format_bytes(value, unit)


def _job_label(settings: dict) -> str:
    method = settings.get("method", "?")
    rank = settings.get("rank")
    return method if rank is None else f"{method} r={rank}"


def jobs_frame(group: Sequence[Loaded], unit: str):
    """Predicted against measured for each job of one device."""
    import pandas as pd

    rows = []
    for item in group:
        r = item.record
        s, m = r["settings"], r["measured"]
        row = {"job": r["id"], "model": s.get("model", "?"), "method": _job_label(s),
               "batch x seq": f"{s.get('batch_size', '?')} x {s.get('seq_len', '?')}",
               "precision": s.get("precision", "?"),
               "status": r["status"], "source": m.get("source") or "-",
               "predicted peak": _bytes(r["predicted"]["peak"], unit),
               # a CPU job has no device allowance: nothing to add
               "+ allowance": _bytes(predicted_device_peak(r["predicted"])
                                     if r["predicted"].get("device_overhead_bytes") else None, unit)}
        for metric in METRICS:
            row[metric.name] = _bytes(metric.read(m), unit)
            row[f"error, {metric.name}"] = _percent(metric_error(r, metric))
        rows.append(row)
    return pd.DataFrame(rows)


def terms_frame(group: Sequence[Loaded], unit: str):
    """Memory by category at the measured peak (the tracer's `measured.at_peak`) beside the planned
    term it corresponds to (`TRACED_TERMS`); categories with no planned term show "-"."""
    import pandas as pd

    rows = []
    for item in group:
        r = item.record
        phases = f"{r['predicted'].get('peak_phase') or '-'} / {r['measured'].get('peak_phase') or '-'}"
        for category, measured in (r["measured"].get("at_peak") or {}).items():
            term = TRACED_TERMS.get(category)
            predicted = _whole(r["predicted"].get(term)) if term else None
            rows.append({"job": r["id"], "traced": category, "planned term": term or "-",
                         "peak phase (planned / traced)": phases,
                         "planned": _bytes(predicted, unit), "traced at peak": _bytes(_whole(measured), unit),
                         "error": _percent(relative_error(predicted, _whole(measured)))})
    return pd.DataFrame(rows)


def distribution_frame(group: Sequence[Loaded]):
    """Median, 90th percentile (linear interpolation) and maximum of |relative error| per metric,
    over the jobs that have the measurement, and the median signed error (the bias)."""
    import pandas as pd

    rows = []
    for metric in METRICS:
        errors = pd.Series([e for item in group if (e := metric_error(item.record, metric)) is not None],
                           dtype="float64")
        if errors.empty:
            continue
        size = errors.abs()
        rows.append({"metric": metric.name, "jobs": str(len(errors)),
                     "median |error|": f"{100 * size.median():.1f}%",
                     "p90 |error|": f"{100 * size.quantile(0.9):.1f}%",
                     "max |error|": f"{100 * size.max():.1f}%",
                     "median error": _percent(float(errors.median()))})
    return pd.DataFrame(rows)


def worst_frame(group: Sequence[Loaded], count: int, unit: str):
    """The `count` largest |relative errors| over every metric of every job."""
    import pandas as pd

    cases = []
    for item in group:
        r = item.record
        for metric in METRICS:
            error = metric_error(r, metric)
            if error is not None:
                cases.append((abs(error), r["id"], metric.name, metric.predicted(r["predicted"]),
                              metric.read(r["measured"]), error))
    cases.sort(key=lambda c: (-c[0], c[1], c[2]))
    return pd.DataFrame(
        [{"job": job, "metric": name, "predicted": _bytes(p, unit), "measured": _bytes(m, unit),
          "error": _percent(e)} for _, job, name, p, m, e in cases[:count]])


def planned_to_fit(record: dict) -> bool | None:
    """The one fit rule on a record: planned peak + device allowance within the device's memory;
    None when the device's memory is unknown (a CPU job, a job that failed before CUDA started)."""
    total = _whole(record["device"].get("memory_total"))
    if total is None:
        return None
    return fits(record["predicted"]["peak"], _whole(record["predicted"].get("device_overhead_bytes")) or 0,
                total)


def oom_verdict(record: dict) -> str | None:
    """Whether the plan foresaw how a job ended: for `oom`, `error` and `timeout` records, and for
    `ok` ones the plan said would not fit. None for a job that finished as planned."""
    status, planned = record["status"], planned_to_fit(record)
    if status == "ok":
        return "predicted out of memory, but it ran" if planned is False else None
    if status == "oom":
        if planned is None:
            return "ran out; device memory unknown"
        return "not foreseen" if planned else "foreseen"
    said = {None: "device memory unknown", True: "the plan said it fits",
            False: "the plan said it would not fit"}[planned]
    return f"{'failed' if status == 'error' else 'timed out'}, not for memory; {said}"


def oom_frame(group: Sequence[Loaded], unit: str):
    import pandas as pd

    rows = [{"job": item.record["id"], "status": item.record["status"],
             "predicted peak": _bytes(item.record["predicted"]["peak"], unit),
             "+ allowance": _bytes(predicted_device_peak(item.record["predicted"]), unit),
             "device memory": _bytes(item.record["device"].get("memory_total"), unit),
             "verdict": verdict}
            for item in group if (verdict := oom_verdict(item.record))]
    return pd.DataFrame(rows)


def fitted_allowance_line(group: Sequence[Loaded], unit: str) -> str | None:
    """The allowance fitted from the ok GPU jobs that have NVML readings (`allowance.fit_allowance`),
    for the device's generation; None with fewer than two distinct peaks."""
    from ..allowance import cuda_context_bytes, fit_allowance, generation_of

    records = [item.record for item in group if item.record["status"] == "ok"]
    points = [(peak, growth) for r in records
              if (peak := allocator_peak(r["measured"])) is not None
              and (growth := device_growth(r["measured"])) is not None]
    capability = next((tuple(c) for r in records if isinstance(c := r["device"].get("capability"), list)),
                      None)
    generation = generation_of(None, capability)
    fitted = fit_allowance(points, generation)
    if fitted is None:
        return None
    return (f"Allowance fitted from these jobs ({fitted.source}, {generation}): CUDA context "
            f"{_bytes(fitted.context_bytes, unit)} (planned {_bytes(cuda_context_bytes(generation), unit)}), "
            f"allocator cache {100 * fitted.cache_fraction:.1f}% of the peak.")


def provenance_frame(loaded: Sequence[Loaded]):
    """Where each record came from: file and line, when, which command, which versions."""
    import pandas as pd

    rows = []
    for item in loaded:
        r, d = item.record, item.record["device"]
        rows.append({"job": r["id"], "record": item.where, "created": r.get("created") or "-",
                     "command": md.code(r["command"]) if r.get("command") else "-",
                     "lora-plan": r.get("lora_plan_version") or "-",
                     "device": d.get("name") or "-", "torch": d.get("torch") or "-",
                     "driver": d.get("driver") or "-", "CUDA": d.get("cuda") or "-",
                     "notes": "; ".join(r.get("notes") or []) or "-"})
    return pd.DataFrame(rows)


def _scatter(group: Sequence[Loaded], title: str, unit: str, path: Path) -> Path | None:
    series = {}
    for metric in METRICS:
        points = [(predicted, measured) for item in group if item.record["status"] == "ok"
                  and (measured := metric.read(item.record["measured"])) is not None
                  and (predicted := metric.predicted(item.record["predicted"])) is not None]
        if points:
            series[metric.name] = points
    scale = (unit, UNITS[unit.upper()])
    return plots.predicted_versus_measured(series, title, scale, path) if series else None


def validation_markdown(loaded: Sequence[Loaded], problems: Sequence[Problem], inputs: Sequence[str],
                        command: str, unit: str, worst: int, images: dict[str, Path] | None,
                        out: Path, no_plots_reason: str = "") -> str:
    groups = group_by_device(loaded)
    lines = [
        "# Predicted versus measured memory", "",
        "Each job's predicted peak (`lora-plan`'s plan for the job's settings) against the peaks "
        "measured while it ran. Relative error = (predicted - measured) / measured: positive when "
        "the plan over-estimates.", "",
        "- allocator peak: the largest `torch.cuda.max_memory_allocated` of the job on a GPU, or the "
        "live-tensor tracer's peak on CPU (the `source` column says which)",
        "- device growth (NVML): the device's peak memory used minus its use before CUDA started, "
        "set beside the planned peak + the device allowance (CUDA context, cuBLAS workspaces, "
        "the allocator's segments and cache)",
        "- only jobs that finished (`ok`) enter the errors; the others are under Out of memory",
        f"- made by: {md.code(command)}",
        f"- inputs: {', '.join(md.code(i) for i in inputs)}",
        f"- records read: {len(loaded)}; problems: {len(problems)}",
        f"- sizes in {md.unit_phrase(unit)}",
        "",
    ]
    if problems:
        lines += ["## Input problems", "",
                  "These were skipped; everything else is reported below.", "",
                  *(f"- `{p.where}`: {p.why}" for p in problems), ""]
    if not loaded:
        lines += ["No usable records.", ""]
        return "\n".join(lines).rstrip("\n") + "\n"
    lines += ["## Devices", "", md.table(_device_summary(groups)), ""]
    for label, group in groups.items():
        image = md.image(f"predicted versus measured, {label}", images[label], out) if (
            images and label in images) else ""
        if images is None:
            image = f"No plot: {no_plots_reason}. Install it with {REPORTS_EXTRA}."
        lines += device_section(label, group, unit, worst, image)
    lines += ["## Provenance", "", md.table(provenance_frame(loaded), 10), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _one_line(text: str) -> str:
    # An error message may span lines; a markdown list item must not.
    return " ".join(str(text).split())


def device_section(label: str, group: Sequence[Loaded], unit: str, worst: int, image: str) -> list[str]:
    """One device's jobs, traced terms, error distribution, worst cases, out-of-memory verdicts,
    failures and scatter plot (`image`: its markdown link, or why there is none)."""
    lines = [f"## {label}", "", _device_line(group[0].record["device"], unit), "",
             "### Jobs", "", md.table(jobs_frame(group, unit), 7), "",
             "### Memory by term at the peak", ""]
    terms = terms_frame(group, unit)
    if terms.empty:
        lines.append("No job on this device traced its memory by term (the tracer runs for CPU jobs).")
    else:
        lines += ["What the live-tensor tracer found alive at the measured peak, beside the planned "
                  "term. It is a snapshot at that moment: a term still being built then (gradients "
                  "during backward) shows only its part.", "", md.table(terms, 4)]
    distribution = distribution_frame(group)
    lines += ["", "### Error distribution", "",
              md.table(distribution) if not distribution.empty else "No job has a measured peak."]
    worst_cases = worst_frame(group, worst, unit)
    if not worst_cases.empty:
        lines += ["", "### Worst cases", "", f"The {len(worst_cases)} largest relative errors, any metric.",
                  "", md.table(worst_cases, 2)]
    ooms = oom_frame(group, unit)
    lines += ["", "### Out of memory", "",
              "Jobs that did not finish, and jobs the plan said would not fit, by the fit rule: "
              "planned peak + device allowance within the device's memory.", "",
              md.table(ooms, 2) if not ooms.empty else "No job ran out of memory, and none was predicted to."]
    fitted = fitted_allowance_line(group, unit)
    if fitted:
        lines += ["", fitted]
    failed = [item.record for item in group if item.record["status"] in ("error", "timeout")]
    if failed:
        lines += ["", "### Failed jobs", "",
                  *(f"- `{r['id']}`: {_one_line(r.get('error') or 'no message')}" for r in failed)]
    lines += [""]
    if image:
        lines += [image, ""]
    return lines


def _device_summary(groups: dict[str, list[Loaded]]):
    import pandas as pd

    return pd.DataFrame([
        {"device": label, "jobs": str(len(group)),
         **{s: str(sum(item.record["status"] == s for item in group)) for s in STATUSES}}
        for label, group in groups.items()])


def _device_line(device: dict, unit: str) -> str:
    total = device.get("memory_total")
    parts = [f"memory {_bytes(total, unit)}" if isinstance(total, int) else "memory unknown",
             f"torch {device.get('torch') or '?'}"]
    if device.get("driver"):
        parts.append(f"driver {device['driver']}")
    if device.get("cuda"):
        parts.append(f"CUDA {device['cuda']}")
    return "Device: " + ", ".join(parts) + "."


def _problems_warning(problems: Sequence[Problem], shown: int = 5) -> str:
    listed = "; ".join(f"{p.where} ({p.why})" for p in problems[:shown])
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    inputs = "input" if len(problems) == 1 else "inputs"
    return f"skipped {len(problems)} unusable {inputs} (listed in the report): {listed}{more}"


def write_validation_report(paths: Sequence[str | Path], out: Path, command: str, unit: str = "GB",
                            worst: int = 5) -> Written:
    """Read the records, draw one scatter per device (when matplotlib is there), write `out`.
    Input problems become warnings as well as a section of the report."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded, problems = read_records(paths)
    # One warning for every input problem, however many: each is listed in the report.
    warnings = [_problems_warning(problems)] if problems else []
    images: dict[str, Path] | None = {}
    reason = ""
    try:
        for index, (label, group) in enumerate(group_by_device(loaded).items(), start=1):
            path = _scatter(group, label, unit, out.with_name(f"{out.stem}-scatter-{index}.png"))
            if path is not None:
                images[label] = path
    except plots.PlotsUnavailable as exc:
        images, reason = None, str(exc)
        warnings.append(f"{reason}: the report has no plots")
    text = validation_markdown(loaded, problems, [str(p) for p in paths], command, unit, worst, images,
                               out, reason)
    write_text(out, text)
    return Written(out, tuple((images or {}).values()), tuple(warnings), len(loaded))

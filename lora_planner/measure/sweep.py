"""A grid of measured jobs, each in its own subprocess, resumable.

A sweep spec (TOML, YAML or JSON) holds fixed settings and a grid of lists; every combination is a
job. Settings that do not apply are normalised away (a full fine-tune has no rank), so the grid
`method = [full, lora]` x `rank = [1, 8]` is three jobs, not four:

    [fixed]
    model = "gpt2"
    steps = 5

    [grid]
    method = ["full", "lora"]
    rank = [1, 8]
    batch_size = [1, 8]

Jobs whose id the results file already holds are skipped, so rerunning an interrupted sweep runs
only what is missing. A job that dies without writing its record (a crash, the kernel's
out-of-memory killer) gets an `error` record from the sweep, with the prediction beside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlanError
from .job import JobSettings, model_spec, predict
from .records import append_record, finished_ids, make_record, read_records

SPEC_SECTIONS = ("fixed", "grid")


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec: `.toml`, `.yaml`/`.yml` or `.json`, with `fixed` and `grid` tables."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no sweep spec at {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            spec = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise PlanError("YAML sweep specs need pyyaml: pip install 'lora-plan[measure]'") from None
            spec = yaml.safe_load(text) or {}
        elif suffix == ".json":
            spec = json.loads(text)
        else:
            raise PlanError(f"{path}: a sweep spec ends in .toml, .yaml, .yml or .json")
    except PlanError:
        raise
    except Exception as exc:  # each parser has its own error type; all mean a malformed file
        raise PlanError(f"{path}: cannot parse the sweep spec ({type(exc).__name__}: {exc})") from None
    if not isinstance(spec, dict):
        raise PlanError(f"{path}: a sweep spec is a table with `fixed` and `grid`")
    unknown = sorted(set(spec) - set(SPEC_SECTIONS))
    if unknown:
        raise PlanError(f"{path}: unknown section {', '.join(map(repr, unknown))}; "
                        f"a sweep spec has {' and '.join(SPEC_SECTIONS)}")
    for section in SPEC_SECTIONS:
        if not isinstance(spec.get(section, {}), dict):
            raise PlanError(f"{path}: `{section}` must be a table of settings")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise PlanError(f"{path}: grid `{key}` must be a non-empty list")
    return {"fixed": dict(spec.get("fixed", {})), "grid": dict(spec.get("grid", {}))}


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(JobSettings)}


def parse_value(key: str, text: str):
    """A setting's value from command-line text, typed by the setting: `rank=8`, `steps=5`,
    `grad_checkpointing=true`, `targets=c_attn+c_fc` (several targets joined by `+`)."""
    kind = _FIELD_TYPES.get(key)
    if kind is None:
        raise PlanError(f"unknown job setting {key!r}; known: {', '.join(_FIELD_TYPES)}")
    text = text.strip()
    try:
        if key == "targets":
            return [t for t in text.split("+") if t]
        if kind == "bool":
            lowered = text.lower()
            if lowered not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "on", "1", "yes")
        if kind.startswith("int"):
            return None if text.lower() == "none" else int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise PlanError(f"setting {key}: cannot read {text!r} as {kind}") from None
    return None if kind.endswith("None") and text.lower() == "none" else text


def parse_assignments(items: Iterable[str], as_lists: bool) -> dict:
    """`key=value` (fixed) or `key=v1,v2` (grid) options into a settings dict."""
    result: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PlanError(f"expected KEY=VALUE, got {item!r}")
        if as_lists:
            result[key] = [parse_value(key, v) for v in value.split(",") if v.strip()]
            if not result[key]:
                raise PlanError(f"--grid {key}= lists no values")
        else:
            result[key] = parse_value(key, value)
    return result


def expand(spec: dict) -> list[JobSettings]:
    """Every combination of the grid over the fixed settings, checked, duplicates removed,
    in the grid's order (the last key varies fastest)."""
    fixed, grid = spec.get("fixed", {}), spec.get("grid", {})
    keys = list(grid)
    jobs: dict[str, JobSettings] = {}
    for combination in itertools.product(*(grid[k] for k in keys)):
        job = JobSettings.from_dict({**fixed, **dict(zip(keys, combination, strict=True))})
        jobs.setdefault(job.id, job)
    return list(jobs.values())


def check_jobs(jobs: list[JobSettings]) -> dict[str, dict]:
    """Plan every job before any runs, so a mistake in the spec fails at once, in one line."""
    predictions = {}
    for job in jobs:
        try:
            predictions[job.id] = predict(job, model_spec(job))
        except PlanError as exc:
            raise PlanError(f"job {job.id}: {exc}") from None
    return predictions


@dataclass(frozen=True)
class Launch:
    returncode: int
    output_tail: str


Launcher = Callable[[JobSettings, Path, str], Launch]


def launch_subprocess(job: JobSettings, output: Path, command: str) -> Launch:
    """Run one job in a fresh Python process: its memory, and any crash, end with it."""
    args = [sys.executable, "-m", "lora_planner.measure.job", "--settings", json.dumps(job.to_dict()),
            "-o", str(output), "--command", command]
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Launch(done.returncode, done.stdout[-2000:])


def _lost_job_record(job: JobSettings, predicted: dict, launch: Launch, command: str) -> dict:
    if launch.returncode < 0:
        why = f"the job process was ended by signal {-launch.returncode} before writing its record"
    else:
        why = f"the job process exited with code {launch.returncode} without writing its record"
    tail = launch.output_tail.strip().splitlines()
    oom = "out of memory" in launch.output_tail.lower()
    device = {"kind": job.device, "name": None, "driver": None, "cuda": None, "torch": None,
              "memory_total": None}
    return make_record(job.to_dict(), status="oom" if oom else "error",
                       error=why + (f"; last output: {tail[-1]}" if tail else ""), device=device,
                       predicted=predicted, measured={"source": "cuda" if job.device == "cuda" else "tracer"},
                       command=command, notes=["device provenance unknown: the job wrote no record"])


@dataclass(frozen=True)
class SweepResult:
    total: int
    skipped: int
    statuses: dict[str, int]

    def summary(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "none run"
        return f"{self.total} jobs: {self.skipped} already in the results file; ran {ran}"


def run_sweep(jobs: list[JobSettings], output: str | Path, command: str = "",
              launcher: Launcher = launch_subprocess, progress: bool = True) -> SweepResult:
    """Run the jobs the results file does not hold yet, one subprocess each, with a progress bar
    (jobs done, rate, ETA) on stderr."""
    from tqdm import tqdm

    output = Path(output)
    predictions = check_jobs(jobs)
    done = finished_ids(output)
    todo = [job for job in jobs if job.id not in done]
    statuses: Counter[str] = Counter()
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="job", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for job in todo:
            bar.set_postfix_str(job.id, refresh=True)
            launch = launcher(job, output, command)
            record = next((r for r in read_records(output) if r["id"] == job.id), None)
            if record is None:
                record = _lost_job_record(job, predictions[job.id], launch, command)
                append_record(output, record)
            statuses[record["status"]] += 1
            bar.update()
    return SweepResult(len(jobs), len(jobs) - len(todo), dict(statuses))

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
out-of-memory killer) gets an `error` record from the sweep, with the prediction beside it; one
that runs past `timeout` seconds is killed and recorded as `timeout`.

Scaling out uses what schedulers already do: `devices` runs one job per GPU at a time on one
machine, and `shard=(K, N)` runs every N-th job from the K-th, so the N tasks of an array job
(Slurm's `--array=0-N-1` or any scheduler's) split a grid between them, each into a results file
of its own; `lora-plan report validation` reads them all.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlanError
from .job import SETTING_KINDS, Job, is_out_of_memory, model_spec, predict
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


def parse_value(key: str, text: str):
    """A setting's value from command-line text, typed by the setting (`SETTING_KINDS`): `rank=8`,
    `steps=5`, `grad_checkpointing=true`, `dropout=none`, `targets=c_attn+c_fc` (several targets
    joined by `+`)."""
    kind = SETTING_KINDS.get(key)
    if kind is None:
        raise PlanError(f"unknown job setting {key!r}; known: {', '.join(SETTING_KINDS)}")
    text = text.strip()
    if kind.endswith("|none") and text.lower() == "none":
        return None
    try:
        if kind == "list":
            return [t for t in text.split("+") if t]
        if kind == "bool":
            lowered = text.lower()
            if lowered not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "on", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        expected = {"bool": "true or false", "int": "a whole number", "int|none": "a whole number"}.get(
            kind, "a number")
        expected += " or none" if kind.endswith("|none") else ""
        raise PlanError(f"setting {key}: expected {expected}, got {text!r}") from None
    return text


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


def expand(spec: dict) -> list[Job]:
    """Every combination of the grid over the fixed settings, checked, duplicates removed,
    in the grid's order (the last key varies fastest)."""
    fixed, grid = spec.get("fixed", {}), spec.get("grid", {})
    keys = list(grid)
    jobs: dict[str, Job] = {}
    for combination in itertools.product(*(grid[k] for k in keys)):
        job = Job.from_dict({**fixed, **dict(zip(keys, combination, strict=True))})
        jobs.setdefault(job.id, job)
    return list(jobs.values())


def check_jobs(jobs: list[Job]) -> dict[str, dict]:
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
    timed_out: bool = False


# (job, the file its record goes to, the command line, the CUDA device it may see or None, the
# timeout in seconds or None) -> how the process ended.
Launcher = Callable[[Job, Path, str, "str | None", "float | None"], Launch]


def launch_subprocess(job: Job, output: Path, command: str, device: str | None = None,
                      timeout: float | None = None) -> Launch:
    """Run one job in a fresh Python process: its memory, and any crash, end with it. `device`
    sets CUDA_VISIBLE_DEVICES (the job then sees that one GPU as cuda:0); past `timeout` seconds
    the process and everything it started are killed."""
    args = [sys.executable, "-m", "lora_planner.measure.job", "--settings", json.dumps(job.to_dict()),
            "-o", str(output), "--command", command]
    if job.run.device == "cpu":
        args.append("--guard")  # a CPU job too large for the host would take the machine down
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return Launch(process.returncode, (out or "")[-2000:], timed_out=True)
    return Launch(process.returncode, (out or "")[-2000:])


def _lost_job_record(job: Job, predicted: dict, launch: Launch, command: str,
                     timeout: float | None = None) -> dict:
    tail = launch.output_tail.strip().splitlines()
    if launch.timed_out:
        why, status = f"the job ran past the {timeout:g} s timeout and was killed", "timeout"
    else:
        if launch.returncode < 0:
            why = f"the job process was ended by signal {-launch.returncode} before writing its record"
        else:
            why = f"the job process exited with code {launch.returncode} without writing its record"
        status = "oom" if is_out_of_memory(RuntimeError(launch.output_tail)) else "error"
    device = {"kind": job.run.device, "name": None, "driver": None, "cuda": None, "torch": None,
              "memory_total": None}
    source = "cuda" if job.run.device == "cuda" else "tracer"
    return make_record(job.to_dict(), status=status,
                       error=why + (f"; last output: {tail[-1]}" if tail else ""), device=device,
                       predicted=predicted, measured={"source": source},
                       command=command, notes=["device provenance unknown: the job wrote no record"])


@dataclass(frozen=True)
class SweepResult:
    total: int
    skipped: int
    statuses: dict[str, int]
    other_shards: int = 0

    def summary(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "nothing"
        shard = f" ({self.other_shards} left to other shards)" if self.other_shards else ""
        return f"{self.total} jobs{shard}: {self.skipped} already in the results file; ran {ran}"


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N`: this is shard K of N (K from 0 to N-1, as a scheduler's array index)."""
    k, sep, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise PlanError(f"--shard takes K/N with 0 <= K < N (this shard of N), got {text!r}")
    return index, count


def shard_jobs(jobs: list[Job], shard: tuple[int, int] | None) -> list[Job]:
    """Every N-th job from the K-th: the shards of a grid are disjoint and together the whole."""
    if shard is None:
        return list(jobs)
    index, count = shard
    return list(jobs[index::count])


def run_sweep(jobs: list[Job], output: str | Path, command: str = "",
              launcher: Launcher = launch_subprocess, progress: bool = True, *,
              timeout: float | None = None, devices: tuple[str, ...] = (),
              shard: tuple[int, int] | None = None) -> SweepResult:
    """Run the jobs (of this `shard`) the results file does not hold yet, one subprocess each,
    with a progress bar (jobs done, rate, ETA) on stderr.

    With `devices`, one job runs on each listed GPU at a time (CUDA_VISIBLE_DEVICES set per job).
    Each job writes its record to a file of its own, which the sweep appends to `output` under a
    lock as the job ends; a job that wrote none (killed, timed out) gets a record from the sweep.
    """
    from tqdm import tqdm

    output = Path(output)
    mine = shard_jobs(jobs, shard)
    predictions = check_jobs(mine)
    done = finished_ids(output)
    todo = [job for job in mine if job.id not in done]
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    free: queue.Queue[str | None] = queue.Queue()
    for device in devices or (None,):
        free.put(device)

    def run_one(job: Job, bar) -> None:
        device = free.get()
        part = output.with_name(f".{output.name}.{job.id}.part")
        part.unlink(missing_ok=True)
        try:
            launch = launcher(job, part, command, device, timeout)
        finally:
            free.put(device)
        record = next((r for r in read_records(part) if r["id"] == job.id), None)
        if record is None:
            record = _lost_job_record(job, predictions[job.id], launch, command, timeout)
        with lock:
            append_record(output, record)
            statuses[record["status"]] += 1
            bar.update()
        part.unlink(missing_ok=True)

    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="job", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            for future in [pool.submit(run_one, job, bar) for job in todo]:
                future.result()
    return SweepResult(len(mine), len(mine) - len(todo), dict(statuses), len(jobs) - len(mine))

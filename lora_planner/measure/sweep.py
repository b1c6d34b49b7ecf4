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
only what is missing. A sweep holds its results file for its life (a lock file beside it): a
second sweep on the same file is refused at once, naming the holder, or waits with `--wait`.
Ctrl-C stops the sweep after the running job, keeping its record; a second Ctrl-C, SIGTERM or
SIGHUP kills the running job too. A job dies with its sweep, `kill -9` included (Linux).

A job that dies without writing its record (a crash, the kernel's
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
import functools
import glob
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

from ..errors import MEASURE_EXTRA, PlanError
from ..files import check_output_file
from .job import SETTING_KINDS, Job, is_out_of_memory, model_spec, predict
from .records import append_record, exclusive, load_records, make_record, read_records, skipped_warning

SPEC_SECTIONS = ("fixed", "grid")


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec: `.toml`, `.yaml`/`.yml` or `.json`, with `fixed` and `grid` tables."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"no sweep spec at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            spec = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise PlanError(f"YAML sweep specs need pyyaml: {MEASURE_EXTRA}") from None
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


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the job die with the sweep (Linux): `prctl(PR_SET_PDEATHSIG,
    SIGKILL)` has the kernel kill the job when the thread that started it ends, `kill -9` of the
    sweep included. The job runs in a session of its own (so that Ctrl-C at the terminal reaches
    only the sweep, which decides), so nothing else would end it. A sweep that died before the
    prctl ran is caught by comparing the parent's pid. None where there is no prctl (macOS):
    there, only the signals the sweep can catch stop its jobs."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (AttributeError, OSError):
        return None
    parent, pr_set_pdeathsig = os.getpid(), 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class Stop:
    """How a sweep answers signals. Ctrl-C (SIGINT) once: start no more jobs and let the running
    ones finish, keeping their records. Ctrl-C again, SIGTERM or SIGHUP: also kill the running
    jobs' process groups; a job killed so gets no record and runs again on resume."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.starting_stopped = threading.Event()
        self.killing = threading.Event()
        self.groups: set[int] = set()  # process groups of the running jobs

    def handle(self, signum: int, frame=None) -> None:
        first = self.signal is None
        self.signal = self.signal or signum
        self.starting_stopped.set()
        if signum == signal.SIGINT and first:
            sys.stderr.write("\nstopping after the running job (Ctrl-C again kills it; "
                             "it then runs again on resume)\n")
            return
        self.killing.set()
        for group in list(self.groups):
            self.kill(group)

    @staticmethod
    def kill(group: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)

    @contextlib.contextmanager
    def catching(self):
        """Handle SIGINT, SIGTERM and SIGHUP for the block (from the main thread only: Python
        runs handlers there), then restore the handlers that were set."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        names = [s for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
        previous = {name: signal.signal(getattr(signal, name), self.handle) for name in names}
        try:
            yield self
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)


def launch_subprocess(job: Job, output: Path, command: str, device: str | None = None,
                      timeout: float | None = None, stop: Stop | None = None) -> Launch:
    """Run one job in a fresh Python process: its memory, and any crash, end with it. `device`
    sets CUDA_VISIBLE_DEVICES (the job then sees that one GPU as cuda:0); past `timeout` seconds
    the process and everything it started are killed. The job runs in a process group of its own,
    which `stop` kills on SIGTERM or a second Ctrl-C; it dies with the sweep (`_die_with_parent`)."""
    args = [sys.executable, "-m", "lora_planner.measure.job", "--settings", json.dumps(job.to_dict()),
            "-o", str(output), "--command", command]
    if job.run.device == "cpu":
        args.append("--guard")  # a CPU job too large for the host would take the machine down
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True, preexec_fn=_die_with_parent())
    if stop is not None:
        stop.groups.add(process.pid)  # its own session: the group id is its pid
        if stop.killing.is_set():  # the signal came while it was starting
            stop.kill(process.pid)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Stop.kill(process.pid)
        out, _ = process.communicate()
        return Launch(process.returncode, (out or "")[-2000:], timed_out=True)
    finally:
        if stop is not None:
            stop.groups.discard(process.pid)
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
    stopped_by: int | None = None  # the signal that stopped the sweep early
    not_run: int = 0  # jobs of this shard with no record yet, when stopped

    def summary(self) -> str:
        ran = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "nothing"
        shard = f" ({self.other_shards} left to other shards)" if self.other_shards else ""
        text = f"{self.total} jobs{shard}: {self.skipped} already in the results file; ran {ran}"
        if self.stopped_by is not None:
            name = "Ctrl-C" if self.stopped_by == signal.SIGINT else signal.Signals(self.stopped_by).name
            text += (f"; stopped by {name} with {self.not_run} job{'s' if self.not_run != 1 else ''} "
                     "not run: run the same command again to run them")
        return text


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


def _salvage_parts(output: Path, done: set[str]) -> int:
    """Records that jobs of an earlier, killed sweep wrote into their `.part` files after it died:
    appended when the results file lacks them, then the files removed. Called under the lock, so
    no running sweep owns these files. Returns how many records were kept."""
    kept = 0
    for part in sorted(output.parent.glob(f".{glob.escape(output.name)}.*.part")):
        if not part.is_file():
            continue  # not one a job wrote
        for record in read_records(part):
            if record["id"] not in done:
                append_record(output, record)
                done.add(record["id"])
                kept += 1
        part.unlink(missing_ok=True)
    return kept


def run_sweep(jobs: list[Job], output: str | Path, command: str = "",
              launcher: Launcher = launch_subprocess, progress: bool = True, *,
              timeout: float | None = None, devices: tuple[str, ...] = (),
              shard: tuple[int, int] | None = None, wait: bool = False,
              warn: Callable[[str], None] = lambda text: None) -> SweepResult:
    """Run the jobs (of this `shard`) the results file does not hold yet, one subprocess each,
    with a progress bar (jobs done, rate, ETA) on stderr.

    The results file is held for the sweep's life (`records.exclusive`: a second sweep on it is
    refused, or with `wait` starts when this one ends), so each job gets exactly one record. With
    `devices`, one job runs on each listed GPU at a time (CUDA_VISIBLE_DEVICES set per job). Each
    job writes its record to a `.part` file named by job and sweep, which the sweep appends to
    `output` as the job ends; a job that wrote none (crashed, timed out) gets a record from the
    sweep. Signals stop it early (`Stop`); lines of the results file that are not usable records
    are skipped and passed to `warn` in one line.
    """
    from tqdm import tqdm

    output = Path(output)
    check_output_file(output, "the results file")
    mine = shard_jobs(jobs, shard)
    predictions = check_jobs(mine)
    stop = Stop()
    run = functools.partial(launch_subprocess, stop=stop) if launcher is launch_subprocess else launcher
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    free: queue.Queue[str | None] = queue.Queue()
    for device in devices or (None,):
        free.put(device)

    def run_one(job: Job, bar) -> None:
        if stop.starting_stopped.is_set():
            return
        device = free.get()
        part = output.with_name(f".{output.name}.{job.id}.{os.getpid()}.part")
        try:
            if stop.starting_stopped.is_set():
                return
            launch = run(job, part, command, device, timeout)
        finally:
            free.put(device)
        record = next((r for r in read_records(part) if r["id"] == job.id), None)
        if record is None and not stop.killing.is_set():  # a job the sweep killed runs again
            record = _lost_job_record(job, predictions[job.id], launch, command, timeout)
        if record is not None:
            with lock:
                append_record(output, record)
                statuses[record["status"]] += 1
                bar.update()
        part.unlink(missing_ok=True)

    with exclusive(output, wait), stop.catching():
        found, skipped = load_records(output)
        if skipped:
            warn(skipped_warning(skipped))
        done = {record["id"] for record in found}
        _salvage_parts(output, done)
        todo = [job for job in mine if job.id not in done]
        with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="job", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True) as bar:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
                for future in [pool.submit(run_one, job, bar) for job in todo]:
                    future.result()
    ran = sum(statuses.values())
    return SweepResult(len(mine), len(mine) - len(todo), dict(statuses), len(jobs) - len(mine),
                       stopped_by=stop.signal, not_run=len(todo) - ran if stop.signal else 0)

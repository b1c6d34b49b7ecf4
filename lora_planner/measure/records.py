"""The JSONL record of one measured job, and the file that holds them.

One JSON object per line (format 1): the job's `settings`, the `device` it ran on, the planner's
`predicted` bytes for the same settings, the `measured` figures and their `relative_error`. Bytes
are integers. A record is appended, flushed and fsync'ed as its job ends, so an interrupted sweep
loses no finished job; a line cut short by a crash is skipped on reading.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from .. import __version__

FORMAT = 1
STATUSES = ("ok", "oom", "error")
PREDICTED_KEYS = ("weights", "gradients", "master_weights", "optimizer_states", "activations", "peak")
MEASURED_KEYS = ("peak_allocated", "peak_reserved", "nvml_peak_used", "nvml_baseline_used",
                 "step_time_s", "tokens_per_s", "first_loss", "last_loss", "source")


def settings_id(settings: dict) -> str:
    """A stable key for a job's settings: readable prefix, then a hash of every setting.

    Equal settings give equal ids in any process and any order of keys; that is what lets a sweep
    skip the jobs a results file already holds.
    """
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    rank = f"-r{settings['rank']}" if settings.get("rank") else ""
    model = str(settings.get("model")).rstrip("/").rsplit("/", 1)[-1]  # a path's last part
    return (f"{model}-{settings.get('method')}{rank}-b{settings.get('batch_size')}"
            f"-s{settings.get('seq_len')}-{settings.get('precision')}-{digest}")


def relative_error(predicted: int | None, measured: int | float | None) -> float | None:
    """(predicted - measured) / measured: positive when the planner over-estimates."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_record(settings: dict, *, status: str, device: dict, predicted: dict, measured: dict,
                command: str, error: str | None = None, notes: list[str] | tuple[str, ...] = ()) -> dict:
    """Assemble a record. The NVML error compares the prediction with the device-level growth
    over the baseline taken before the model loaded (peak used - baseline used)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    measured = {key: measured.get(key) for key in MEASURED_KEYS} | {
        k: v for k, v in measured.items() if k not in MEASURED_KEYS}
    nvml_growth = None
    if measured["nvml_peak_used"] is not None and measured["nvml_baseline_used"] is not None:
        nvml_growth = measured["nvml_peak_used"] - measured["nvml_baseline_used"]
    peak = predicted.get("peak")
    return {
        "format": FORMAT,
        "id": settings_id(settings),
        "status": status,
        "error": error,
        "settings": settings,
        "device": device,
        "predicted": predicted,
        "measured": measured,
        "relative_error": {
            "peak_allocated": relative_error(peak, measured["peak_allocated"]),
            "nvml_peak_used": relative_error(peak, nvml_growth),
        },
        "command": command,
        "created": utc_now(),
        "lora_plan_version": __version__,
        "notes": list(notes),
    }


def append_record(path: str | Path, record: dict) -> None:
    """Append one line and force it to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False) + "\n"
    with open(path, "a+b") as f:
        # A line cut short by a crash must not swallow this record: start on a fresh line.
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict]:
    """Every complete record in a results file (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; its job runs again
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def finished_ids(path: str | Path) -> set[str]:
    """Ids of the jobs a results file already holds, whatever their status."""
    return {r["id"] for r in read_records(path)}

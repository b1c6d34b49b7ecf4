"""The record of one measured job: written by `measure`, read by `reports`. Standard library only.

One JSON object per line (format 1):

- `id`: `settings_id(settings)`; `status`: `ok`, `oom`, `error` or `timeout`; `error`: one line or null
- `settings`: the job's settings; `device`: where it ran (kind, name, driver, CUDA, torch, total
  memory, compute capability, UUID; no host name); `env`: `PYTORCH_CUDA_ALLOC_CONF`,
  `CUDA_MODULE_LOADING`, `CUDA_VISIBLE_DEVICES` and the SDPA backend that ran
- `predicted`: the plan's byte terms (`plan.MEMORY_KEYS`), `peak_phase`, `trainable_params` and
  `device_overhead_bytes` (the device allowance, `allowance.allowance`, for that GPU)
- `measured`: `MEASURED_KEYS` and what the reader adds (peaks per phase and step, traced terms);
  `wall_s`: the job's wall seconds before the model (`start`: plan, torch, CUDA), building it
  (`load`), warming up (`warmup`) and in all (`job`), so a sweep's overhead beside its steps shows
- `relative_error`: (predicted - measured) / measured, only for `ok` records:
  `peak_allocated` sets the planned peak beside the allocator's (or the tracer's) peak;
  `nvml_peak_used` sets the planned peak + allowance beside the NVML growth over the baseline.
- `command`, `created`, `lora_plan_version`, `notes`

Bytes are integers. Adding a key keeps the format; changing or removing one bumps it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__

FORMAT = 1
STATUSES = ("ok", "oom", "error", "timeout")
FAILED = ("oom", "error", "timeout")  # records that enter the foresight table, not the error statistics
REQUIRED_KEYS = ("id", "status", "settings", "device", "predicted", "measured")
MEASURED_KEYS = ("peak_allocated", "peak_reserved", "nvml_peak_used", "nvml_baseline_used",
                 "step_time_s", "tokens_per_s", "first_loss", "last_loss", "source")
ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_MODULE_LOADING", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


# Settings added after the first records were written, with the value every earlier job ran with: at
# that value a setting is left out of the id, so a results file written before it existed resumes.
# (`dropout`, every dropout of the model, None: the model's own, as every earlier job ran.)
LATER_SETTINGS = {"optimizer_impl": "foreach", "loss": "standard", "loss_chunks": 8, "dropout": None,
                  "amp_dtype": "bf16"}
# Settings renamed since, by their first name: hashed under it while the first name is free, so a
# job keeps its id (LoRA's dropout was `dropout` until that name went to every dropout, as in `plan`).
RENAMED_SETTINGS = {"lora_dropout": "dropout"}


def settings_id(settings: dict) -> str:
    """A stable key for a job's settings: readable prefix, then a hash of every setting.

    Equal settings give equal ids in any process and any order of keys; that is what lets a sweep
    skip the jobs a results file already holds.
    """
    settings = {k: v for k, v in settings.items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}
    for name, first in RENAMED_SETTINGS.items():
        if name in settings and first not in settings:
            settings[first] = settings.pop(name)
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    rank = f"-r{settings['rank']}" if settings.get("rank") else ""
    model = str(settings.get("model")).rstrip("/").rsplit("/", 1)[-1]  # a path's last part
    return (f"{model}-{settings.get('method')}{rank}-b{settings.get('batch_size')}"
            f"-s{settings.get('seq_len')}-{settings.get('precision')}-{digest}")


def whole(value) -> int | None:
    """An integer byte count, or None for anything else (bools included)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def relative_error(predicted: int | None, measured: int | float | None) -> float | None:
    """(predicted - measured) / measured: positive when the planner over-estimates."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def nvml_growth(measured: dict) -> int | None:
    """What the device (NVML) saw the job add: peak used - baseline used before CUDA started."""
    peak, baseline = whole(measured.get("nvml_peak_used")), whole(measured.get("nvml_baseline_used"))
    return None if peak is None or baseline is None else peak - baseline


def predicted_device_peak(predicted: dict) -> int | None:
    """The planned peak plus the device allowance: what NVML growth is set beside."""
    peak, extra = whole(predicted.get("peak")), whole(predicted.get("device_overhead_bytes"))
    return None if peak is None or extra is None else peak + extra


def relative_errors(status: str, predicted: dict, measured: dict) -> dict:
    """Both errors of a record; None unless the job finished (a partial peak is not a peak)."""
    if status != "ok":
        return {"peak_allocated": None, "nvml_peak_used": None}
    peak = whole(predicted.get("peak"))
    return {"peak_allocated": relative_error(peak, whole(measured.get("peak_allocated"))),
            "nvml_peak_used": relative_error(predicted_device_peak(predicted), nvml_growth(measured))}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_record(settings: dict, *, status: str, device: dict, predicted: dict, measured: dict,
                command: str, error: str | None = None, notes: list[str] | tuple[str, ...] = (),
                env: dict | None = None) -> dict:
    """Assemble a record (see the module docstring)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    measured = {key: measured.get(key) for key in MEASURED_KEYS} | {
        k: v for k, v in measured.items() if k not in MEASURED_KEYS}
    return {
        "format": FORMAT,
        "id": settings_id(settings),
        "status": status,
        "error": error,
        "settings": settings,
        "device": device,
        "env": dict(env or {}),
        "predicted": predicted,
        "measured": measured,
        "relative_error": relative_errors(status, predicted, measured),
        "command": command,
        "created": utc_now(),
        "lora_plan_version": __version__,
        "notes": list(notes),
    }


# Bytes are counted in a signed 64-bit integer (torch, NVML, safetensors): anything at or past this is
# not a reading, and it would overflow a float in the report's arithmetic.
BYTE_LIMIT = 2**63
# The byte counts a reader uses, where they may appear in a record (each optional but `predicted.peak`).
PREDICTED_BYTES = ("peak", "weights", "gradients", "master_weights", "optimizer_states", "activations",
                   "device_overhead_bytes")
MEASURED_BYTES = ("peak_allocated", "peak_reserved", "nvml_peak_used", "nvml_baseline_used")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _byte_count_problem(where: str, value: object) -> str | None:
    if value is None:
        return None
    if whole(value) is None:
        return f"{where} is {_shown(value)}, not a whole number of bytes"
    if not 0 <= value < BYTE_LIMIT:
        return f"{where} is {_shown(value)}, outside 0 to 2^63 bytes"
    return None


def _shape_problem(record: dict) -> str | None:
    """Why a record's values are not the types the readers use (None when they are): every field
    a report or a resume reads, so that no value in a file can make one of them raise."""
    for key in ("id", "status"):
        if not isinstance(record.get(key), str):
            return f"`{key}` is {_shown(record.get(key))}, not a string"
    for key in ("settings", "device", "predicted", "measured"):
        if not isinstance(record.get(key), dict):
            return f"`{key}` is {_shown(record.get(key))}, not a JSON object"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    for key in ("error", "command", "created", "lora_plan_version"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"`{key}` is {_shown(record[key])}, not a string"
    notes = record.get("notes")
    if notes is not None and not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        return f"`notes` is {_shown(notes)}, not a list of strings"
    errors = record.get("relative_error")
    if errors is not None:
        if not isinstance(errors, dict):
            return f"`relative_error` is {_shown(errors)}, not a JSON object"
        for key, value in errors.items():
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                      or (isinstance(value, int) and abs(value) >= BYTE_LIMIT)):
                return f"relative_error.{key} is {_shown(value)}, not a number"
    predicted, measured, device = record["predicted"], record["measured"], record["device"]
    if predicted.get("peak") is None:
        return "predicted.peak is missing"
    checks = [(f"predicted.{k}", predicted.get(k)) for k in PREDICTED_BYTES]
    checks += [(f"measured.{k}", measured.get(k)) for k in MEASURED_BYTES]
    checks.append(("device.memory_total", device.get("memory_total")))
    at_peak = measured.get("at_peak")
    if at_peak is not None:
        if not isinstance(at_peak, dict):
            return f"measured.at_peak is {_shown(at_peak)}, not a JSON object"
        checks += [(f"measured.at_peak.{k}", v) for k, v in at_peak.items()]
    for where, value in checks:
        why = _byte_count_problem(where, value)
        if why:
            return why
    capability = device.get("capability")
    if capability is not None and not (isinstance(capability, list) and len(capability) == 2
                                       and all(whole(c) is not None and 0 <= c < 1000 for c in capability)):
        return f"device.capability is {_shown(capability)}, not [major, minor]"
    return None


def check_record(record: object) -> str | None:
    """Why a parsed line is not a usable format-1 record, or None when it is. Every reader of
    records (the validation report, a sweep's resume and dry run) keeps exactly what this passes."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fmt = record.get("format")
    if fmt is None:
        return f"no `format` field (this reader reads format {FORMAT})"
    if whole(fmt) is None:
        return f"`format` is {_shown(fmt)}, not a whole number"
    if fmt < FORMAT:
        return f"record format {fmt} is older than format {FORMAT}, which this reader reads"
    if fmt > FORMAT:
        return f"record format {_shown(fmt)} is newer than format {FORMAT}; upgrade lora-plan to read it"
    return _shape_problem(record)


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """A record from one line of a records file, or None and why not. Never raises: bytes that
    are not UTF-8, JSON nested past the parser's recursion limit, integers past Python's digit
    limit and right-shaped records with wrong types are all reasons, not exceptions."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}, column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits, for one
        return None, f"not readable JSON ({str(exc).splitlines()[0][:80]})"
    why = check_record(value)
    return (None, why) if why else (value, None)


@dataclass(frozen=True)
class Skipped:
    """A non-blank line of a records file that is not a usable record: `file:line` and why."""

    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


def read_records_file(path: str | Path) -> tuple[list[tuple[int, dict]], list[Skipped]]:
    """Every usable record of a JSONL records file with its line number (from 1), and a `Skipped`
    for every other non-blank line. Lines are split on newline bytes only, and each is judged on
    its own, so one bad line costs that line and no other. Raises only OSError, for a file that
    cannot be opened or read."""
    data = Path(path).read_bytes()
    records, skipped = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record, why = parse_line(raw)
        if record is None:
            skipped.append(Skipped(f"{path}:{number}", why))
        else:
            records.append((number, record))
    return records, skipped


def skipped_warning(skipped: Sequence[Skipped], shown: int = 5) -> str:
    """One line for every skipped line: how many, then the first few with `file:line (why)`."""
    listed = "; ".join(f"{s.where} ({s.why})" for s in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    noun = "line that is" if len(skipped) == 1 else "lines that are"
    return f"skipped {len(skipped)} {noun} not a usable record: {listed}{more}"

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


def check_record(record: object) -> str | None:
    """Why a parsed line is not a usable format-1 record, or None when it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    fmt = record.get("format")
    if fmt is None:
        return f"no `format` field (this reader reads format {FORMAT})"
    if whole(fmt) is None:
        return f"`format` is {fmt!r}, not a whole number"
    if fmt < FORMAT:
        return f"record format {fmt} is older than format {FORMAT}, which this reader reads"
    if fmt > FORMAT:
        return f"record format {fmt} is newer than format {FORMAT}; upgrade lora-plan to read it"
    missing = [k for k in REQUIRED_KEYS if not isinstance(record.get(k), str | dict)]
    if missing:
        return f"missing or malformed keys: {', '.join(missing)}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    if whole(record["predicted"].get("peak")) is None:
        return "predicted.peak is not a whole number of bytes"
    return None

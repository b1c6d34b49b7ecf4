"""The file of JSONL records that measured jobs append to (the record is `record_schema`'s).

One JSON object per line (format 1, see `lora_planner.record_schema`). A record is appended,
flushed and fsync'ed as its job ends, so an interrupted sweep loses no finished job; a line cut
short by a crash, or any other line that is not a usable record, is skipped on reading and named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The schema itself lives in the core, so that reports read what measure writes without importing it.
from ..record_schema import (
    FORMAT,
    MEASURED_KEYS,
    STATUSES,
    Skipped,
    make_record,
    read_records_file,
    settings_id,
    skipped_warning,
)

__all__ = ["FORMAT", "MEASURED_KEYS", "STATUSES", "Skipped", "append_record", "finished_ids", "load_records",
           "make_record", "read_records", "settings_id", "skipped_warning"]


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


def load_records(path: str | Path) -> tuple[list[dict], list[Skipped]]:
    """Every usable record in a results file (none when it does not exist yet), and every other
    non-blank line as a `Skipped` (file:line, why): a line cut short by a kill, bytes that are not
    UTF-8, a record of the wrong shape. `record_schema.check_record` decides, as for every reader."""
    path = Path(path)
    if not path.exists():
        return [], []
    found, skipped = read_records_file(path)
    return [record for _, record in found], skipped


def read_records(path: str | Path) -> list[dict]:
    """Every usable record in a results file; the rest is skipped (see `load_records`)."""
    return load_records(path)[0]


def finished_ids(path: str | Path) -> set[str]:
    """Ids of the jobs a results file already holds a usable record of, whatever their status: a
    job whose only line is unreadable runs again."""
    return {r["id"] for r in read_records(path)}

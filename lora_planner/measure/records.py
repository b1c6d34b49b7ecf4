"""The file of JSONL records that measured jobs append to (the record is `record_schema`'s).

One JSON object per line (format 1, see `lora_planner.record_schema`). A record is appended,
flushed and fsync'ed as its job ends, so an interrupted sweep loses no finished job; a line cut
short by a crash is skipped on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The schema itself lives in the core, so that reports read what measure writes without importing it.
from ..record_schema import FORMAT, MEASURED_KEYS, STATUSES, make_record, settings_id

__all__ = ["FORMAT", "MEASURED_KEYS", "STATUSES", "append_record", "finished_ids", "make_record",
           "read_records", "settings_id"]


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

"""The file of JSONL records that measured jobs append to (the record is `record_schema`'s).

One JSON object per line (format 1, see `lora_planner.record_schema`). A record is appended,
flushed and fsync'ed as its job ends, so an interrupted sweep loses no finished job; a line cut
short by a crash, or any other line that is not a usable record, is skipped on reading and named.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import PlanError

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
    if not path.is_file():  # a folder, /dev/full, a pipe: no records, and /dev/full has no end
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    found, skipped = read_records_file(path)
    return [record for _, record in found], skipped


def read_records(path: str | Path) -> list[dict]:
    """Every usable record in a results file; the rest is skipped (see `load_records`)."""
    return load_records(path)[0]


def finished_ids(path: str | Path) -> set[str]:
    """Ids of the jobs a results file already holds a usable record of, whatever their status: a
    job whose only line is unreadable runs again."""
    return {r["id"] for r in read_records(path)}


def lock_path(path: str | Path) -> Path:
    """The lock file beside a results file: `.NAME.lock`, holding the pid and host of its holder."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold a results file for the block, so that no other sweep appends to it meanwhile.

    An exclusive `flock` on `lock_path(path)` (POSIX: Linux and macOS; advisory, so only sweeps
    honour it). Taken, it refuses at once in one line naming the holder's pid and host, or with
    `wait` blocks until the holder ends. The holder removes the lock file as it ends; a process
    that locked the file just before it was removed sees its inode gone and locks the new one.
    """
    import fcntl
    import socket

    path = Path(path)
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise PlanError(f"{path} is in use by another sweep ({holder or 'a process starting'}); "
                            "wait for it to end, or pass --wait to start when it does") from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # locked a lock file its holder has just removed: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)

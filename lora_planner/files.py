"""Writing files so that a reader finds the old content or the new one, never a part of either.

Every file lora-plan writes for a user (reports, plots, adapters, uploads) is written to a
temporary name next to its target and renamed into place: a rename within one folder is atomic
on POSIX (and `os.replace` on Windows), so a crash, a full disk or Ctrl-C mid-write leaves the
previous file intact and no temporary file behind. An adapter is two files that must match (the
weights and `adapter_config.json`), so it is written as a folder and the folder is renamed.

Standard library only: the core, `measure` and `reports` all write through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from .errors import PlanError


def default_mode(folder: bool = False) -> int:
    """The mode `open()` (0666) or `mkdir()` (0777) gives a new file or folder, less the umask:
    `mkstemp` and `mkdtemp` make theirs private (0600, 0700), which a shared report should not be."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _temporary_name(path: Path, folder: bool = False) -> Path:
    maker = tempfile.mkdtemp if folder else tempfile.mkstemp
    made = maker(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if not folder:
        os.close(made[0])
        made = made[1]
    return Path(made)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to; when the block ends without an error it is
    flushed to disk and renamed onto `path`, and on any error (KeyboardInterrupt included) it is
    removed and `path` is left as it was. A file that existed keeps its mode.

    A symbolic link is followed (the file it names is replaced, the link stays). A target that
    exists and is not a regular file (/dev/stdout, a pipe, /dev/full) is written in place: renaming
    onto it would replace a device node with a plain file."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = default_mode()
        os.chmod(temporary, mode)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`path.write_bytes(data)`, atomically (see `replacing`)."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` in UTF-8, atomically (see `replacing`)."""
    return write_bytes(path, text.encode("utf-8"))


def check_folder_target(path: str | Path, own: Collection[str]) -> None:
    """Refuse a target folder that `replacing_folder` would not replace: a file, or a folder that
    holds anything besides the `own` names (replacing it would delete what else is there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlanError(f"{path} is a file, not a folder; name a folder to write into")
    if path.is_dir():
        others = sorted(entry.name for entry in path.iterdir() if entry.name not in own)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise PlanError(f"{path} already holds other files ({shown}); write into a new or empty "
                            f"folder (an existing one is replaced as a whole)")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system
    or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return done == 0


@contextlib.contextmanager
def replacing_folder(path: str | Path, own: Collection[str]) -> Iterator[Path]:
    """An empty temporary folder next to `path` to write files into; when the block ends without
    an error it takes `path`'s place, so `path` holds the old files or the new ones, never a mix.

    An existing `path` is replaced only when it holds nothing but the `own` names
    (`check_folder_target`). The swap is one `renameat2(RENAME_EXCHANGE)` on Linux; elsewhere the
    old folder is moved aside first, so a crash between the two renames leaves no `path` (and the
    old folder under a hidden name), never a mismatched pair. On any error the temporary folder is
    removed and `path` is left as it was."""
    path = Path(path)
    check_folder_target(path, own)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path, folder=True)
    try:
        yield temporary
        for entry in temporary.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.is_dir() else default_mode(folder=True))
        if not path.exists():
            os.rename(temporary, path)
        elif _exchange(temporary, path):
            shutil.rmtree(temporary)  # now the old folder
        else:
            aside = _temporary_name(path, folder=True)
            os.rename(path, aside / "old")
            os.rename(temporary, path)
            shutil.rmtree(aside)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def check_output_file(path: str | Path, what: str = "the output") -> None:
    """Refuse, before any work, a file that cannot take an appended record: a folder, something
    that is not a regular file (/dev/full, a pipe), a file or folder we may not write. A missing
    file is fine when its nearest existing folder is writable (the writer makes the rest)."""
    path = Path(path)
    if path.is_dir():
        raise PlanError(f"{what} {path} is a folder; name a file")
    if path.exists():
        if not path.is_file():
            raise PlanError(f"{what} {path} is not a regular file")
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise PlanError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PlanError(f"cannot write {what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PlanError(f"cannot write {what} {path}: {folder} is not writable")

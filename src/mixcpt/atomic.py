"""Files and folders that appear whole or not at all.

Everything mixcpt writes for others to read (results.json, a stage's model folder, the teacher
cache's progress, the report) is written under a temporary name and renamed into place, so a
process killed mid-write (SIGKILL, power loss, a full disk) never leaves half a file that looks
finished. Temporary names carry the writer's pid: leftovers of dead writers are removed, a live
writer's are left alone.

A write that runs out of disk space (or quota) removes what it had written and raises
`DiskFullError`, one line naming what was being written and about how much space it needs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixcpt.errors import DiskFullError, free_bytes
from mixcpt.preempt import deferred

SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def lack_of_space(err: BaseException, path: Path) -> bool:
    """Whether `err`, raised while writing under `path`, means the disk (or quota) is full.

    OSError ENOSPC / EDQUOT anywhere in its chain, or their message (safetensors reports them
    as text); or, since torch.save reports a failed write without its cause, an OSError or
    RuntimeError while less than 1 MiB is free there (call it before removing the partial
    output, which is what filled the disk).
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in SPACE_ERRNOS:
            return True
        if any(os.strerror(code) in str(seen) for code in SPACE_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(path)
    return isinstance(err, (OSError, RuntimeError)) and free is not None and free < 2**20


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def preallocate(path: Path) -> None:
    """Reserve the disk blocks of a file made by numpy's `open_memmap(mode="w+")`, which is sparse:
    writing through a memory map on a full disk kills the process with SIGBUS, while this raises
    OSError ENOSPC up front. Filesystems without the call (EINVAL, EOPNOTSUPP) are left as they
    are."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno in SPACE_ERRNOS:
                raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave it empty
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        size = len(text.encode("utf-8"))
        if isinstance(err, OSError) and lack_of_space(err, path.parent):
            raise DiskFullError(path, size) from err
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written with `write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(final: Path, expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is
    removed. An error for lack of space becomes `DiskFullError(final, ...)`, whose estimate of the
    space needed is the larger of `expected_bytes` and what had been written.

    Temporary folders of `final` left by a killed process are removed first, so they neither pile
    up nor are ever mistaken for output. An older `final` (a rebuild after the inputs changed) is
    moved aside before the rename and deleted only after it, so at every instant either the old
    or the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as err:
        full = isinstance(err, DiskFullError) or (
            isinstance(err, Exception) and lack_of_space(err, final.parent)
        )
        written = folder_bytes(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            needed = max(expected_bytes, written, getattr(err, "needed", None) or 0)
            raise DiskFullError(final, needed) from err
        raise
    with deferred():  # a stop signal waits for the renames: never the old folder gone, the new not
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_leftovers(final: Path) -> None:
    """Delete `.<name>.tmp-PID` / `.<name>.old-PID` siblings of `final` whose process is gone.
    A live PID is left alone: that process may be building the folder right now."""
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = path.name[len(final.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

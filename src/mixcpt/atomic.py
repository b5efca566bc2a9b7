"""Files and folders that appear whole or not at all.

Everything mixcpt writes for others to read (results.json, a stage's model folder, the teacher
cache's progress, the report) is written under a temporary name and renamed into place, so a
process killed mid-write (SIGKILL, power loss, a full disk) never leaves half a file that looks
finished. Temporary names carry the writer's pid: leftovers of dead writers are removed, a live
writer's are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written with `write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is
    removed.

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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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

"""One writer per run folder (design.md §11): `DIR/.mixcpt.lock` names the command holding it.

Every `mixcpt` command that writes a run folder holds the lock from start to exit (errors and
stop signals included). The file holds the holder as JSON (pid, host, command, since) and is
`flock`ed by it while it runs, so that two commands starting together cannot both win, and a
holder that dies releases the flock with its last file descriptor. A second command refuses
(`RunLocked`, exit 2) with one line naming the holder.

A lock file that nobody flocks is a leftover: when it names a process of this host that is gone,
it is taken over with a one-line warning; when that process is still alive (a lock written by a
filesystem without working flock) or on another host (its pid cannot be checked from here), the
command refuses and says to delete the file once that process is known to be gone.

Under a distributed launch (torchrun, accelerate launch, srun with RANK set) the processes of one
command share the lock: the process of global rank 0 takes it, the others never touch it (they
start nothing before the rank-0 process joins them, and stop when it exits).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from mixcpt.atomic import pid_alive
from mixcpt.errors import DiskFullError, UserError

LOCK_NAME = ".mixcpt.lock"


class RunLocked(UserError):
    """Another mixcpt command holds the run folder."""


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def describe(holder: dict) -> str:
    """'pid 12 on host h (`mixcpt run c.yaml --output DIR`, since 2025-01-01 10:00:00)'."""
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(`{holder.get('command', '?')}`, since {holder.get('since', '?')})"
    )


def _read_holder(fd: int) -> dict | None:
    """The holder recorded in the open lock file, {} when it is empty, None when unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    if not data.strip():
        return {}
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _holder_of(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def running_holder(root: str | Path) -> dict | None:
    """The holder recorded in the run folder's lock while a mixcpt command may be running there:
    its process is alive on this host, or it is on another host (whose pids cannot be checked from
    here). None when there is no lock, or it is the leftover of a process of this host that is
    gone."""
    holder = _holder_of(lock_path(root))
    if not holder:
        return None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and not (isinstance(pid, int) and pid_alive(pid)):
        return None
    return holder


class RunLock:
    """The lock of one run folder, held from `acquire()` to `release()`."""

    def __init__(self, root: str | Path, command: str):
        self.path = lock_path(root)
        self.command = command
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `RunLocked` naming the holder (a stale lock of a dead process
        of this host is taken over, with a warning on stderr)."""
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        for _ in range(50):  # a retry only when a releasing holder removed the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._flock(fd):
                    raise RunLocked(self._in_use(self._holder_while_held(fd)))
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # the holder released (deleted) this file meanwhile: start over
                    os.close(fd)
                    continue
                self._check_leftover(_read_holder(fd), me)
                self._write(fd, me)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return
        raise RunLocked(f"{self.path}: could not take the lock (it keeps changing hands)")

    def release(self) -> None:
        """Delete the lock file (if it is still ours) and drop the flock."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # before unlocking: a newcomer then finds no file, or its own
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _flock(fd: int) -> bool:
        """True when we got the flock (or the filesystem has none: then the recorded pid
        decides), False when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return True
            raise
        return True

    @staticmethod
    def _holder_while_held(fd: int) -> dict | None:
        """The holder's record; it may be a moment late (written just after its flock)."""
        for _ in range(40):
            holder = _read_holder(fd)
            if holder:
                return holder
            time.sleep(0.05)
        return None

    def _in_use(self, holder: dict | None) -> str:
        who = describe(holder) if holder else "another process"
        return (
            f"{self.path.parent}: in use by {who}; one mixcpt command writes a run folder at a "
            f"time: wait for it to finish or stop it"
        )

    def _check_leftover(self, holder: dict | None, me: dict) -> None:
        """A lock file nobody flocks: take it over when it is empty or names a dead process of
        this host; refuse when its process may still be alive."""
        if holder == {}:
            return  # a fresh file (ours), or one whose writer died before writing
        if holder is None:
            print(f"mixcpt: warning: {self.path}: unreadable lock, taken over", file=sys.stderr)
            return
        pid, host = holder.get("pid"), holder.get("host")
        if host == me["host"] and pid == me["pid"]:
            return  # this process's own leftover (an in-process caller that did not release)
        if host == me["host"] and isinstance(pid, int) and pid_alive(pid):
            raise RunLocked(self._in_use(holder))
        if host != me["host"]:
            raise RunLocked(
                f"{self.path.parent}: locked by {describe(holder)}, another host, whose process "
                f"cannot be checked from here; if it is gone, delete {self.path} and rerun"
            )
        print(
            f"mixcpt: warning: {self.path.parent}: took over the lock left by {describe(holder)}, "
            "which is no longer running",
            file=sys.stderr,
        )

    def _write(self, fd: int, me: dict) -> None:
        data = (json.dumps(me, indent=2) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.fsync(fd)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(self.path, len(data), "the run folder's lock file") from err
            raise


def is_rank_zero() -> bool:
    """False in the processes of a distributed launch other than global rank 0 (torchrun,
    accelerate launch and the like set RANK; srun scripts set it from SLURM_PROCID)."""
    return os.environ.get("RANK", "0") == "0"

"""Errors the CLI reports in one line, without a traceback: `UserError` (the user's input is
wrong: exit 2) and `DiskFullError` (a write ran out of space: exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Bad config or bad input. `str(err)` is the one line shown to the user."""


class ConfigError(UserError):
    """The config names an unknown key, a wrong type, a value out of range or a missing path."""


class InputError(UserError):
    """A data or benchmark file is malformed. The message starts with `path:line:`."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(path) -> int | None:
    """Bytes available to this user on the filesystem holding `path` (or its nearest existing
    parent), or None when it cannot be told."""
    import shutil
    from pathlib import Path

    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


class DiskFullError(Exception):
    """A write failed for lack of disk space (or quota). Not the user's input: the CLI prints
    the one line (which names the path being written and the space it needs, with what the
    `estimate` was based on) and exits 1.
    Whatever was being written has been removed; earlier outputs and checkpoints are intact."""

    def __init__(
        self, path, needed: int | None, what: str = "", advice: str = "", estimate: str = ""
    ):
        self.path, self.needed = str(path), needed
        free = free_bytes(path)
        need = f"needs about {format_bytes(needed)}" if needed else "size unknown"
        need += f", {estimate}" if needed and estimate else ""
        have = f"; {format_bytes(free)} free there" if free is not None else ""
        super().__init__(
            f"{path}: no space left on device{' writing ' + what if what else ''} ({need}{have}); "
            f"{advice or 'free some space and rerun the same command'}"
        )

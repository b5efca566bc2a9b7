"""Errors that mean "the user's input is wrong": the CLI prints one line and exits with code 2."""

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

"""Stopping on SIGTERM or SIGUSR1 (a cluster preempting the job; SLURM's `--signal=USR1@SECONDS`
warning before a time limit) with nothing half-written and a checkpoint to resume from
(design.md §3: exit 143).

The CLI installs the handlers for the lifetime of a command (`stop_signals`). Outside a
`deferred()` block a stop signal raises `Preempted` at once, wherever the main thread is: every
folder and file mixcpt writes for others is built under a temporary name and renamed into place
(`mixcpt.atomic`), and the temporaries are removed on the way out, as for Ctrl-C. Inside a
`deferred()` block (a training stage, from its resume to its final save) the signal is only
recorded: the stage's Trainer callback (`train.resumable.StopOnSignal`) saves a checkpoint at the
end of the current optimizer step and stops training, and `Preempted` is raised when the block is
left. Either way the CLI prints one line and exits 143; the same command resumes.

No import of torch or transformers here: the CLI installs the handlers before loading them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 143  # 128 + SIGTERM, whichever of the two signals stopped the run

_received: int | None = None  # the first stop signal of this command, if one came
_deferred = 0  # depth of nested deferred() blocks
_raised = False  # Preempted is on its way up: leaving a deferred() block raises no second one


class Preempted(BaseException):
    """A stop signal ended the command. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up mistakes it for an error of its own and carries on.

    `str()` is the one line the CLI prints: which signal, `where` the work stands (e.g. the
    checkpoint just saved) and how to resume."""

    def __init__(self, signum: int, where: str = ""):
        self.signum = signum
        self.where = where
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name}{'; ' + where if where else ''}; rerun the same command to resume"
        )


def requested() -> int | None:
    """The stop signal received so far in this command (SIGTERM or SIGUSR1), else None."""
    return _received


def stop(where: str = "", signum: int | None = None) -> None:
    """Raise `Preempted` for the signal received, or for `signum` (a signal that reached another
    process of the same distributed run)."""
    global _raised
    signum = signum or _received
    assert signum is not None
    _raised = True
    raise Preempted(signum, where)


def _handle(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    if _deferred == 0 and not _raised:
        stop()


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 stop the command as described in the module
    docstring; the previous handlers are restored after it. Does nothing outside the main thread
    (only the main thread can receive Python signal handlers)."""
    global _received, _deferred, _raised
    _received, _deferred, _raised = None, 0, False
    try:
        previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received, _deferred, _raised = None, 0, False


@contextmanager
def deferred(finished: str = "", then_raise: bool = True) -> Iterator[None]:
    """A stop signal received within the block is recorded (`requested()`), not raised; leaving
    the block normally then raises `Preempted` (`finished` says what the block completed first),
    unless one is already on its way up or `then_raise` is False (a last cleanup: whatever the
    command ends with stands). Leaving it with an exception lets that exception through unchanged.
    Blocks nest."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
    if then_raise and _deferred == 0 and _received is not None and not _raised:
        stop(finished)

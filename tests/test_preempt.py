"""Stop signals (mixcpt.preempt): outside a deferred block SIGTERM / SIGUSR1 raise Preempted at
once; inside one they are recorded and raised when the block is left. The end-to-end behaviour
(a checkpoint, exit 143, the rerun resuming) is in tests/test_resume.py."""

from __future__ import annotations

import os
import signal

import pytest

from mixcpt import preempt


def test_a_signal_outside_a_deferred_block_stops_at_once():
    with preempt.stop_signals():
        with pytest.raises(preempt.Preempted, match="stopped by SIGTERM; rerun the same command"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again


def test_a_signal_inside_a_deferred_block_waits_for_its_end():
    done = []
    with preempt.stop_signals():
        with pytest.raises(preempt.Preempted) as stop:
            with preempt.deferred("the stage finished first"):
                with preempt.deferred():  # nested: only the outermost block raises
                    os.kill(os.getpid(), signal.SIGUSR1)
                    done.append("inner")
                assert preempt.requested() == signal.SIGUSR1
                done.append("outer")
        assert str(stop.value) == (
            "stopped by SIGUSR1; the stage finished first; rerun the same command to resume"
        )
        with preempt.deferred():  # one Preempted per command: it is on its way up already
            pass
    assert done == ["inner", "outer"] and preempt.requested() is None


def test_an_error_in_a_deferred_block_and_a_last_cleanup_are_left_alone():
    with preempt.stop_signals():
        with pytest.raises(ValueError, match="its own error"):
            with preempt.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                raise ValueError("its own error")
    with preempt.stop_signals():
        with preempt.deferred(then_raise=False):
            os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.requested() == signal.SIGTERM

"""One writer per run folder (design.md §11): every command holds DIR/.mixcpt.lock while it runs; a
second command on the folder exits 2 with one line naming the holder; the lock of a dead process
is taken over with a warning; the lock goes when its command ends, however it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import mixcpt.pipeline
from mixcpt.cli import main
from mixcpt.runlock import LOCK_NAME, RunLock, RunLocked

# Holds the lock of a run folder as a `mixcpt run` would, until killed.
HOLDER = """
import sys, time
from mixcpt.runlock import RunLock
RunLock(sys.argv[1], "mixcpt run held.yaml --output " + sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""

ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def data_argv(tmp_path, tiny_model_dir):
    """`mixcpt data` on a tiny config, for a run folder `out`."""
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20))
    )
    (tmp_path / "c.yaml").write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 16}\n"
    )
    return ["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")]


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(
    tmp_path, data_argv, mixcpt_cli
):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = mixcpt_cli(*data_argv, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mixcpt: error: "), proc.stderr
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert f"`mixcpt run held.yaml --output {out}`" in lines[0] and ", since 20" in lines[0]
        assert not (out / "data").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()

    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    proc = mixcpt_cli(*data_argv, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("mixcpt:")]
    assert len(warnings) == 1, proc.stderr
    assert "mixcpt: warning: " in warnings[0] and "took over the lock" in warnings[0]
    assert f"pid {holder.pid}" in warnings[0] and "no longer running" in warnings[0]
    assert (out / "data" / "mix" / "meta.json").exists()
    assert not (out / LOCK_NAME).exists()  # released after success


def test_the_lock_names_the_command_while_it_runs_and_goes_after_an_error(
    tmp_path, data_argv, monkeypatch, capsys
):
    out = tmp_path / "out"
    seen = []

    def fake_stage(stage, cfg, run, arm=None, force=False, check=True):
        seen.append(json.loads((run.root / LOCK_NAME).read_text()))
        raise RuntimeError("a bug")

    monkeypatch.setattr(mixcpt.pipeline, "run_stage", fake_stage)
    with pytest.raises(RuntimeError, match="a bug"):  # an unexpected error keeps its traceback
        main(data_argv)
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert seen[0]["command"] == f"mixcpt data {data_argv[1]} --output {out}"
    assert not (out / LOCK_NAME).exists()  # released after an error

    (tmp_path / "bad.yaml").write_text("model: {path: ./tiny-llama}\n")
    assert main(["data", str(tmp_path / "bad.yaml"), "--output", str(out)]) == 2
    assert "data: Field required" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()  # released after a user error


def test_processes_of_one_distributed_command_take_one_lock(tmp_path, data_argv, monkeypatch):
    """Under a launcher only the global rank-0 process takes the lock (the others, RANK > 0, share
    it); tests/test_distributed.py runs two real processes."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(mixcpt.pipeline, "run_stage", lambda *args, **kwargs: None)
    with RunLock(out, "mixcpt cpt c.yaml --output out (rank 0)"):
        monkeypatch.setenv("RANK", "1")
        assert main(data_argv) == 0  # rank 1 of the same command does not contend
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunLocked, match="in use by pid"):
            RunLock(out, "another command").acquire()
    assert not (out / LOCK_NAME).exists()

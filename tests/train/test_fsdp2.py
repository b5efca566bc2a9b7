"""Stage 1 under FSDP2 and DeepSpeed ZeRO-3 on the CPU (gloo, 2 processes): the sharded student's
loss and gradients equal one process's, and the online teacher is sharded like the student instead
of copied whole into every process. accelerate runs FSDP only on GPUs, so the FSDP2 worker shards
with `fully_shard` itself, as accelerate's FSDP2 plugin does; the ZeRO-3 worker wraps the student
with `deepspeed.initialize`, as accelerate does; both call the trainer's `compute_loss`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "worker",
    [
        "fsdp2_worker.py",
        pytest.param("zero3_worker.py", marks=pytest.mark.deepspeed),
    ],
)
def test_sharded_student_matches_one_process_and_shards_the_online_teacher(
    tmp_path, torchrun, worker
):
    proc = torchrun(Path(__file__).with_name(worker), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["loss"] == pytest.approx(result["expected_loss"], abs=1e-4)
        assert result["max_grad_diff"] < 1e-4
        assert result["teacher_sharded"]
        assert result["teacher_share"] == pytest.approx(0.5, abs=0.02)  # half of it per process

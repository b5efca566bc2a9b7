"""A full disk: the write that fails stops the command with exit 1 and one line naming the folder
being written and about how much space it needs; what it had written is removed, and the previous
checkpoint and every earlier output stay intact, so the same command resumes once there is space.

The run folder is a small tmpfs the test mounts (root only; skipped otherwise) and fills at a
chosen moment, so the failures are real ENOSPC errors from safetensors, torch.save, numpy and
plain writes. The data stage and the teacher cache run as subprocesses: writing a memory map on
a full disk kills the process with SIGBUS unless its blocks were reserved first.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixcpt.cli import main
from mixcpt.data.packing import write_packed

STEPS, SAVE_STEPS = 8, 3


@pytest.fixture
def disk(tmp_path):
    """A 16 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk with one file, then give `leave` bytes back; returns the file."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture
def cpt_run(tmp_path, tiny_model_dir, tiny_tokenizer):
    """make(out, teacher) -> argv of `mixcpt cpt` for a run folder `out` whose data stage is
    done (12 seeded blocks of 32 tokens)."""

    def make(out: Path, teacher: str = "online") -> list[str]:
        (tmp_path / "domain.txt").write_text("unused: the packed stream stands for the data stage")
        config = {
            "seed": 0,
            "model": {"path": str(tiny_model_dir)},
            "data": {"domain": [{"path": "domain.txt"}], "block_size": 32},
            "cpt": {
                "teacher": teacher,
                "loss_chunk_size": 16,
                "training": {
                    "learning_rate": 3e-3,
                    "max_steps": STEPS,
                    "save_steps": SAVE_STEPS,
                    "per_device_batch_size": 2,
                    "save_total_limit": 2,
                },
            },
        }
        path = tmp_path / f"config-{teacher}.yaml"
        path.write_text(yaml.safe_dump(config))
        ids = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(12, 32))
        positions = np.tile(np.arange(32), (12, 1))
        write_packed(out / "data" / "mix", ids, positions, ids.size, 0, "synthetic")
        return ["cpt", str(path), "--output", str(out), "--arm", "mixcpt"]

    return make


def error_line(stderr: str) -> str:
    """The one `mixcpt: error:` line (in-process, a progress bar may precede it on the same
    line). The only other `mixcpt:` line allowed is the disk check's warning, which a nearly
    full disk rightly triggers before the stage starts."""
    lines = [line[line.index("mixcpt:") :] for line in stderr.splitlines() if "mixcpt:" in line]
    errors = [line for line in lines if line.startswith("mixcpt: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    others = [line for line in lines if line not in errors]
    assert all("more on disk (mixcpt plan)" in line for line in others), others
    return errors[0]


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one(
    disk, cpt_run, tmp_path, capsys, monkeypatch
):
    argv = cpt_run(tmp_path / "clean")
    assert main(argv) == 0
    expected = load_file(tmp_path / "clean" / "mixcpt" / "cpt" / "model.safetensors")

    out = disk / "run"
    argv = cpt_run(out)
    work = out / ".work" / "mixcpt-cpt"
    from mixcpt.train.trainer import LSSDTrainer

    real_save = LSSDTrainer._save_checkpoint

    def fill_then_save(self, *args, **kwargs):
        if self.state.global_step == 6:
            fill(disk)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(LSSDTrainer, "_save_checkpoint", fill_then_save)
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        f"mixcpt: error: {work / 'checkpoint-6'}: no space left on device writing a checkpoint "
        "(needs about "
    )
    assert "free some space and rerun the same command: it resumes from checkpoint-3" in line
    checkpoint_3 = work / "checkpoint-3"
    assert json.loads((checkpoint_3 / "trainer_state.json").read_text())["global_step"] == 3
    assert load_file(checkpoint_3 / "model.safetensors")
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((out / "data" / "mix" / "meta.json").read_text())["n_blocks"] == 12
    assert not (out / "mixcpt").exists() and not (out / ".mixcpt.lock").exists()

    monkeypatch.undo()
    (disk / "filler").unlink()
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert results["resumed_from"].endswith("checkpoint-3")
    resumed = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)


def test_the_final_model_save_on_a_full_disk_leaves_no_partial_folder(
    disk, cpt_run, capsys, monkeypatch
):
    out = disk / "run"
    argv = cpt_run(out)
    import mixcpt.train.resumable as resumable

    real_save = resumable.save_trained_model

    def fill_then_save(*args, **kwargs):
        fill(disk)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(resumable, "save_trained_model", fill_then_save)
    capsys.readouterr()
    assert main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        f"mixcpt: error: {out / 'mixcpt' / 'cpt'}: no space left on device (needs about "
    )
    assert list((out / "mixcpt").iterdir()) == []  # no cpt/, no .cpt.tmp-*
    work = out / ".work" / "mixcpt-cpt"
    assert (work / "checkpoint-6" / "trainer_state.json").exists()  # the stage resumes from here


def test_the_data_stage_on_a_full_disk_stops_with_one_line(
    disk, tmp_path, tiny_model_dir, mixcpt_cli
):
    rows = [{"text": f"The planet P{i} orbits the star S{i % 7}."} for i in range(3000)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 32}\n"
    )
    out = disk / "run"
    out.mkdir()
    fill(disk, leave=600 * 1024)  # the tokens fit, the packed memory maps do not
    proc = mixcpt_cli("data", tmp_path / "c.yaml", "--output", out, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not -7 (SIGBUS)
    line = error_line(proc.stderr)
    assert line.startswith(f"mixcpt: error: {out / 'data'}: no space left on device (needs about")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no data/, no .data.tmp-*, no lock


def test_the_teacher_cache_on_a_full_disk_stops_before_its_memory_maps(disk, cpt_run, mixcpt_cli):
    out = disk / "run"
    argv = cpt_run(out, teacher="cache")
    fill(disk, leave=64 * 1024)
    proc = mixcpt_cli(*argv, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not -7 (SIGBUS)
    line = error_line(proc.stderr)
    assert line.startswith(
        f"mixcpt: error: {out / 'teacher_cache'}: no space left on device writing the teacher "
        "cache (needs about "
    )
    assert not (out / "teacher_cache" / "meta.json").exists()  # never taken for a complete cache

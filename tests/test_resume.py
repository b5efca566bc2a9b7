"""Kill -9 and rerun: `mixcpt cpt` resumes from its last complete checkpoint and ends with the
weights of an uninterrupted run; `mixcpt data` killed mid-tokenisation never reuses what it left.

The commands run as real subprocesses killed with SIGKILL (no `except`, no `finally`). A wrapper
slows each training step (or each input record) and reports progress to a file, so the test can
kill at a known point; the rerun is the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mixcpt.cli import main
from mixcpt.data.packing import write_packed

# Runs `mixcpt.cli.main(argv)` after slowing PATCHED ("module:attribute.path") by SLOW_S seconds per
# call and writing the call count to PROGRESS (environment variables), so that a test can kill it at
# a known point; with NAN_FROM=n, PATCHED (a layer's forward) returns NaN from its n-th call on.
WRAPPER = """
import os, sys, time, importlib
module, path = os.environ["PATCHED"].split(":")  # e.g. mixcpt.data.stage:_render
owner = importlib.import_module(module)
*parents, name = path.split(".")
for parent in parents:
    owner = getattr(owner, parent)
real, calls = getattr(owner, name), [0]
def slow(*args, **kwargs):
    calls[0] += 1
    with open(os.environ["PROGRESS"], "w") as f:
        f.write(str(calls[0]))
    time.sleep(float(os.environ["SLOW_S"]))
    result = real(*args, **kwargs)
    if calls[0] >= int(os.environ.get("NAN_FROM", 10**9)):  # a diverged layer: every output NaN
        result = result * float("nan")
    return result
setattr(owner, name, slow)
from mixcpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(argv, patched: str, progress, slow_s: float, **env) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATCHED": patched,
        "PROGRESS": str(progress),
        "SLOW_S": str(slow_s),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (
            f"the run ended before the kill point: {proc.stderr.read()[-2000:]}"
        )
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def progress(path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


# ---- stage 1 ---------------------------------------------------------------------------------

CPT_STEPS, SAVE_STEPS = 8, 3


@pytest.fixture
def cpt_setup(tmp_path, tiny_model_dir, tiny_tokenizer):
    """(argv of `mixcpt cpt` for an output folder, that folder's maker): a run whose data stage
    is done."""
    (tmp_path / "domain.txt").write_text(
        "unused: the packed stream below stands for the data stage's output"
    )
    config = {
        "seed": 0,
        "model": {"path": str(tiny_model_dir)},
        "data": {"domain": [{"path": "domain.txt"}], "block_size": 32},
        "cpt": {
            "teacher": "online",
            "loss_chunk_size": 16,
            "training": {
                "learning_rate": 3e-3,
                "lr_scheduler": "cosine",
                "max_steps": CPT_STEPS,
                "save_steps": SAVE_STEPS,
                "logging_steps": 1,
                "per_device_batch_size": 2,
                "save_total_limit": 2,
            },
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tiny_tokenizer), size=(12, 32))

    def make(name: str):
        out = tmp_path / name
        # 12 blocks, 2 per step: 8 steps cross an epoch boundary, so resuming must also restore
        # the sampler
        write_packed(
            out / "data" / "mix", ids, np.tile(np.arange(32), (12, 1)), ids.size, 0, "synthetic"
        )
        return ["cpt", str(tmp_path / "config.yaml"), "--output", str(out), "--arm", "mixcpt"], out

    return make


def test_cpt_killed_mid_training_resumes_to_the_uninterrupted_weights(cpt_setup, tmp_path):
    argv, clean = cpt_setup("clean")
    assert main(argv) == 0
    expected = load_file(clean / "mixcpt" / "cpt" / "model.safetensors")

    argv, out = cpt_setup("killed")
    work = out / ".work" / "mixcpt-cpt"
    steps = tmp_path / "steps"
    proc = start(argv, "mixcpt.train.trainer:LSSDTrainer.training_step", steps, slow_s=0.4)
    # killed while step 5 runs: checkpoint-3 is complete and training has moved past it
    wait_for(
        lambda: (work / "checkpoint-3" / "trainer_state.json").exists() and progress(steps) >= 5,
        proc,
    )
    kill(proc)
    assert not (out / "mixcpt" / "cpt").exists()  # nothing that looks finished

    proc = start(argv, "mixcpt.train.trainer:LSSDTrainer.training_step", steps, slow_s=0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert progress(steps) == CPT_STEPS - SAVE_STEPS  # only the steps after checkpoint-3 ran again
    metrics = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert metrics["resumed_from"].endswith("checkpoint-3") and metrics["steps"] == CPT_STEPS
    resumed = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)
    assert not work.exists()
    # TensorBoard shows each step once: the resumed run's events replace the killed run's after
    # checkpoint-3 (it had logged step 4 already)
    events = EventAccumulator(str(out / "logs" / "mixcpt" / "cpt"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/ce_loss")] == [*range(1, CPT_STEPS + 1)]


def test_a_partial_checkpoint_is_never_resumed_from(cpt_setup):
    """A save cut short (killed, disk full) leaves checkpoint-N without trainer_state.json: the
    rerun resumes from the previous complete checkpoint and still ends with the uninterrupted
    weights."""
    argv, clean = cpt_setup("clean")
    assert main(argv) == 0
    expected = load_file(clean / "mixcpt" / "cpt" / "model.safetensors")

    argv, out = cpt_setup("partial")
    work = out / ".work" / "mixcpt-cpt"
    from mixcpt.train.trainer import LSSDTrainer

    real_save = LSSDTrainer._save_checkpoint

    def disk_full_at_step_6(self, *args, **kwargs):
        if self.state.global_step == 6:
            (work / "checkpoint-6").mkdir()
            (work / "checkpoint-6" / "model.safetensors").write_bytes(
                b"\0" * 10
            )  # what a full disk leaves
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LSSDTrainer, "_save_checkpoint", disk_full_at_step_6)
        assert main(argv) == 1  # one line (tests/test_disk_full.py), no traceback
    assert (
        work / "checkpoint-3" / "trainer_state.json"
    ).exists()  # the previous checkpoint is intact
    assert not (work / "checkpoint-6").exists()  # the partial one was removed at once
    assert main(argv) == 0
    metrics = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert metrics["resumed_from"].endswith("checkpoint-3")
    resumed = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(cpt_setup, tmp_path):
    argv, out = cpt_setup("nan")
    # Plain CE (no teacher forwards to count): the tiny Llama calls its RMSNorm 5 times per forward
    # (2 per layer, 1 final), so from call 21 on, step index 4 and later see NaN hidden states.
    argv[1] = str(tmp_path / "ce.yaml")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["cpt"]["lssd_weight"] = 0
    (tmp_path / "ce.yaml").write_text(yaml.safe_dump(config))
    proc = start(
        argv,
        "transformers.models.llama.modeling_llama:LlamaRMSNorm.forward",
        tmp_path / "calls",
        slow_s=0,
        NAN_FROM="21",
    )
    assert proc.wait(timeout=120) == 1
    stderr = proc.stderr.read()
    errors = [line for line in stderr.splitlines() if line.startswith("mixcpt:")]
    assert "Traceback" not in stderr
    assert (
        len(errors) == 1
        and "non-finite loss at step 4" in errors[0]
        and "on_nonfinite: skip" in errors[0]
    )
    work = out / ".work" / "mixcpt-cpt"
    assert (
        json.loads((work / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    )
    assert load_file(work / "checkpoint-3" / "model.safetensors")  # loadable
    assert not (out / "mixcpt" / "cpt").exists()


def mixcpt_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mixcpt:")]


def stop_mid_training(argv, out, steps, signum) -> int:
    """Run `argv` slowed, send `signum` while step 5 runs (checkpoint-3 is complete by then), and
    check the stop: exit 143, one line, a complete checkpoint of the step that was running,
    nothing that looks finished, the lock released. Returns that step."""
    work = out / ".work" / "mixcpt-cpt"
    proc = start(argv, "mixcpt.train.trainer:LSSDTrainer.training_step", steps, slow_s=0.4)
    wait_for(
        lambda: (work / "checkpoint-3" / "trainer_state.json").exists() and progress(steps) >= 5,
        proc,
    )
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 143
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    (line,) = mixcpt_lines(stderr)
    saved = int(line.split("checkpoint of step ")[1].split()[0])
    assert 5 <= saved < CPT_STEPS and saved == progress(steps)  # the step that was running
    assert line == (
        f"mixcpt: stopped by {signal.Signals(signum).name}; mixcpt/cpt: checkpoint of step "
        f"{saved} saved in {work / f'checkpoint-{saved}'}; rerun the same command to resume"
    )
    state = json.loads((work / f"checkpoint-{saved}" / "trainer_state.json").read_text())
    assert state["global_step"] == saved
    assert load_file(work / f"checkpoint-{saved}" / "model.safetensors")
    assert not (out / "mixcpt" / "cpt").exists()
    assert not (out / ".mixcpt.lock").exists()
    return saved


def test_sigterm_mid_training_saves_a_checkpoint_and_the_rerun_ends_as_uninterrupted(
    cpt_setup, tmp_path
):
    """Preemption (design.md §3): SIGTERM -> a checkpoint at the end of the running step, exit 143;
    the same command resumes from it, and the weights equal an uninterrupted run's."""
    argv, clean = cpt_setup("clean")
    assert main(argv) == 0
    expected = load_file(clean / "mixcpt" / "cpt" / "model.safetensors")

    argv, out = cpt_setup("stopped")
    steps = tmp_path / "steps"
    saved = stop_mid_training(argv, out, steps, signal.SIGTERM)

    proc = start(argv, "mixcpt.train.trainer:LSSDTrainer.training_step", steps, slow_s=0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert progress(steps) == CPT_STEPS - saved  # no step ran twice
    metrics = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert metrics["resumed_from"].endswith(f"checkpoint-{saved}")
    assert metrics["steps"] == CPT_STEPS
    resumed = load_file(out / "mixcpt" / "cpt" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)
    assert not (out / ".work" / "mixcpt-cpt").exists()


def test_sigusr1_saves_too_and_a_rerun_under_other_settings_rebuilds_instead_of_resuming(
    cpt_setup, tmp_path, capsys
):
    """SLURM's warning before a time limit (`--signal=USR1@...`) stops like SIGTERM. A rerun with
    another learning rate must not resume those checkpoints (a resumed Trainer would keep the
    checkpoint's schedule: a silent mix): the checkpoints were made for other inputs, so they are
    dropped and the stage is built from its first step."""
    argv, out = cpt_setup("usr1")
    steps = tmp_path / "steps"
    stop_mid_training(argv, out, steps, signal.SIGUSR1)

    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["cpt"]["training"].update(learning_rate=1e-3, logging_steps=2, save_steps=4)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main([argv[0], str(tmp_path / "other.yaml"), *argv[2:]]) == 0
    # the interrupted stage has no output yet: it is built anew, its old checkpoints dropped
    assert "mixcpt: cpt/mixcpt: building (no earlier output)" in capsys.readouterr().out
    metrics = json.loads((out / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert metrics["resumed_from"] is None


# ---- data stage ------------------------------------------------------------------------------


@pytest.fixture
def data_setup(tmp_path, tiny_model_dir):
    rows = [
        {"text": f"The planet P{i} orbits the star S{i % 7} and has {i % 5} moons."}
        for i in range(300)
    ]
    (tmp_path / "domain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"instruction": f"What is {i} plus 1?", "output": str(i + 1)} for i in range(60)]
    (tmp_path / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": "./tiny-llama"},
        "data": {
            "block_size": 32,
            "tokenize_batch_size": 16,
            "domain": [{"path": "domain.jsonl", "weight": 0.7}],
            "instructions": [{"path": "instructions.jsonl", "weight": 0.3}],
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return lambda out: ["data", str(tmp_path / "config.yaml"), "--output", str(tmp_path / out)]


def data_outputs(folder) -> dict[str, bytes]:
    """Every output file's bytes, except the timings in data_stats.json and the build id in
    fingerprint.json (new at every build)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "data_stats.json":
                stats = json.loads(data)
                stats.pop("tokenize_seconds"), stats.pop("tokens_per_second")
                data = json.dumps(stats, sort_keys=True).encode()
            if path.name == "fingerprint.json":
                record = json.loads(data)
                record.pop("build")
                data = json.dumps(record, sort_keys=True).encode()
            files[str(path.relative_to(folder))] = data
    return files


def test_data_stage_killed_mid_tokenisation_leaves_nothing_that_is_reused(data_setup, tmp_path):
    assert main(data_setup("clean")) == 0
    expected = data_outputs(tmp_path / "clean" / "data")

    argv, out, records = data_setup("killed"), tmp_path / "killed", tmp_path / "records"
    proc = start(argv, "mixcpt.data.stage:_render", records, slow_s=0.01)
    wait_for(lambda: progress(records) >= 100, proc)  # a third of the domain file tokenised
    kill(proc)
    assert not (out / "data").exists()
    assert list(
        out.glob(".data.tmp-*")
    )  # what SIGKILL left behind: a temporary folder, never data/

    proc = start(argv, "mixcpt.data.stage:_render", records, slow_s=0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    assert data_outputs(out / "data") == expected
    assert not list(out.glob(".data.*"))  # the dead process's temporary folder was removed
    assert json.loads((out / "results.json").read_text())["data"]["mix"]["n_tokens"] > 0


def test_data_stage_stopped_by_sigterm_exits_143_and_leaves_nothing(data_setup, tmp_path):
    """A stop signal in a stage that has no checkpoints stops at once: exit 143, one line, the
    temporary folder removed, the lock released; the rerun builds the same data."""
    assert main(data_setup("clean")) == 0
    expected = data_outputs(tmp_path / "clean" / "data")

    argv, out, records = data_setup("stopped"), tmp_path / "stopped", tmp_path / "records"
    proc = start(argv, "mixcpt.data.stage:_render", records, slow_s=0.01)
    wait_for(lambda: progress(records) >= 100, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    assert mixcpt_lines(stderr) == ["mixcpt: stopped by SIGTERM; rerun the same command to resume"]
    assert sorted(p.name for p in out.iterdir()) == []  # no data/, no .data.tmp-*, no lock

    assert main(argv) == 0
    assert data_outputs(out / "data") == expected

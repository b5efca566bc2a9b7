"""The processes of a launch (torchrun, accelerate launch): one accelerate state for every stage.

accelerate keeps one shared `PartialState`, set up by whoever creates it first, and with it the
process group. Created bare on a machine with no accelerator, it reports a single process even
under torchrun (it joins a launch on the CPU only when told `cpu=True`), so `wait_for_everyone`
returns at once and every process believes it is the main one: two processes then write the same
run folder at the same time. The Trainer's arguments say `use_cpu` on such machines
(`train/arguments.py`); the stages create the state here the same way, so that it is right
whichever comes first. For the same reason the stages, which create it first, give the process
group its timeout: a Trainer created later cannot change it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from mixcpt.config import Config
from mixcpt.errors import ConfigError

# TrainingArguments.ddp_timeout's default (torch's own for a process group)
DEFAULT_TIMEOUT_S = 1800

# DeepSpeed picks its accelerator when first imported (accelerate imports it, when installed, as
# any Trainer is created); finding no GPU it says so on stdout, which would corrupt output meant
# for a pipe (a benchmark's JSON line). Naming the CPU accelerator it would pick anyway keeps it
# quiet. Every stage and Trainer of mixcpt imports this module first.
if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def on_cpu_only() -> bool:
    """True on a machine with no accelerator (CUDA, XPU, MPS...): processes there use gloo."""
    return not torch.accelerator.is_available()


def launch_timeout(cfg: Config) -> timedelta:
    """How long a process of the launch waits for the others at a barrier: the largest
    `ddp_timeout` the training sections set (one process group serves every stage)."""
    sections = (cfg.cpt.training, cfg.sft.training, cfg.dpo.training)
    seconds = max(getattr(t, "ddp_timeout", None) or DEFAULT_TIMEOUT_S for t in sections)
    return timedelta(seconds=seconds)


def process_state(cfg: Config | None = None) -> PartialState:
    """This process's place in the launch (a single process when not launched). The first call
    of a process, which sets the process group up, passes the run's `cfg` for its timeout."""
    if cfg is None:
        return PartialState(cpu=on_cpu_only())
    return PartialState(cpu=on_cpu_only(), timeout=launch_timeout(cfg))


def launched_mode() -> tuple[str, str] | None:
    """How an `accelerate launch` says this process trains, read from the environment it sets:
    ("fsdp", source), or ("zero<N>", source) with the ZeRO stage of its DeepSpeed config file
    (which wins over the launcher's option, as in accelerate) or of ACCELERATE_DEEPSPEED_ZERO_STAGE
    (accelerate's default: 2); ("ddp", source) for DeepSpeed without ZeRO. None when accelerate
    launched neither. `mixcpt plan` and `mixcpt check` both read the launch here.

    Raises ConfigError naming the variable when the config file cannot be read or the stage is
    not 0 to 3."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp", "from ACCELERATE_USE_FSDP"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        key = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
        stage = zero_stage(config_file, key)
    else:
        key = "ACCELERATE_DEEPSPEED_ZERO_STAGE"
        stage = valid_zero_stage(env.get(key, "2"), key)
    return ("zero" + str(stage) if stage else "ddp"), f"from {key}"


def zero_stage(ds_config: str | dict, key: str) -> int:
    """The ZeRO stage (0 to 3; 0 when unset) of a DeepSpeed config: a JSON file's path or its
    dict. `key` names where it came from in errors."""
    if not isinstance(ds_config, dict):
        try:
            ds_config = json.loads(Path(ds_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"{key}: cannot read the DeepSpeed config {ds_config}: {reason}"
            ) from None
    return valid_zero_stage(ds_config.get("zero_optimization", {}).get("stage", 0), key)


def valid_zero_stage(value, key: str) -> int:
    """`value` as a ZeRO stage number; ConfigError naming `key` unless it is 0 to 3."""
    try:
        stage = int(value)
    except (TypeError, ValueError):
        stage = -1
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{key}: the ZeRO stage is {value!r}; DeepSpeed has stages 0 to 3")
    return stage


# How often a process of a launch says it is alive while others wait on it through files, and
# how long they wait without hearing from it before they give up (it was killed outright).
HEARTBEAT_S = 5.0
SILENCE_S = 120.0


class _Rendezvous:
    """Files through which the processes of a launch wait for each other without a collective:
    a barrier or all-gather waits only as long as the process group's timeout (30 minutes by
    default), after which the watchdog kills the launch, while a one-process stage or an uneven
    share of models to evaluate can take longer. A folder named for this launch under
    `work_dir`; each process keeps a heartbeat file fresh while it works, so one killed outright
    (no launcher to stop the others) is noticed after SILENCE_S."""

    def __init__(self, state: PartialState, work_dir: Path):
        self.state, self.work_dir = state, work_dir
        token = broadcast_object_list([uuid.uuid4().hex if state.is_main_process else None])[0]
        self.folder = work_dir / f"launch-{token}"
        self.folder.mkdir(parents=True, exist_ok=True)
        # this process's heartbeat, kept fresh until `close`
        self._stop, beat = threading.Event(), self.folder / f"alive-{state.process_index}"

        def run() -> None:
            while not self._stop.is_set():
                beat.touch()
                self._stop.wait(HEARTBEAT_S)

        threading.Thread(target=run, daemon=True).start()

    def fail(self) -> None:
        """Tell the others that this process stopped on an error (it says why itself)."""
        self._stop.set()
        (self.folder / f"failed-{self.state.process_index}").touch()

    def wait_for(self, path: Path, rank: int) -> None:
        """Poll until `path` exists; SystemExit(1) (quietly: that process says why) when `rank`
        wrote `failed` instead, or its heartbeat has been silent for SILENCE_S."""
        beat = self.folder / f"alive-{rank}"
        while not path.exists():
            if (self.folder / f"failed-{rank}").exists():
                raise SystemExit(1)
            if beat.exists() and time.time() - beat.stat().st_mtime > SILENCE_S:
                print(f"mixcpt: error: process {rank} of the launch stopped responding", flush=True)
                raise SystemExit(1)
            time.sleep(0.5)

    def close(self) -> None:
        """Meet (every process is past its waits), then the main process removes the folder."""
        self._stop.set()
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            shutil.rmtree(self.folder, ignore_errors=True)
            try:
                self.work_dir.rmdir()  # when nothing else is in progress there
            except OSError:
                pass


def main_process_runs(state: PartialState, work_dir: Path, name: str, work: Callable[[], None]):
    """Run `work()` on the main process of a launch while the others wait for it without a
    collective (`_Rendezvous`; one process alone: just run it). If `work` raises on the main
    process, the others exit with status 1 and print nothing (the main process says why)."""
    if state.num_processes == 1:
        work()
        return
    meet = _Rendezvous(state, work_dir)
    done = meet.folder / f"{name}.done"
    if state.is_main_process:
        try:
            work()
        except BaseException:
            meet.fail()
            raise
        done.touch()
    else:
        meet.wait_for(done, 0)
    meet.close()


def gather_through_files(state: PartialState, work_dir: Path, name: str, work: Callable[[], Any]):
    """Every process runs `work()`; returns the list of all their results, in process order, on
    the main process (None on the others). The results travel through pickle files (`_Rendezvous`),
    so a process whose share takes much longer than another's never leaves that one in a
    collective past the process group's timeout. One process alone: [work()]."""
    if state.num_processes == 1:
        return [work()]
    meet = _Rendezvous(state, work_dir)
    rank = state.process_index
    try:
        result = work()
    except BaseException:
        meet.fail()
        raise
    path = meet.folder / f"{name}-{rank}.pkl"
    with open(path.with_suffix(".tmp"), "wb") as f:
        pickle.dump(result, f)
    path.with_suffix(".tmp").replace(path)  # whole or absent
    results, gathered = None, meet.folder / f"{name}.gathered"
    if state.is_main_process:
        for other in range(1, state.num_processes):
            meet.wait_for(meet.folder / f"{name}-{other}.pkl", other)
        results = [
            pickle.loads((meet.folder / f"{name}-{r}.pkl").read_bytes())
            for r in range(state.num_processes)
        ]
        gathered.touch()
    else:  # not in a barrier: the main process may wait long for the slowest share
        meet.wait_for(gathered, 0)
    meet.close()
    return results

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

from datetime import timedelta

import torch
from accelerate import PartialState

from mixcpt.config import Config

# TrainingArguments.ddp_timeout's default (torch's own for a process group)
DEFAULT_TIMEOUT_S = 1800


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

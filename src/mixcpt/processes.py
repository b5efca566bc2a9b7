"""The processes of a launch (torchrun, accelerate launch): one accelerate state for every stage.

accelerate keeps one shared `PartialState`, set up by whoever creates it first. Created bare on a
machine with no accelerator, it reports a single process even under torchrun (it joins a launch on
the CPU only when told `cpu=True`), so `wait_for_everyone` returns at once and every process
believes it is the main one: two processes then write the same run folder at the same time. The
Trainer's arguments say `use_cpu` on such machines (`train/arguments.py`); the stages create the
state here the same way, so that it is right whichever comes first.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def on_cpu_only() -> bool:
    """True on a machine with no accelerator (CUDA, XPU, MPS...): processes there use gloo."""
    return not torch.accelerator.is_available()


def process_state() -> PartialState:
    """This process's place in the launch (a single process when not launched)."""
    return PartialState(cpu=on_cpu_only())

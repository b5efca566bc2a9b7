"""The launch `mixcpt plan` plans for: the mode (one process, DDP, FSDP, ZeRO) and the number of
GPUs, from the command line, an accelerate config file or the environment of a launcher."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mixcpt.errors import UserError
from mixcpt.processes import launched_mode, valid_zero_stage, zero_stage

MODES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
SHARDED = ("fsdp", "zero3")  # no process holds the whole trained model


@dataclass(frozen=True)
class Launch:
    """How the training stages run: `mode` over `gpus` processes (0: the CPU, one process)."""

    mode: str  # one of MODES
    gpus: int
    source: str  # how the mode was found, said with the plan

    @property
    def processes(self) -> int:
        return max(self.gpus, 1)


def _accelerate_mode(path: Path) -> tuple[str, int]:
    """(mode, num_processes) of an `accelerate launch` config file (examples/distributed/)."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    kind, processes = spec.get("distributed_type", "NO"), int(spec.get("num_processes", 1))
    if kind == "FSDP":
        return "fsdp", processes
    if kind == "DEEPSPEED":
        ds = spec.get("deepspeed_config") or {}
        stage = ds.get("zero_stage")
        if stage is None and ds.get("deepspeed_config_file"):
            # accelerate reads it relative to where it is launched; fall back to the YAML's folder
            file = Path(ds["deepspeed_config_file"])
            file = file if file.is_file() else path.parent / file.name
            stage = zero_stage(str(file), f"{path}: deepspeed_config_file")
        stage = valid_zero_stage(stage or 0, f"{path}: deepspeed_config.zero_stage")
        return ("ddp" if not stage else f"zero{stage}"), processes
    return ("single" if processes == 1 else "ddp"), processes


def detect_launch(gpus: int | None = None, mode: str | None = None) -> Launch:
    """The launch to plan for. `mode`: one of MODES or an accelerate config file; else the
    environment of an `accelerate launch` (ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED with
    ACCELERATE_DEEPSPEED_ZERO_STAGE) or of torchrun (WORLD_SIZE); else one process for one GPU
    and DDP for several, as `torchrun --nproc_per_node N` runs it. `gpus`: else the config file's
    num_processes, WORLD_SIZE, or this machine's GPUs (0 without one: the CPU)."""
    env = os.environ
    found_gpus, source = None, "from --mode"
    if mode is not None and mode not in MODES:
        if not Path(mode).is_file():
            raise UserError(f"--mode: {mode!r} is neither one of {', '.join(MODES)} nor a file")
        mode, found_gpus = _accelerate_mode(Path(mode))
        source = "from the accelerate config file"
    elif mode is None and launched_mode() is not None:
        mode, source = launched_mode()
    elif mode is None and int(env.get("WORLD_SIZE", "1")) > 1:
        mode, source = "ddp", "from WORLD_SIZE"
    if gpus is None:
        gpus = found_gpus or int(env.get("WORLD_SIZE", "0")) or torch.cuda.device_count()
    if mode is None:
        mode = "single" if gpus <= 1 else "ddp"
        source = f"default for {gpus} GPUs" if gpus > 1 else "default: one process"
    if gpus == 0:
        if mode != "single":
            raise UserError(f"{mode} ({source}) needs GPUs: give --gpus N (the CPU: one process)")
        return Launch("single", 0, "no GPU here; --gpus N plans for GPUs")
    if mode == "single" and gpus > 1:
        raise UserError(f"--mode single runs one process, but --gpus is {gpus}")
    return Launch(mode, gpus, source)

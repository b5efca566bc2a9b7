"""What would make a stage that does not fit fit, for `mixcpt plan`: single config changes, then
runs of them, then more GPUs, each tried against the memory estimate."""

from __future__ import annotations

import math
from dataclasses import replace

from mixcpt.plan.launch import SHARDED, Launch
from mixcpt.plan.memory import GiB, Workload, estimate_stage
from mixcpt.plan.shapes import ModelShape

# The most GPUs advice suggests: beyond, sharding saves little (activations do not shrink).
MAX_GPUS = 64


def _section(stage: str) -> str:
    """The config section holding a stage's batch settings."""
    name = stage.split("/")[0]
    return f"{name}.training" if name in ("cpt", "sft", "dpo") else name


# A change: (what to set, Workload fields it changes, Launch fields it changes).
Change = tuple[str, dict, dict]


def _changes(work: Workload, launch: Launch) -> list[Change]:
    """The changes that lower `work`'s memory, most specific first."""
    changes = []
    cpt = work.stage.startswith("cpt")
    if work.teacher == "online":
        changes.append(("cpt.teacher: cache", {"teacher": "cache", "frozen_models": 0}, {}))
    if cpt and not work.lora and launch.mode not in SHARDED:
        teacher = {"teacher": "lora", "frozen_models": 0} if work.teacher else {}
        changes.append(("cpt.teacher: lora (train LoRA adapters)", {"lora": True, **teacher}, {}))
    if work.stage == "dpo" and work.frozen_models:
        changes.append(("dpo.precompute_ref: true", {"frozen_models": 0}, {}))
    if work.train and not work.checkpointing:
        label = f"{_section(work.stage)}.gradient_checkpointing: true"
        changes.append((label, {"checkpointing": True}, {}))
    if cpt and work.chunk > 64:
        smaller = max(work.chunk // 4, 64)
        changes.append((f"cpt.loss_chunk_size: {smaller}", {"chunk": smaller}, {}))
    pairs = 2 if work.stage == "dpo" else 1  # DPO's batch counts chosen and rejected
    if work.batch > pairs and work.train:
        factor = work.batch // pairs
        label = (
            f"{_section(work.stage)}.per_device_batch_size: 1 "
            f"(gradient_accumulation_steps x {factor} keeps the batch)"
        )
        changes.append((label, {"batch": pairs, "accumulation": work.accumulation * factor}, {}))
    elif work.batch > 1:
        changes.append((f"{work.stage}.batch_size: 1", {"batch": 1}, {}))
    if work.train and not work.lora and launch.gpus > 1 and launch.mode not in SHARDED:
        label = f"FSDP or ZeRO-3 over the {launch.gpus} GPUs (examples/distributed/)"
        changes.append((label, {}, {"mode": "fsdp"}))
    return changes


def _more_gpus(shape: ModelShape, work: Workload, launch: Launch, limit: int) -> str | None:
    """The fewest GPUs (a power of two, up to MAX_GPUS) over which `work`, sharded (FSDP unless
    ZeRO-3 is in use), fits; None when none does or the stage cannot be sharded."""
    if not work.train or work.lora or launch.gpus == 0:
        return None
    mode = launch.mode if launch.mode in SHARDED else "fsdp"
    gpus = 2 ** math.ceil(math.log2(launch.gpus + 1))
    while gpus <= MAX_GPUS:
        peak = estimate_stage(shape, work, replace(launch, mode=mode, gpus=gpus)).peak
        if peak <= limit:
            name = "ZeRO-3" if mode == "zero3" else "FSDP"
            return f"{name} over {gpus} GPUs ({_gib(peak)})"
        gpus *= 2
    return None


def advise(shape: ModelShape, work: Workload, launch: Launch, limit: int) -> str:
    """What would make `work` fit in `limit` bytes: each single change that does (with its peak),
    else the shortest run of the changes, in order, that does; and more GPUs."""
    changes = _changes(work, launch)
    single = []
    for label, work_fields, launch_fields in changes:
        changed = replace(work, **work_fields), replace(launch, **launch_fields)
        peak = estimate_stage(shape, *changed).peak
        if peak <= limit:
            single.append(f"{label} ({_gib(peak)})")
    more = _more_gpus(shape, work, launch, limit)
    if single:
        return "; or ".join(single + ([more] if more else []))
    applied = []
    for label, work_fields, launch_fields in changes:
        work, launch = replace(work, **work_fields), replace(launch, **launch_fields)
        applied.append(label)
        peak = estimate_stage(shape, work, launch).peak
        if peak <= limit:
            return " + ".join(applied) + f" ({_gib(peak)})" + (f"; or {more}" if more else "")
    return more or "nothing mixcpt can change here: a GPU with more memory"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"

"""`mixcpt plan`: what a run will need, before it runs (design §3, §6): memory per process (GPU) for
each stage, the teacher cache and checkpoints on disk, the tokens; what does not fit and what would.

Nothing is trained or loaded: the numbers come from the config and the model's config.json. The
parameter count is exact (the model is built on the `meta` device); the rest follows what the
stages do (mixcpt.train, mixcpt.align, mixcpt.evaluate):

- Trainable weights are float32 masters (4 bytes per parameter), whatever `model.dtype` says; their
  gradients are float32 and AdamW keeps two float32 moments (8 bytes). `model.dtype` is the storage
  of frozen models (online teacher, DPO reference, the evaluated models) and of saved folders.
  Under bfloat16/float16 the forward runs under autocast, which keeps a 16-bit copy of every
  trained weight from the forward to the backward (DeepSpeed instead holds the module in 16 bits
  and the float32 masters in its optimizer).
- Activations are counted tensor by tensor for a Llama-style decoder layer (RMSNorm, SDPA
  attention, SwiGLU MLP), as what autograd saves (`layer_activation_bytes`); other architectures
  get the same count, approximately.
- The loss comes on top of the activations: stage 1's chunked loss, which SFT's loss goes
  through too, keeps a few float32 [chunk, V] tensors and the gradients it forms in its forward
  (`_chunked_loss`); DPO's loss and scoring make logits at the scored (response) positions only,
  up to [B, T, V] with their float32 log-softmax when every position is scored (`LOGITS_BYTES`).
- A step's peak is its largest moment, not the sum of its parts: with
  gradient_accumulation_steps 1 the gradients are created while the backward frees the
  activations (the Trainer sets gradients to None after each step), so the peak is the larger of
  "activations + loss" and "gradients". With accumulation both coexist.
- The estimate is of bytes alive. On the CPU the process's resident size can be up to about 1 GB
  more: the stages keep freed memory for reuse (mixcpt.malloc_tuning).

The package: `shapes` (the model's parameters and layers), `launch` (the mode and the GPUs),
`memory` (each stage's bytes per process, with the counts above), `advice` (what would make a stage
fit), `disk` (tokens, teacher cache, checkpoints, model folders); `plan` here puts them together
and `format_plan` prints them.

`benchmarks/plan_vs_measured.py` checks the training stages against peak memory measured on the
CPU; the table is in docs/distributed.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcpt.config import Config
from mixcpt.errors import format_bytes
from mixcpt.plan.advice import _gib, advise
from mixcpt.plan.disk import Disk, Tokens, count_tokens, disk_bytes, disk_estimate
from mixcpt.plan.launch import MODES, Launch, detect_launch
from mixcpt.plan.memory import (
    GiB,
    StageMemory,
    Workload,
    estimate_stage,
    layer_activation_bytes,
    memory_limit,
    workloads,
)
from mixcpt.plan.shapes import ModelShape, model_shape
from mixcpt.rundir import RunDir

__all__ = [
    "MODES",
    "Disk",
    "Launch",
    "ModelShape",
    "Plan",
    "StageMemory",
    "Tokens",
    "Workload",
    "count_tokens",
    "detect_launch",
    "disk_bytes",
    "estimate_stage",
    "format_plan",
    "layer_activation_bytes",
    "model_shape",
    "plan",
    "workloads",
]


@dataclass(frozen=True)
class Plan:
    """Everything `mixcpt plan` says, as numbers (bytes)."""

    shape: ModelShape
    launch: Launch
    limit: int  # memory each process must fit in
    limit_source: str
    tokens: Tokens
    stages: list[StageMemory]
    advice: dict[str, str]  # stage -> what would make it fit (stages that do not)
    disk: Disk


def plan(
    cfg: Config,
    run: RunDir | None = None,
    gpus: int | None = None,
    mode: str | None = None,
    gpu_memory_gib: float | None = None,
) -> Plan:
    """The plan of `cfg` (its run folder `run`, when given, for the data stage's token counts
    and an existing teacher cache) for `gpus` processes in `mode` (see `detect_launch`) with
    `gpu_memory_gib` GiB each (default: `memory_limit`)."""
    shape = model_shape(cfg, run)
    launch = detect_launch(gpus, mode)
    limit, limit_source = memory_limit(launch, gpu_memory_gib)
    tokens = count_tokens(cfg, run)
    stages, advice = [], {}
    for work in workloads(cfg):
        memory = estimate_stage(shape, work, launch)
        stages.append(memory)
        if memory.note or memory.peak > limit:
            advice[work.stage] = advise(shape, work, launch, limit)
    disk = disk_estimate(cfg, shape, tokens, launch, run)
    return Plan(shape, launch, limit, limit_source, tokens, stages, advice, disk)


# ---- printing -------------------------------------------------------------------------------
def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


MODE_NAMES = {
    "single": "one process",
    "ddp": "DDP",
    "fsdp": "FSDP (full shard)",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}


def format_plan(p: Plan, config_path: str, dtype: str) -> str:
    """The plan as `mixcpt plan` prints it."""
    s, launch = p.shape, p.launch
    where = f"{launch.gpus} GPU{'s' * (launch.gpus > 1)}" if launch.gpus else "the CPU"
    precision = f"{dtype} autocast, float32 master weights" if dtype != "float32" else "float32"
    lines = [
        f"mixcpt plan: {config_path}",
        f"model    {s.source}: {_count(s.params)} parameters, {s.layers} layers, hidden "
        f"{s.hidden}, vocabulary {s.vocab}",
        f"launch   {where}, {MODE_NAMES[launch.mode]} ({launch.source}); {precision}",
        f"memory   {_gib(p.limit)} per process ({p.limit_source})",
        f"tokens   D_MIX {_count(p.tokens.mix)}, D_K {_count(p.tokens.domain)} ({p.tokens.source})",
        "",
    ]
    unit, scale = ("GiB", GiB) if max(m.peak for m in p.stages) >= GiB else ("MiB", 2**20)
    columns = ("weights", "grads", "optim", "frozen", "activ", "no ckpt", "ckpt", "loss", "other")
    lines.append(
        f"{'per process (' + unit + ')':<20}" + "".join(f"{c:>9}" for c in columns) + f"{'peak':>9}"
    )
    for m in p.stages:
        values = (
            m.weights,
            m.gradients,
            m.optimizer,
            m.frozen,
            m.activations,
            m.activations_full,
            m.activations_checkpointed,
            m.loss,
            m.other,
            m.peak,
        )
        fits = "DOES NOT FIT" if m.stage in p.advice else "fits"
        lines.append(f"{m.stage:<20}" + "".join(f"{v / scale:>9.1f}" for v in values) + f"  {fits}")
    lines.append(
        "  activ: as configured (no ckpt / ckpt: without / with gradient checkpointing); "
        "peak: the step's largest moment, not the sum"
    )
    if not launch.gpus:
        lines.append(
            "  on the CPU the resident size can be up to about 1 GiB more: freed memory is kept "
            "for reuse (mixcpt.malloc_tuning)"
        )
    for m in p.stages:
        if m.stage in p.advice:
            why = m.note or f"{_gib(m.peak)} > {_gib(p.limit)}"
            lines.append(f"{m.stage} does not fit ({why}). Fits with: {p.advice[m.stage]}")
    lines += ["", "disk"]
    d = p.disk
    if d.teacher_cache is None:
        lines.append("  teacher cache  unknown (D_MIX's tokens unknown: set data.total_tokens)")
    elif d.teacher_cache:
        per_token = d.teacher_cache / p.tokens.mix if p.tokens.mix else 0
        lines.append(
            f"  teacher cache  {format_bytes(d.teacher_cache)} (about {per_token:.0f} bytes per "
            f"D_MIX token: top-k int32 ids, log-probs, a float32 tail)"
        )
    if d.checkpoints:
        stage, size = max(d.checkpoints.items(), key=lambda kv: kv[1])
        lines.append(
            f"  checkpoints    {format_bytes(size)} each ({stage}: weights, optimizer, RNG), up to "
            f"{d.kept_checkpoints} at once: {format_bytes(d.kept_checkpoints * size)}"
        )
    if d.folders:
        size = next(iter(d.folders.values()))
        lines.append(
            f"  model folders  {len(d.folders)} x {format_bytes(size)} "
            f"({', '.join(d.folders)}): {format_bytes(sum(d.folders.values()))}"
        )
    lines.append(f"  at most        {format_bytes(d.total)} at once")
    return "\n".join(lines)

"""Memory per process (GPU) of each stage for `mixcpt plan`: the trained model by launch mode, the
activations, the loss, and the limit a process must fit in. How it counts: mixcpt.plan's
docstring."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.pipeline import stage_arms
from mixcpt.plan.launch import SHARDED, Launch
from mixcpt.plan.shapes import ModelShape

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MASTER = 4  # bytes of a trained weight and of its gradient (float32)
ADAM = 8  # AdamW's two float32 moments per trained weight
# CUDA context and cuBLAS workspaces per GPU: about half a GiB (not measured here: no GPU).
CUDA_CONTEXT = GiB // 2


@dataclass(frozen=True)
class Workload:
    """What one stage runs in each process: `batch` sequences of up to `length` tokens."""

    stage: str  # "cpt/mixcpt", "cpt/baseline", "select", "sft", "dpo", "eval"
    train: bool
    batch: int  # sequences per forward (DPO: 2 x pairs)
    length: int
    storage: int  # bytes per weight of model.dtype
    accumulation: int = 1
    checkpointing: bool = False
    lora: bool = False  # train cfg.cpt.lora's adapters, the base frozen
    teacher: str | None = None  # the cpt teacher: "online", "lora", "cache" or None
    chunk: int = 256  # positions per chunk of the cpt loss
    cache_top_k: int = 0
    frozen_models: int = 0  # full models beside the trained one (online teacher, DPO reference)
    models: int = 1  # inference: models in memory (eval: the base beside each stage's)
    forwards: int = 1  # inference: models run on the same batch (eval's KL to the base)
    masked: bool = True  # a [B, T, T] attention mask (packed or padded), not flash-attention


@dataclass(frozen=True)
class StageMemory:
    """Bytes per process (GPU) of one stage; `peak` is the step's largest moment
    (mixcpt.plan's docstring), not the sum of the parts."""

    stage: str
    weights: int  # the trained model's (or the evaluated models')
    gradients: int
    optimizer: int
    frozen: int  # online teacher or DPO reference weights
    activations: int  # as configured
    activations_full: int  # without gradient checkpointing
    activations_checkpointed: int  # with it
    loss: int  # on top of the activations while the loss (and an online teacher's forward) runs
    other: int  # DDP buckets, FSDP/ZeRO gathered weights, CUDA context
    peak: int
    note: str = ""  # why it cannot run as configured, if so


def layer_activation_bytes(shape: ModelShape, work: Workload, compute: int) -> int:
    """Bytes autograd keeps per token for one decoder layer, counted for a Llama-style layer
    (transformers' Llama, with torch.autograd.graph.saved_tensors_hooks):
    - 4 hidden-sized float32 tensors around the two RMSNorms (trained weights are float32, so the
      residual stream is float32 even under autocast); 2 with LoRA, whose frozen norm weights
      need not keep their normalised inputs;
    - in the compute dtype: 4 hidden-sized ones around attention (query, output), 3 more under
      autocast (its 16-bit copies of the q/k/v and gate/up inputs), key and value, and 4
      intermediate-sized ones in the MLP (gate, up, SiLU, product);
    - float32 RMSNorm scales and the attention's log-sum-exp (a few per token);
    - with an attention mask (packed documents, padding) SDPA gets key and value repeated to every
      head and a [T, T] mask per layer in the compute dtype; flash-attention has neither;
    - LoRA: each adapter's rank-r intermediate."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    autocast = compute < 4
    if work.masked:
        kv, mask = shape.heads * shape.head_dim, work.length * compute
    else:
        mask = 0
    compute_elems = (4 + 3 * autocast) * h + 2 * kv + 4 * shape.intermediate
    lora = shape.lora_per_layer * shape.lora_rank if work.lora else 0
    norm_side = 2 if work.lora else 4
    return 4 * norm_side * h + compute * (compute_elems + lora) + 4 * (shape.heads + 2) + mask


def _activations(shape: ModelShape, work: Workload, compute: int) -> tuple[int, int]:
    """(without, with gradient checkpointing) bytes of a training step's activations: every
    layer's saved tensors (or, checkpointed, only each layer's float32 input, and one layer
    recomputed in the backward), the final norm's, and one layer's gradients in the backward."""
    tokens = work.batch * work.length
    layer = tokens * layer_activation_bytes(shape, work, compute)
    final_norm = tokens * 3 * shape.hidden * 4
    full = shape.layers * layer + final_norm + layer
    checkpointed = shape.layers * tokens * shape.hidden * 4 + final_norm + 2 * layer
    return full, checkpointed


def _teacher_forward(shape: ModelShape, work: Workload) -> int:
    """Bytes of an online or LoRA teacher's no-grad forward: the residual stream into and out of
    the layer running (only the final hidden states are kept, `LossForward`) and that layer's
    working tensors."""
    tokens = work.batch * work.length
    residual = 2 * tokens * shape.hidden * work.storage
    return residual + tokens * layer_activation_bytes(shape, work, work.storage)


def _chunked_loss(shape: ModelShape, work: Workload, launch: Launch, compute: int) -> int:
    """Bytes of stage 1's chunked loss (`fused_loss.cpt_loss`; SFT's too, without a teacher)
    beside the activations: it keeps the gradient of its input (the final hidden states, or under
    FSDP/ZeRO-3 the [B, T, V] logits, which are then made in full) and of the output layer
    (float32 [V, H], when trained); the backward scales both into new tensors. Per chunk: the
    student's float32 logits, log-softmax and gradient, and the teacher's logits (plus its softmax
    on a GPU; the CPU kernel works a row at a time); with several chunks, the next chunk's logits
    are made while the last chunk's are still held, so at least 4 [chunk, V] float32 tensors."""
    tokens = work.batch * work.length
    if launch.mode in SHARDED:  # the output layer's weight is a shard outside the forward
        logits = tokens * shape.vocab * compute
        resident = logits  # the input's gradient, the size of the logits
    else:
        logits = 0
        resident = tokens * shape.hidden * 4 + (0 if work.lora else shape.vocab * shape.hidden * 4)
    teacher = {"online": 2, "lora": 2, "cache": 0}.get(work.teacher, 0)
    if teacher and launch.gpus == 0:
        teacher = 1  # the C kernel: no [chunk, V] softmax
    per_chunk = 3 + teacher if tokens <= work.chunk else max(4, 3 + teacher)
    chunks = per_chunk * min(work.chunk, tokens) * shape.vocab * 4
    if work.teacher in ("online", "lora"):
        target = tokens * shape.hidden * work.storage  # its final hidden states
    elif work.teacher == "cache":  # the cached top-k rows of the batch: int32 ids, logprobs, tail
        target = 2 * tokens * (work.cache_top_k * 6 + 4)
    else:
        target = 0
    during = logits + resident + target + chunks
    backward = logits + 2 * resident
    teacher_forward = _teacher_forward(shape, work) if work.teacher in ("online", "lora") else 0
    return max(during, backward, teacher_forward)


# Bytes per element of a [rows, T, V] logits tensor while DPO's response log-probs or a scoring
# pass use it (they are made at the scored positions only: this counts every position scored):
# the logits, their float32 copy (a no-op in float32) or the scored positions' copy, and the
# float32 log-softmax; in the backward, the log-softmax's output, the incoming gradient and the
# outgoing one. 12 either way, in float32 and in bf16.
LOGITS_BYTES = 12


def _trained_model(shape: ModelShape, work: Workload, launch: Launch) -> tuple[int, ...]:
    """(weights, gradients, optimizer, gathered or buffered weights) of the trained model per
    process, by mode (mixcpt.plan's docstring; docs/distributed.md)."""
    compute, g = work.storage, launch.processes
    trained = shape.lora_params if work.lora else shape.params
    frozen_base = shape.params * work.storage if work.lora else 0  # LoRA's, in model.dtype
    if launch.mode.startswith("zero"):
        # DeepSpeed: the module in the compute dtype, float32 masters and moments in its optimizer
        stage = int(launch.mode[-1])
        weights = trained * compute // (g if stage == 3 else 1)
        gradients = trained * compute // (g if stage >= 2 else 1)
        optimizer = trained * (MASTER + ADAM) // g
        largest = max(shape.layer_params, shape.vocab * shape.hidden)
        gathered = 2 * largest * compute if stage == 3 else 0  # a unit in use, one prefetched
    elif launch.mode == "fsdp":
        # float32 shards; the root unit (embeddings, output layer) is gathered for the whole step,
        # a decoder layer at a time (and the next, prefetched) with its unsharded gradient
        weights, gradients = trained * MASTER // g, trained * MASTER // g
        optimizer = trained * ADAM // g
        outside = shape.params - shape.layers * shape.layer_params
        gathered = (outside + 2 * shape.layer_params) * compute + shape.layer_params * MASTER
    else:
        autocast_copies = trained * compute if compute < 4 else 0  # mixcpt.plan's docstring
        weights = trained * MASTER + autocast_copies
        gradients, optimizer = trained * MASTER, trained * ADAM
        gathered = trained * MASTER if launch.mode == "ddp" else 0  # DDP's gradient buckets
    return weights + frozen_base, gradients, optimizer, gathered


def estimate_stage(shape: ModelShape, work: Workload, launch: Launch) -> StageMemory:
    """`work`'s memory per process under `launch` (single-process stages, select and eval, run on
    one GPU whatever the launch)."""
    compute = work.storage  # autocast to model.dtype; float32 runs in float32
    context = CUDA_CONTEXT if launch.gpus else 0
    tokens = work.batch * work.length
    if not work.train:
        working = tokens * layer_activation_bytes(shape, work, compute)
        kv_cache = 2 * shape.layers * tokens * shape.kv_heads * shape.head_dim * compute
        acts = work.forwards * (working + kv_cache)  # use_cache is on in saved models
        loss = work.forwards * tokens * shape.vocab * LOGITS_BYTES
        weights = work.models * shape.params * work.storage
        peak = weights + acts + loss + context
        return StageMemory(work.stage, weights, 0, 0, 0, acts, acts, acts, loss, context, peak)

    weights, gradients, optimizer, gathered = _trained_model(shape, work, launch)
    frozen = work.frozen_models * shape.params * work.storage
    if launch.mode == "fsdp" and work.teacher == "online":
        # FSDP2 shards the online teacher like the student (teachers.OnlineTeacher.follow): its
        # forward gathers the root unit and a layer at a time (and the next, prefetched)
        outside = shape.params - shape.layers * shape.layer_params
        frozen = frozen // launch.processes + (outside + 2 * shape.layer_params) * work.storage
    elif launch.mode == "zero3" and work.teacher == "online":
        # ZeRO-3 partitions it in an inference engine of its own (OnlineTeacher.follow): its
        # forward gathers a unit at a time, and the next, prefetched, as the student's does
        largest = max(shape.layer_params, shape.vocab * shape.hidden)
        frozen = frozen // launch.processes + 2 * largest * work.storage
    full, checkpointed = _activations(shape, work, compute)
    acts = checkpointed if work.checkpointing else full
    if work.stage.startswith("cpt") or work.stage == "sft":  # SFT: `align.sft.SFTTrainer`
        loss = _chunked_loss(shape, work, launch, compute)
    else:  # DPO's log-probs (and a reference model's) at the response positions, at most all
        loss = (1 + work.frozen_models) * tokens * shape.vocab * LOGITS_BYTES
    other = gathered + context
    held = gradients if work.accumulation > 1 else 0  # mixcpt.plan's docstring
    peak = weights + frozen + optimizer + other + max(acts + loss + held, gradients)
    if launch.mode in SHARDED and work.teacher == "online":
        # before the first step every process holds the whole float32 student (moved to its GPU)
        # and the whole teacher copied from it (train.stage.load_teacher); both are sharded only
        # then, so that moment can be the stage's peak
        whole = shape.params * (MASTER + work.storage) + context
        peak = max(peak, whole)
    note = ""
    if work.lora and launch.mode in SHARDED:
        note = "cpt.teacher: lora is refused under FSDP and ZeRO-3 (use DDP, ZeRO-2 or cache)"
    parts = (weights, gradients, optimizer, frozen, acts, full, checkpointed, loss, other, peak)
    return StageMemory(work.stage, *parts, note)


# ---- the config's stages --------------------------------------------------------------------
def workloads(cfg: Config) -> list[Workload]:
    """One `Workload` per stage the config runs: cpt of each arm, select, sft, dpo (with
    preference data), eval. Sequence lengths are the configured maxima (a batch's longest)."""
    common = dict(
        storage=DTYPE_BYTES[cfg.model.dtype],
        masked=cfg.model.attn_implementation != "flash_attention_2",
    )
    # selection, SFT and DPO run their right-padded batches without an attention mask
    # (`responses.padded_forward_inputs`): SDPA keeps its causal path, with no [T, T] mask
    padded = {**common, "masked": False}

    def training(tc) -> dict:
        return dict(
            accumulation=tc.gradient_accumulation_steps, checkpointing=tc.gradient_checkpointing
        )

    stages = []
    for arm in stage_arms(cfg, "cpt"):
        if find_arm(cfg, arm).merge_of:  # no training: one model in memory, less than any stage
            continue
        cpt = find_arm(cfg, arm).config.cpt
        teacher = cpt.teacher if cpt.lssd_weight > 0 else None
        stages.append(
            Workload(
                f"cpt/{arm}",
                True,
                cpt.training.per_device_batch_size,
                cfg.data.block_size,
                lora=cpt.teacher == "lora",
                teacher=teacher,
                chunk=cpt.loss_chunk_size,
                cache_top_k=cpt.cache_top_k,
                frozen_models=int(teacher == "online"),
                **training(cpt.training),
                **common,
            )
        )
    stages.append(Workload("select", False, cfg.select.batch_size, cfg.select.max_length, **padded))
    tc = cfg.sft.training
    stages.append(
        Workload(
            "sft", True, tc.per_device_batch_size, cfg.sft.max_length, **training(tc), **padded
        )
    )
    if stage_arms(cfg, "dpo"):
        tc = cfg.dpo.training
        stages.append(
            Workload(
                "dpo",
                True,
                2 * tc.per_device_batch_size,  # chosen and rejected in one forward
                cfg.dpo.max_length,
                frozen_models=int(not cfg.dpo.precompute_ref),
                **training(tc),
                **padded,
            )
        )
    # the base model stays loaded beside each stage's; with a probe both score the same batch
    forwards = 2 if cfg.eval.probe else 1
    stages.append(
        Workload(
            "eval",
            False,
            cfg.eval.batch_size,
            cfg.eval.max_length,
            models=2,
            forwards=forwards,
            **common,
        )
    )
    return stages


def memory_limit(launch: Launch, gpu_memory_gib: float | None) -> tuple[int, str]:
    """(bytes each process must fit in, where that figure came from): --gpu-memory, else this
    machine's first GPU, else its RAM."""
    if gpu_memory_gib is not None:
        return int(gpu_memory_gib * GiB), "--gpu-memory"
    if launch.gpus and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"this machine's {props.name}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if launch.gpus:
        return ram, "this machine's RAM: no GPU here, give --gpu-memory"
    return ram, "this machine's RAM"

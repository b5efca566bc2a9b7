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

`benchmarks/plan_vs_measured.py` checks the training stages against peak memory measured on the
CPU; the table is in docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.errors import ConfigError, UserError, format_bytes
from mixcpt.pipeline import stage_arms
from mixcpt.processes import launched_mode, valid_zero_stage, zero_stage
from mixcpt.rundir import RunDir
from mixcpt.train.teacher_cache import CACHE_FILES, cache_layout

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MASTER = 4  # bytes of a trained weight and of its gradient (float32)
ADAM = 8  # AdamW's two float32 moments per trained weight
MODES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
SHARDED = ("fsdp", "zero3")  # no process holds the whole trained model
# CUDA context and cuBLAS workspaces per GPU: about half a GiB (not measured here: no GPU).
CUDA_CONTEXT = GiB // 2
# Bytes of text per token, to estimate tokens from file sizes (English BPE; JSON keys count too).
TEXT_BYTES_PER_TOKEN = 4
RNG_STATE_BYTES = 16 * 2**10  # each process's rng_state_N.pth in a checkpoint
# The most GPUs advice suggests: beyond, sharding saves little (activations do not shrink).
MAX_GPUS = 64

# The paper's base models (design §1) as their published config.json gives them, so that
# `mixcpt plan examples/paper/*.yaml` works with no hub access; a local or cached config wins.
_LLAMA3_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
_QWEN2_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "Qwen/Qwen2-7B": _QWEN2_7B,
    "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
}


# ---- the model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the base model's architecture."""

    params: int  # every parameter (tied embeddings once)
    layer_params: int  # one decoder layer's
    lora_params: int  # trainable with cfg.cpt.lora's adapters
    lora_per_layer: int  # adapted linear layers in one decoder layer
    lora_rank: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    source: str  # where its config came from


def _read_config(cfg: Config, run: RunDir | None):
    """(transformers config of the base model, where it came from). Order: the run's own base/
    folder (GGUF or demo conversions), the GGUF file, a local folder or the hub cache, mixcpt's
    copy for the paper's models, the hub."""
    from transformers import AutoConfig

    m, remote = cfg.model, cfg.model.trust_remote_code
    if run is not None and (run.base / "config.json").is_file():
        return AutoConfig.from_pretrained(run.base), f"{run.base}/config.json"
    if m.gguf_file:
        from mixcpt.gguf_model import resolve_gguf_path

        path = resolve_gguf_path(m.path, m.gguf_file)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), str(path)
    try:
        config = AutoConfig.from_pretrained(m.path, trust_remote_code=remote, local_files_only=True)
        return config, f"{m.path} (config.json)"
    except OSError:
        if m.path in KNOWN_CONFIGS:
            spec = dict(KNOWN_CONFIGS[m.path])
            return AutoConfig.for_model(spec.pop("model_type"), **spec), (
                f"{m.path} (mixcpt's copy of its config.json; not on this machine)"
            )
    try:
        return AutoConfig.from_pretrained(m.path, trust_remote_code=remote), f"{m.path} (hub)"
    except OSError as err:
        raise ConfigError(f"model.path: {m.path}: cannot read its config.json: {err}") from None


def _lora_targets(model: torch.nn.Module, targets) -> list[torch.nn.Linear]:
    """The linear layers PEFT adapts for `targets` ("all-linear": all but the output layer; else
    module names or their last parts)."""
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets):
            found.append(module)
    return found


def model_shape(cfg: Config, run: RunDir | None = None) -> ModelShape:
    """The base model's shape, from its config.json only: the model is built on the `meta`
    device (no memory, no weights read) to count its parameters and LoRA adapters exactly."""
    from transformers import AutoModelForCausalLM

    config, source = _read_config(cfg, run)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code
        )
    text = config.get_text_config()
    # the decoder layers: the module list as long as the config's layer count
    layers = next(
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers
    )
    layer = layers[0]
    lora = cfg.cpt.lora
    adapted = _lora_targets(model, lora.target_modules)
    in_layer = {id(m) for m in layer.modules()}
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        lora_params=sum(lora.r * (m.in_features + m.out_features) for m in adapted),
        lora_per_layer=sum(id(m) in in_layer for m in adapted),
        lora_rank=lora.r,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        source=source,
    )


# ---- the launch ---------------------------------------------------------------------------
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


# ---- one stage's memory ---------------------------------------------------------------------
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
    """Bytes per process (GPU) of one stage; `peak` is the step's largest moment (module
    docstring), not the sum of the parts."""

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
    process, by mode (module docstring; docs/distributed.md)."""
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
        autocast_copies = trained * compute if compute < 4 else 0  # module docstring
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
    full, checkpointed = _activations(shape, work, compute)
    acts = checkpointed if work.checkpointing else full
    if work.stage.startswith("cpt") or work.stage == "sft":  # SFT: `align.sft.SFTTrainer`
        loss = _chunked_loss(shape, work, launch, compute)
    else:  # DPO's log-probs (and a reference model's) at the response positions, at most all
        loss = (1 + work.frozen_models) * tokens * shape.vocab * LOGITS_BYTES
    other = gathered + context
    held = gradients if work.accumulation > 1 else 0  # module docstring
    peak = weights + frozen + optimizer + other + max(acts + loss + held, gradients)
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


# ---- tokens and disk --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    mix: int | None  # D_MIX, the Mix-CPT arm's stage-1 stream (None: cannot be told)
    domain: int | None  # D_K, the baseline's
    source: str


def _packed_tokens(folder: Path) -> int | None:
    meta = folder / "meta.json"
    return int(json.loads(meta.read_text())["n_tokens"]) if meta.is_file() else None


def _estimated_tokens(path: str) -> int | None:
    """Tokens of a local source from its size on disk; None for a hub dataset."""
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) // TEXT_BYTES_PER_TOKEN


def count_tokens(cfg: Config, run: RunDir | None = None) -> Tokens:
    """D_MIX's and D_K's tokens: the data stage's output when it exists, else D_MIX from
    data.total_tokens or estimated from the sources' sizes with the mixture's rule (the scarcest
    weighted source bounds D_MIX, or with `oversample` the most plentiful), and D_K as the domain
    sources' weight share of D_MIX (D_K is D_MIX's domain part, mixcpt.data.stage)."""
    if run is not None and (mix := _packed_tokens(run.data / "mix")) is not None:
        return Tokens(mix, _packed_tokens(run.data / "domain"), f"{run.data} (the data stage)")
    all_sources = (*cfg.data.domain, *cfg.data.instructions, *cfg.data.preferences)
    total_weight = sum(s.weight for s in all_sources)
    domain_share = sum(s.weight for s in cfg.data.domain) / total_weight
    if cfg.data.total_tokens:
        mix = cfg.data.total_tokens
        return Tokens(mix, int(mix * domain_share), "D_MIX from data.total_tokens")
    sources = [s for s in all_sources if s.weight]
    sizes = [_estimated_tokens(s.path) for s in sources]
    if None in sizes:
        return Tokens(None, None, "unknown: hub datasets and no data.total_tokens")
    bounds = [size * total_weight / s.weight for s, size in zip(sources, sizes)]
    mix = max(bounds) if cfg.data.oversample else min(bounds)
    estimated = f"estimated from file sizes, ~{TEXT_BYTES_PER_TOKEN} bytes per token"
    return Tokens(int(mix), int(mix * domain_share), estimated)


def teacher_cache_bytes(
    cfg: Config, shape: ModelShape, tokens: Tokens, run: RunDir | None = None
) -> int | None:
    """Bytes of the `cache` teacher's files (teacher_cache.cache_layout) for D_MIX: the files'
    sizes when the cache exists, 0 without a cache teacher, None when D_MIX's tokens are unknown."""
    if cfg.cpt.teacher != "cache" or cfg.cpt.lssd_weight == 0:
        return 0
    folder = run.root / "teacher_cache" if run is not None else None
    if folder is not None and (folder / "meta.json").is_file():
        return sum((folder / name).stat().st_size for name in CACHE_FILES)
    if tokens.mix is None:
        return None
    block = cfg.data.block_size
    layout = cache_layout(
        math.ceil(tokens.mix / block),
        block,
        min(cfg.cpt.cache_top_k, shape.vocab),
        cfg.cpt.cache_dtype,
    )
    return sum(np.dtype(dtype).itemsize * math.prod(dims) for dtype, dims in layout.values())


def checkpoint_bytes(shape: ModelShape, work: Workload, launch: Launch) -> int:
    """One Trainer checkpoint of a training stage: the trained weights (float32 masters; LoRA:
    the adapters only; DeepSpeed: the 16-bit module), the optimizer (AdamW's moments; DeepSpeed
    also its float32 masters) and each process's RNG state."""
    trained = shape.lora_params if work.lora else shape.params
    if launch.mode.startswith("zero"):
        weights, optimizer = trained * work.storage, trained * (MASTER + ADAM)
    else:
        weights, optimizer = trained * MASTER, trained * ADAM
    return weights + optimizer + RNG_STATE_BYTES * launch.processes


def model_folders(cfg: Config, shape: ModelShape) -> dict[str, int]:
    """Bytes of every model folder the run writes (weights in model.dtype): each arm's cpt, sft
    and dpo, and base/ for a GGUF model converted once per run."""
    size = shape.params * DTYPE_BYTES[cfg.model.dtype]
    folders = {
        f"{arm}/{stage}": size for stage in ("cpt", "sft", "dpo") for arm in stage_arms(cfg, stage)
    }
    if cfg.model.gguf_file:
        folders["base"] = size
    return folders


# ---- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Disk:
    """What the run writes, in bytes."""

    teacher_cache: int | None  # None: D_MIX's tokens cannot be told
    checkpoints: dict[str, int]  # training stage -> one checkpoint
    kept_checkpoints: int  # at most this many of a stage's exist at once (while rotating)
    folders: dict[str, int]  # model folder -> its size

    @property
    def total(self) -> int:
        """The most the run holds at once: the teacher cache, the largest stage's checkpoints
        (a stage deletes its own when done) and every model folder."""
        checkpoints = self.kept_checkpoints * max(self.checkpoints.values(), default=0)
        return (self.teacher_cache or 0) + checkpoints + sum(self.folders.values())


def disk_estimate(
    cfg: Config, shape: ModelShape, tokens: Tokens, launch: Launch, run: RunDir | None = None
) -> Disk:
    """The teacher cache, each training stage's checkpoint and the model folders of `cfg`."""
    checkpoints = {
        work.stage: checkpoint_bytes(shape, work, launch) for work in workloads(cfg) if work.train
    }
    save_limits = [cfg.cpt.training, cfg.sft.training, cfg.dpo.training]
    return Disk(
        teacher_cache=teacher_cache_bytes(cfg, shape, tokens, run),
        checkpoints=checkpoints,
        # transformers writes a new checkpoint before deleting the oldest of save_total_limit
        kept_checkpoints=max(t.save_total_limit for t in save_limits) + 1,
        folders=model_folders(cfg, shape),
    )


def disk_bytes(cfg: Config, run: RunDir | None = None) -> int:
    """The most bytes the run will hold on disk at once (`Disk.total`), for the launch the
    environment says (`detect_launch`); a teacher cache whose tokens cannot be told counts 0.
    Reads the model's config.json (as `model_shape`)."""
    shape, tokens = model_shape(cfg, run), count_tokens(cfg, run)
    return disk_estimate(cfg, shape, tokens, detect_launch(), run).total


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
def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


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

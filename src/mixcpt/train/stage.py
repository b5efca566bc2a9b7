"""The `cpt` stage: continual pre-training of one arm, resumable, written as a standard HF folder.

Each arm trains on its stream (`mix`: D_MIX in data/mix; `domain`: D_K in data/domain; `replay`:
D_R in data/replay) with its own cpt section (mixcpt.config.arms): "mixcpt" with cfg.cpt's losses
and teacher, "traditional" with plain cross-entropy on D_K and the same training settings, "lora"
with cfg.cpt's losses training LoRA adapters. An arm on D_K or D_R makes as many passes over it
as the same settings make over D_MIX (`domain_matched`), so every stream trains on the same domain
tokens: D_K is D_MIX's domain documents in D_MIX's order (mixcpt.data.stage), and D_R is D_K's
documents with replayed text among them (mixcpt.data.replay), so a pass over any of them holds
those documents once each. The domain tokens trained are recorded as `domain_tokens` in each arm's
metrics and under data/domain_tokens_trained in results.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from mixcpt.config import Config, CPTConfig, LoraSettings, TrainingConfig
from mixcpt.config.arms import find_arm, resolve_arms
from mixcpt.data.packing import IndexedBlocks, PackedBlocks
from mixcpt.errors import ConfigError, InputError
from mixcpt.fingerprints import begin
from mixcpt.models import DTYPES, load_tokenizer, model_from, vocab_size
from mixcpt.processes import process_state
from mixcpt.rundir import RunDir, base_model_path
from mixcpt.train.arguments import training_arguments
from mixcpt.train.forgetting_monitor import attach_forgetting_monitor, forgetting_monitor
from mixcpt.train.resumable import train_and_save, trained_samples
from mixcpt.train.teacher_cache import CachedTeacher, build_teacher_cache
from mixcpt.train.teachers import LoraTeacher, OnlineTeacher, Teacher
from mixcpt.train.trainer import LSSDTrainer, shards_parameters


def run_cpt(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """Train stage 1 of `arm` (one of the config's arms) and save `run.stage(arm, "cpt")`.

    Resumes from the last checkpoint in `run.work(arm, "cpt")`; skips (returning the recorded
    metrics) when the final folder was built from the same inputs, unless `force`. An arm whose
    cpt.teacher is lora trains LoRA adapters, merged into the weights before saving.
    Returns the metrics also written to results.json under stages/<arm>/cpt.
    """
    key, work = f"{arm}/cpt", run.work(arm, "cpt")
    record = begin(cfg, run, f"cpt/{arm}", force)
    if record is None:
        return run.recorded_metrics(key)
    this = find_arm(cfg, arm)
    cpt = this.config.cpt
    blocks = training_blocks(run, this.stream)
    processes = process_state().num_processes
    if this.stream in ("domain", "replay"):  # D_K's documents once a pass: match the passes
        cpt = domain_matched(cpt, run, processes)
    passes = passes_over(cpt.training, len(blocks), processes)
    per_pass = domain_tokens_per_pass(run)
    domain_tokens = None if per_pass is None else round(passes * per_pass)
    model, tokenizer = load_student(cfg, run, cpt)
    teacher = (
        load_teacher(cpt, model, blocks, run, cfg.model.dtype) if cpt.lssd_weight > 0 else None
    )
    trainer = cpt_trainer(cfg, cpt, model, tokenizer, blocks, teacher, work)

    def metrics_of(output) -> dict:
        metrics = {
            "train_loss": output.training_loss,
            "runtime_s": output.metrics["train_runtime"],
            "steps": trainer.state.global_step,
            "tokens": trained_tokens(trainer, blocks.block_size),
            "passes": passes,
            "domain_tokens": domain_tokens,
            "ce_weight": cpt.ce_weight,
            "lssd_weight": cpt.lssd_weight,
            "objective": cpt.objective if teacher is not None else None,
            "teacher": cpt.teacher if teacher is not None else None,
            "log_history": trainer.state.log_history,
        }
        if isinstance(teacher, CachedTeacher):
            metrics["teacher_cache_bytes_per_token"] = teacher.bytes_per_token
        monitor = forgetting_monitor(trainer)
        if monitor is not None:  # its cost, beside runtime_s
            metrics["kl_probe_s"] = round(monitor.seconds, 3)
        return metrics

    merge_lora = cpt.teacher == "lora"
    started = started_with(cfg, cpt, blocks, teacher)
    if trainer.is_world_process_zero():  # beside the mixture's shares, one entry per arm
        trained = run.read_results().get("data", {}).get("domain_tokens_trained", {})
        run.update_results("data", "domain_tokens_trained", {**trained, arm: domain_tokens})
    return train_and_save(
        trainer,
        tokenizer,
        run,
        key,
        metrics_of,
        merge_lora=merge_lora,
        record=record,
        started_with=started,
        dtype=cfg.model.dtype,
    )


def run_cache(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """`mixcpt cache`: build the `cache` teacher's files for D_MIX on their own (stage 1 builds
    them too, when missing), e.g. under a launch of their own before training's. Every process
    of a launch builds its share; an interrupted build resumes; `force` rebuilds from scratch.
    Returns {"blocks", "bytes_per_token"}, or {} when no arm's stage 1 uses the cache."""
    users = [
        arm
        for arm in resolve_arms(cfg)
        if arm.stream == "mix"
        and arm.config.cpt.teacher == "cache"
        and arm.config.cpt.lssd_weight > 0
    ]
    state = process_state()
    if not users:
        if state.is_main_process:
            print("mixcpt: cache: nothing to build (no arm's stage 1 uses cpt.teacher: cache)")
        return {}
    cpt = users[0].config.cpt  # the run has one cache: the first such arm's
    blocks = training_blocks(run, "mix")
    if force and state.is_main_process:
        shutil.rmtree(run.root / "teacher_cache", ignore_errors=True)
    state.wait_for_everyone()
    model, _ = load_student(cfg, run, cpt)
    teacher = load_teacher(cpt, model, blocks, run, cfg.model.dtype)
    return {"blocks": len(blocks), "bytes_per_token": teacher.bytes_per_token}


def started_with(
    cfg: Config, cpt: CPTConfig, blocks: PackedBlocks, teacher: Teacher | None
) -> dict:
    """What stage-1 checkpoints may only be resumed with (`train_and_save`): the arm's cpt
    settings, the seed, the model settings, the packed data's fingerprint, and the teacher: the
    cache's key (which holds a hash of the teacher's weights) for `cache`, else the base model of
    `model`."""
    return {
        "cpt": cpt.model_dump(mode="json"),
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "data": blocks.meta,
        "teacher": teacher.meta if isinstance(teacher, CachedTeacher) else cpt.teacher,
    }


def training_blocks(run: RunDir, stream_name: str) -> IndexedBlocks:
    """The packed stream an arm trains on: "mix" (D_MIX), "domain" (D_K) or "replay" (D_R)."""
    stream = run.data / stream_name
    if not (stream / "meta.json").is_file():
        raise InputError(stream, None, "packed training data missing; run the `data` stage first")
    blocks = IndexedBlocks(stream)
    if blocks.n_tokens == 0:
        raise InputError(
            stream, None, "holds no tokens: the domain sources have weight 0, so D_MIX drew none"
        )
    return blocks


def passes_over(training: TrainingConfig, n_blocks: int, processes: int) -> float:
    """Passes over a stream of `n_blocks` blocks that stage 1 makes with `training` on `processes`
    processes: num_epochs, or max_steps over the optimizer steps of one pass (as the Trainer counts
    them: batches per process, a short last one included, over gradient accumulation)."""
    if training.max_steps == -1:
        return training.num_epochs
    batches = math.ceil(n_blocks / (training.per_device_batch_size * processes))
    return training.max_steps / math.ceil(batches / training.gradient_accumulation_steps)


def domain_matched(cpt: CPTConfig, run: RunDir, processes: int) -> CPTConfig:
    """`cpt` with its budget set to as many passes over D_K (or D_R) as Mix-CPT's stage 1 (the same
    cpt.training) makes over D_MIX: max_steps -1 and num_epochs those passes. A pass over D_K, or
    over D_R (D_K's documents with replayed text among them, whatever `data.replay_share`), holds
    exactly the domain tokens of a pass over D_MIX, so the arms train on the same domain tokens:
    exactly when Mix-CPT trains whole passes (num_epochs, or max_steps a multiple of its steps
    per pass), else up to the blocks each arm's Trainer samples for its last, partial pass."""
    passes = passes_over(cpt.training, len(IndexedBlocks(run.data / "mix")), processes)
    training = cpt.training.model_copy(update={"max_steps": -1, "num_epochs": passes})
    return cpt.model_copy(update={"training": training})


def domain_tokens_per_pass(run: RunDir) -> int | None:
    """The domain tokens of one pass over D_MIX, which are those of one pass over D_K; None when
    the run folder has no D_K (a D_MIX packed by other means than the data stage)."""
    meta = run.data / "domain" / "meta.json"
    return json.loads(meta.read_text())["n_tokens"] if meta.is_file() else None


def load_student(
    cfg: Config, run: RunDir, cpt: CPTConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model to train and its tokenizer (that it fits the model's embedding table is one
    of mixcpt.checks). The model is in float32 (`model_from`), or for `teacher: lora` stays frozen
    in `model.dtype` and is wrapped with LoRA adapters, which PEFT keeps in float32."""
    base = base_model_path(cfg.model, run.base)
    tokenizer = load_tokenizer(cfg.model.tokenizer or base, cfg.model.trust_remote_code)
    model = model_from(cfg.model, base, trained=cpt.teacher != "lora")
    model.config.use_cache = False
    if cpt.teacher == "lora":
        model = with_lora(model, cpt.lora)
    return model, tokenizer


def with_lora(model: PreTrainedModel, lora: LoraSettings) -> torch.nn.Module:
    """The model wrapped with trainable PEFT LoRA adapters (the base frozen)."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_teacher(
    cpt: CPTConfig, model: torch.nn.Module, blocks: PackedBlocks, run: RunDir, dtype: str
) -> Teacher:
    """The teacher `cpt.teacher` names, for the student `model` before any training step; the
    `online` copy is stored in `dtype` (`model.dtype`). Under a launcher every process builds
    its share of the `cache` teacher's files (`build_teacher_cache`)."""
    model.to(process_state().device)
    if cpt.teacher == "online":
        return OnlineTeacher(model, vocab_size(model), DTYPES[dtype])
    if cpt.teacher == "lora":
        return LoraTeacher(model)
    return build_teacher_cache(
        model,
        blocks,
        run.root / "teacher_cache",
        cpt.cache_top_k,
        cpt.temperature,
        cpt.training.per_device_batch_size,
        cpt.cache_dtype,
        cpt.loss_chunk_size,
        replace_stale=True,  # a cache of other data, teacher or k: this rebuild replaces it
    )


def cpt_trainer(
    cfg: Config,
    cpt: CPTConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    blocks: PackedBlocks,
    teacher: Teacher | None,
    work: Path,
) -> LSSDTrainer:
    """The stage-1 Trainer, checkpointing into `work`; refuses LoRA under sharded weights (as
    mixcpt.checks does before any stage runs, from the launcher's environment: this catches a
    sharding set up some other way). Without a teacher it logs `kl_to_base` on the probe
    (mixcpt.train.forgetting_monitor)."""
    args = training_arguments(
        cpt.training, work, cfg.seed, cfg.model.dtype, remove_unused_columns=False
    )
    trainer = LSSDTrainer(
        model=model,
        args=args,
        train_dataset=blocks,
        processing_class=tokenizer,
        teacher=teacher,
        ce_weight=cpt.ce_weight,
        lssd_weight=cpt.lssd_weight,
        temperature=cpt.temperature,
        objective=cpt.objective,
        mft_threshold=cpt.mft_threshold,
        loss_chunk_size=cpt.loss_chunk_size,
        compile_loss=cpt.compile_loss,
        on_nonfinite=cpt.training.on_nonfinite,
    )
    if cpt.teacher == "lora" and shards_parameters(trainer):
        raise ConfigError(
            "cpt.teacher: lora is not supported under FSDP or DeepSpeed ZeRO-3 (the adapters "
            "cannot be merged into sharded weights); use DDP or ZeRO-2, or teacher: cache"
        )
    if teacher is None:
        ev = cfg.eval
        attach_forgetting_monitor(
            trainer, ev.probe, ev.max_length, ev.batch_size, cpt.loss_chunk_size, work
        )
    return trainer


def trained_tokens(trainer: Trainer, block_size: int) -> int:
    """Tokens seen by the optimizer steps taken (padding included), over every process."""
    return trained_samples(trainer) * block_size

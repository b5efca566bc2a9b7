"""The `cpt` stage: continual pre-training of one arm, resumable, written as a standard HF folder.

arm "mixcpt":   D_MIX (data/mix) with cfg.cpt's losses and teacher
arm "baseline": D_K (data/domain) with plain cross-entropy, same training settings and steps
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

from mixcpt.config import Config, CPTConfig, LoraSettings
from mixcpt.data.packing import IndexedBlocks, PackedBlocks
from mixcpt.errors import ConfigError, InputError
from mixcpt.fingerprints import begin
from mixcpt.models import DTYPES, load_tokenizer, model_from, vocab_size
from mixcpt.pipeline import arm_cpt_config
from mixcpt.processes import process_state
from mixcpt.rundir import RunDir, base_model_path
from mixcpt.train.arguments import training_arguments
from mixcpt.train.resumable import train_and_save, trained_samples
from mixcpt.train.teacher_cache import CachedTeacher, build_teacher_cache
from mixcpt.train.teachers import LoraTeacher, OnlineTeacher, Teacher
from mixcpt.train.trainer import LSSDTrainer, shards_parameters


def run_cpt(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """Train stage 1 of `arm` ("mixcpt" or "baseline") and save `run.stage(arm, "cpt")`.

    Resumes from the last checkpoint in `run.work(arm, "cpt")`; skips (returning the recorded
    metrics) when the final folder was built from the same inputs, unless `force`. With
    `cpt.teacher: lora` both arms train LoRA adapters, merged into the weights before saving.
    Returns the metrics also written to results.json under stages/<arm>/cpt.
    """
    key, final, work = f"{arm}/cpt", run.stage(arm, "cpt"), run.work(arm, "cpt")
    record = begin(cfg, run, f"cpt/{arm}", force)
    if record is None:
        return run.recorded_metrics(key)
    cpt = arm_cpt_config(cfg, arm)
    blocks = training_blocks(run, arm)
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
            "ce_weight": cpt.ce_weight,
            "lssd_weight": cpt.lssd_weight,
            "teacher": cpt.teacher if teacher is not None else None,
            "log_history": trainer.state.log_history,
        }
        if isinstance(teacher, CachedTeacher):
            metrics["teacher_cache_bytes_per_token"] = teacher.bytes_per_token
        return metrics

    merge_lora = cpt.teacher == "lora"
    started = started_with(cfg, cpt, blocks, teacher)
    return train_and_save(
        trainer,
        tokenizer,
        final,
        work,
        run,
        key,
        metrics_of,
        merge_lora,
        record,
        started,
        dtype=cfg.model.dtype,
    )


def run_cache(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """`mixcpt cache`: build the `cache` teacher's files for D_MIX on their own (stage 1 builds
    them too, when missing), e.g. under a launch of their own before training's. Every process
    of a launch builds its share; an interrupted build resumes; `force` rebuilds from scratch.
    Returns {"blocks", "bytes_per_token"}, or {} when stage 1 uses no cache."""
    cpt = arm_cpt_config(cfg, "mixcpt")
    if cpt.teacher != "cache" or cpt.lssd_weight == 0:
        if process_state().is_main_process:
            print("mixcpt: cache: nothing to build (stage 1 uses no cache: cpt.teacher)")
        return {}
    blocks = training_blocks(run, "mixcpt")
    state = process_state()
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


def training_blocks(run: RunDir, arm: str) -> IndexedBlocks:
    """The packed stream `arm` trains on: D_MIX for Mix-CPT, D_K for the baseline."""
    stream = run.data / ("mix" if arm == "mixcpt" else "domain")
    if not (stream / "meta.json").is_file():
        raise InputError(stream, None, "packed training data missing; run the `data` stage first")
    return IndexedBlocks(stream)


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
    sharding set up some other way)."""
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
        loss_chunk_size=cpt.loss_chunk_size,
        compile_loss=cpt.compile_loss,
        on_nonfinite=cpt.training.on_nonfinite,
    )
    if cpt.teacher == "lora" and shards_parameters(trainer):
        raise ConfigError(
            "cpt.teacher: lora is not supported under FSDP or DeepSpeed ZeRO-3 (the adapters "
            "cannot be merged into sharded weights); use DDP or ZeRO-2, or teacher: cache"
        )
    return trainer


def trained_tokens(trainer: Trainer, block_size: int) -> int:
    """Tokens seen by the optimizer steps taken (padding included), over every process."""
    return trained_samples(trainer) * block_size

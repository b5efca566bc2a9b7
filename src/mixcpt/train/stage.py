"""The `cpt` stage: continual pre-training of one arm, resumable, written as a standard HF folder.

arm "mixcpt":   D_MIX (data/mix) with cfg.cpt's losses and teacher
arm "baseline": D_K (data/domain) with plain cross-entropy, same training settings and steps
"""

from __future__ import annotations

import shutil

from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase, Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from mixcpt.config import Config, CPTConfig, LoraSettings
from mixcpt.errors import ConfigError, InputError
from mixcpt.models import base_model_path, load_model, load_tokenizer
from mixcpt.rundir import RunDir, atomic_dir, last_complete_checkpoint
from mixcpt.teachers import IndexedBlocks, make_teacher, vocab_size
from mixcpt.train.arguments import training_arguments
from mixcpt.train.trainer import LSSDTrainer


def with_lora(model, lora: LoraSettings):
    """The model wrapped with trainable PEFT LoRA adapters (the base frozen)."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def arm_cpt_config(cfg: Config, arm: str) -> CPTConfig:
    """cfg.cpt for "mixcpt"; for "baseline" the same settings with plain CE and no teacher."""
    if arm == "mixcpt":
        return cfg.cpt
    return cfg.cpt.model_copy(update={"ce_weight": 1.0, "lssd_weight": 0.0})


def shards_parameters(trainer: Trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no process holds the whole model."""
    return trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled()


def save_trained_model(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, final, merge_lora: bool = False
) -> None:
    """Write the trained model (safetensors) and tokenizer to `final` atomically. Call on EVERY process.

    The weights are gathered into one full state dict first (a collective under FSDP and ZeRO-3,
    where each process holds a shard; a plain `state_dict()` otherwise), then the main process
    writes them. `merge_lora` folds PEFT adapters into the weights (DDP/ZeRO-2 only: there each
    process holds the whole model).
    """
    state_dict = None if merge_lora else trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if merge_lora:
            trained = trained.merge_and_unload()  # a plain model folder, loadable without PEFT
        trained.config.use_cache = True  # for whoever generates with the saved model
        with atomic_dir(final) as tmp:
            trained.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    trainer.accelerator.wait_for_everyone()


def run_cpt(cfg: Config, run: RunDir, arm: str) -> dict:
    """Train stage 1 of `arm` ("mixcpt" or "baseline") and save `run.stage(arm, "cpt")`.

    Resumes from the last checkpoint in `run.work(arm, "cpt")`; skips (returning the recorded
    metrics) when the final folder exists. With `cpt.teacher: lora` both arms train LoRA adapters,
    merged into the weights before saving. Returns the metrics also written to results.json under
    stages/<arm>/cpt.
    """
    final, work = run.stage(arm, "cpt"), run.work(arm, "cpt")
    if final.exists():
        return run.read_results().get("stages", {}).get(f"{arm}/cpt", {})
    cpt = arm_cpt_config(cfg, arm)
    stream = run.data / ("mix" if arm == "mixcpt" else "domain")
    if not (stream / "meta.json").is_file():
        raise InputError(stream, None, "packed training data missing; run the `data` stage first")
    blocks = IndexedBlocks(stream)

    base = base_model_path(cfg.model, run.base)
    tokenizer = load_tokenizer(cfg.model.tokenizer or base, cfg.model.trust_remote_code)
    model = load_model(
        base, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation
    )
    model.config.use_cache = False
    if len(tokenizer) > vocab_size(
        model
    ):  # token ids past the embedding table would crash mid-training
        raise ConfigError(
            f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model {base} only "
            f"{vocab_size(model)} embeddings; use the model's own tokenizer"
        )
    if cpt.teacher == "lora":
        model = with_lora(model, cpt.lora)

    teacher = None
    if cpt.lssd_weight > 0:
        state = PartialState()
        with (
            state.main_process_first()
        ):  # the main process builds a teacher cache, the others read it
            model.to(state.device)
            teacher = make_teacher(
                cpt, model, blocks, run.root / "teacher_cache", cpt.training.per_device_batch_size
            )

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
        on_nonfinite=cpt.training.on_nonfinite,
    )
    if cpt.teacher == "lora" and shards_parameters(trainer):
        raise ConfigError(
            "cpt.teacher: lora is not supported under FSDP or DeepSpeed ZeRO-3 (the adapters cannot "
            "be merged into sharded weights); use DDP or ZeRO-2, or teacher: cache"
        )
    resume = last_complete_checkpoint(work)
    output = trainer.train(resume_from_checkpoint=resume)

    metrics = {
        "train_loss": output.training_loss,
        "runtime_s": output.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step
        * args.train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size
        * blocks.block_size,
        "ce_weight": cpt.ce_weight,
        "lssd_weight": cpt.lssd_weight,
        "teacher": cpt.teacher if cpt.lssd_weight > 0 else None,
        "resumed_from": resume,
        "log_history": trainer.state.log_history,
    }
    if cpt.lssd_weight > 0 and cpt.teacher == "cache":
        metrics["teacher_cache_bytes_per_token"] = teacher.bytes_per_token
    # Metrics first, folder second: a process killed between the two leaves no folder, so the stage
    # reruns (from its last checkpoint); the other order could leave a finished stage without metrics.
    if trainer.is_world_process_zero():
        run.update_results("stages", f"{arm}/cpt", metrics)
    save_trained_model(trainer, tokenizer, final, merge_lora=cpt.teacher == "lora")
    if trainer.is_world_process_zero():
        shutil.rmtree(work, ignore_errors=True)
    return metrics

"""The `cpt` stage: continual pre-training of one arm, resumable, written as a standard HF folder.

    arm "mixcpt":   D_MIX (data/mix) with cfg.cpt's losses and teacher
    arm "baseline": D_K (data/domain) with plain cross-entropy, same training settings and steps
"""

from __future__ import annotations

import shutil

from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from transformers.trainer_utils import get_last_checkpoint

from mixcpt.config import Config, CPTConfig, LoraSettings
from mixcpt.models import base_model_path, load_model, load_tokenizer, save_model
from mixcpt.rundir import RunDir, atomic_dir
from mixcpt.teachers import IndexedBlocks, make_teacher
from mixcpt.train.arguments import training_arguments
from mixcpt.train.trainer import LSSDTrainer


def with_lora(model, lora: LoraSettings):
    """The model wrapped with trainable PEFT LoRA adapters (the base frozen)."""
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def arm_cpt_config(cfg: Config, arm: str) -> CPTConfig:
    """cfg.cpt for "mixcpt"; for "baseline" the same settings with plain CE and no teacher."""
    if arm == "mixcpt":
        return cfg.cpt
    return cfg.cpt.model_copy(update={"ce_weight": 1.0, "lssd_weight": 0.0})


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
    blocks = IndexedBlocks(run.data / ("mix" if arm == "mixcpt" else "domain"))

    base = base_model_path(cfg.model, run.base)
    tokenizer = load_tokenizer(cfg.model.tokenizer or base, cfg.model.trust_remote_code)
    model = load_model(base, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    model.config.use_cache = False
    if cpt.teacher == "lora":
        model = with_lora(model, cpt.lora)

    teacher = None
    if cpt.lssd_weight > 0:
        state = PartialState()
        with state.main_process_first():  # the main process builds a teacher cache, the others read it
            model.to(state.device)
            teacher = make_teacher(cpt, model, blocks, run.root / "teacher_cache",
                                   cpt.training.per_device_batch_size)

    args = training_arguments(cpt.training, work, cfg.seed, cfg.model.dtype, remove_unused_columns=False)
    trainer = LSSDTrainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer, teacher=teacher,
                          ce_weight=cpt.ce_weight, lssd_weight=cpt.lssd_weight, temperature=cpt.temperature,
                          loss_chunk_size=cpt.loss_chunk_size, on_nonfinite=cpt.training.on_nonfinite)
    resume = get_last_checkpoint(str(work)) if work.exists() else None
    output = trainer.train(resume_from_checkpoint=resume)

    metrics = {
        "train_loss": output.training_loss,
        "runtime_s": output.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "tokens": trainer.state.global_step * args.train_batch_size * args.gradient_accumulation_steps
        * args.world_size * blocks.block_size,
        "ce_weight": cpt.ce_weight,
        "lssd_weight": cpt.lssd_weight,
        "teacher": cpt.teacher if cpt.lssd_weight > 0 else None,
        "resumed_from": resume,
        "log_history": trainer.state.log_history,
    }
    if cpt.lssd_weight > 0 and cpt.teacher == "cache":
        metrics["teacher_cache_bytes_per_token"] = teacher.bytes_per_token
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if cpt.teacher == "lora":
        trained = trained.merge_and_unload()  # a plain model folder, loadable without PEFT
    trained.config.use_cache = True  # for whoever generates with the saved model
    if trainer.is_world_process_zero():
        with atomic_dir(final) as tmp:
            save_model(trained, tokenizer, tmp)
        run.update_results("stages", f"{arm}/cpt", metrics)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return metrics

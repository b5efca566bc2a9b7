"""From our `TrainingConfig` to `transformers.TrainingArguments`, shared by every training stage."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments

from mixcpt.config import TrainingConfig
from mixcpt.errors import ConfigError
from mixcpt.processes import on_cpu_only


def training_arguments(
    tc: TrainingConfig, output_dir: str | Path, seed: int, dtype: str = "float32", **overrides
) -> TrainingArguments:
    """TrainingArguments for one stage: checkpoints under `output_dir`, deterministic data order
    for `seed` (so a resumed run neither replays nor skips), `tc`'s settings, then the
    TrainingArguments fields `tc` passes through (`TrainingConfig`), then `overrides`, the stage's
    own settings (e.g. remove_unused_columns).

    Raises ConfigError when TrainingArguments refuses the settings (an unknown optimizer name,
    for one).
    """
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=tc.weight_decay,
        max_steps=tc.max_steps,
        num_train_epochs=tc.num_epochs,
        per_device_train_batch_size=tc.per_device_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        max_grad_norm=tc.max_grad_norm,
        logging_steps=tc.logging_steps,
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
        activation_checkpointing=tc.gradient_checkpointing,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        seed=seed,
        data_seed=seed,
        report_to=tc.report_to,
        dataloader_num_workers=0,
        # pinning warns and does nothing on the CPU
        dataloader_pin_memory=torch.cuda.is_available(),
        # On a machine with no accelerator, accelerate joins a torchrun/accelerate launch only when
        # told the run is on the CPU; without this each process would silently train alone (gloo
        # DDP). The same rule as the stages' shared state (mixcpt.processes).
        use_cpu=on_cpu_only(),
        # Every trainable parameter takes part in every step's loss (a skipped non-finite batch
        # touches them all too), so DDP need not walk the graph each step looking for unused ones,
        # which Trainer's default asks for whenever gradient checkpointing is off. A config that
        # trains a model with unused parameters sets it back under training:.
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    try:
        return TrainingArguments(**{**kwargs, **tc.model_extra, **overrides})
    except ValueError as err:  # the passthrough keys' values are checked here, not in the config
        reason = " ".join(str(err).split())
        raise ConfigError(f"training: TrainingArguments refused the settings: {reason}") from None

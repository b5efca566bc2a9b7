"""Training settings and stage 1 (`cpt:`); `TrainingConfig` also serves SFT and DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mixcpt.config.base import Strict


class TrainingConfig(Strict):
    """Hyper-parameters handed to `transformers.TrainingArguments`."""

    learning_rate: float = Field(
        2e-5,
        gt=0,
        description="Peak learning rate of the optimizer (TrainingArguments.learning_rate, "
        "AdamW by default). About 1e-5 to 5e-5 for full fine-tuning, 1e-4 for LoRA, 5e-7 for DPO.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine",
        description="Learning-rate schedule (TrainingArguments.lr_scheduler_type): linear or "
        "cosine decay to 0 after warm-up, or constant; constant ignores warmup_ratio, "
        "constant_with_warmup does not.",
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the steps spent warming up linearly from 0, in [0, 1) (passed as "
        "TrainingArguments.warmup_steps, which reads a float below 1 as a ratio).",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled weight decay (TrainingArguments.weight_decay; biases and norm "
        "weights are exempt). 0 turns it off; 0.01 to 0.1 is common.",
    )
    max_steps: int = Field(
        -1,
        ge=-1,
        description="Optimizer steps (TrainingArguments.max_steps); -1 uses num_epochs, a "
        "positive value overrides it.",
    )
    num_epochs: float = Field(
        1.0,
        gt=0,
        description="Passes over the stage's training data when max_steps is -1 "
        "(TrainingArguments.num_train_epochs); fractions are allowed.",
    )
    per_device_batch_size: int = Field(
        8,
        ge=1,
        description="Items per device and micro-batch (TrainingArguments."
        "per_device_train_batch_size): blocks in cpt (and the teacher cache), samples in sft, "
        "pairs in dpo (and the reference precompute).",
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step (TrainingArguments."
        "gradient_accumulation_steps); effective batch = per_device_batch_size x this x processes.",
    )
    max_grad_norm: float = Field(
        1.0,
        ge=0,
        description="Clip the gradient's global L2 norm to this before each step "
        "(TrainingArguments.max_grad_norm); 0 disables clipping.",
    )
    logging_steps: int = Field(
        10,
        ge=1,
        description="Log the loss and the stage's metrics every this many optimizer steps "
        "(TrainingArguments.logging_steps), into results.json's log history and TensorBoard.",
    )
    save_steps: int = Field(
        500,
        ge=1,
        description="Write a checkpoint every this many optimizer steps (TrainingArguments."
        "save_steps); an interrupted stage resumes from the last complete one.",
    )
    save_total_limit: int = Field(
        2,
        ge=1,
        description="Most checkpoints kept at a time (TrainingArguments.save_total_limit); older "
        "ones are deleted, and all once the stage is saved.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of keeping them "
        "(TrainingArguments.activation_checkpointing): far less memory, about 20-30% slower.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss stops the run (last checkpoint intact) or skips the batch "
        "(zero gradient). Read by the cpt stage only; SFT and DPO ignore it.",
    )


class LoraSettings(Strict):
    r: int = Field(
        16,
        ge=1,
        description="Rank of each LoRA update (peft.LoraConfig.r); trainable parameters grow "
        "linearly with it. 8 to 64 is common.",
    )
    alpha: int = Field(
        32,
        ge=1,
        description="LoRA scaling (peft.LoraConfig.lora_alpha): updates are scaled by alpha / r. "
        "Commonly 2 x r.",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout probability on the LoRA branch's input in training "
        "(peft.LoraConfig.lora_dropout), in [0, 1); 0 disables it.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules given adapters (peft.LoraConfig.target_modules): all-linear for "
        "every linear layer but the output layer, or names or suffixes, e.g. [q_proj, v_proj].",
    )


class CPTConfig(Strict):
    """Stage 1: knowledge-mixture continual pre-training, loss = ce_weight*CE + lssd_weight*LSSD."""

    ce_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of next-token cross-entropy (the baseline arm always uses 1).",
    )
    lssd_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of logit swap self-distillation (0: plain CPT, no teacher; the "
        "baseline arm always uses 0).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of the LSSD target and student (cross-entropy stays "
        "at 1); part of the cache teacher's key.",
    )
    teacher: Literal["online", "lora", "cache"] = Field(
        "online",
        description="online: frozen copy of the base; lora: base with adapters disabled (stage 1 "
        "then trains LoRA adapters only, see `lora`); cache: precomputed top-k teacher logits on "
        "disk.",
    )
    cache_top_k: int = Field(
        64,
        ge=1,
        description="Teacher logits kept per position by the cache teacher (at most the "
        "vocabulary; the rest is one tail bucket). Disk grows with k; k >= vocabulary is exact.",
    )
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="Storage of the cached top-k log-probabilities (float32: exact when "
        "k >= vocabulary).",
    )
    loss_chunk_size: int = Field(
        256,
        ge=1,
        description=(
            "Positions per chunk of the vocabulary-wide loss (and of the teacher cache's top-k). "
            "The loss holds about five float32 [chunk, vocabulary] tensors at a time. 256 was "
            "fastest on CPU; on a GPU larger chunks (1024-4096) launch fewer kernels."
        ),
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="Used when teacher is lora: stage 1 of both arms then trains these adapters "
        "instead of the full model and merges them into the weights when saving.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Training settings of stage 1, shared by both arms.",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> CPTConfig:
        if self.ce_weight == 0 and self.lssd_weight == 0:
            raise ValueError("ce_weight and lssd_weight are both 0; nothing would be trained")
        return self

"""Training settings and stage 1 (`cpt:`); `TrainingConfig` also serves SFT and DPO."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from typing import Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mixcpt.config.base import Strict

# TrainingArguments fields that mixcpt sets itself, and what decides them instead.
OWNED = {
    "output_dir": "the run folder (--output) decides where checkpoints go",
    "seed": "set by the top-level `seed`",
    "data_seed": "set by the top-level `seed`",
    "bf16": "follows model.dtype",
    "fp16": "follows model.dtype",
    "remove_unused_columns": "set by each stage for its own data collator",
    "use_cpu": "follows the machine (hide the GPUs with CUDA_VISIBLE_DEVICES= to train on the CPU)",
    "resume_from_checkpoint": "a stage resumes from its last complete checkpoint by itself",
    # gone from TrainingArguments in transformers 5, but still what people reach for
    "logging_dir": "TensorBoard logs go to DIR/logs/<arm>/<stage>/",
    # each would break a promise of the run folder
    "save_only_model": "a stage resumes from its last checkpoint, which must hold the optimizer "
    "and scheduler state (bound the disk with save_total_limit)",
    "push_to_hub": "a run never reaches the network; upload a finished model folder "
    "(DIR/<arm>/<stage>) with `hf upload`",
    "eval_strategy": "models are evaluated by the eval stage (eval:), not inside training",
    "load_best_model_at_end": "models are evaluated by the eval stage (eval:), not inside training",
}
# TrainingArguments fields that TrainingConfig declares under another name.
RENAMED = {
    "lr_scheduler_type": "lr_scheduler",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "per_device_batch_size",
    "activation_checkpointing": "gradient_checkpointing",
}
# Keys of `training:` that change what is logged and where, never what is trained: changing one
# neither makes a stage stale (mixcpt.stage_inputs) nor stops a resume (mixcpt.train.resumable).
LOGGING_KEYS = frozenset(
    ("report_to", "logging_steps", "logging_strategy", "logging_first_step", "run_name")
    + ("logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node")
    + ("disable_tqdm", "include_num_input_tokens_seen", "project")
)


@functools.cache
def _training_argument_types() -> dict[str, Any]:
    """{field: type} of the installed `transformers.TrainingArguments`. Imported on first use
    only: transformers brings torch, which `mixcpt status` never needs for a config without
    passthrough keys."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init}


def _type_name(annotation: Any) -> str:
    """`float`, `str | None`, `OptimizerNames | str`: an annotation without module prefixes."""
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(annotation))


def _error(key: str, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("training_argument", message), loc=(key,), input=value
    )


def _check_passthrough(declared: typing.Iterable[str], given: dict[str, Any]) -> dict[str, Any]:
    """`given` (keys of `training:` that TrainingConfig does not declare) checked against the
    installed TrainingArguments and converted to its field types; `declared` (TrainingConfig's own
    keys) are among the names suggested for a misspelt key. Raises a ValidationError with
    one error per bad key: unknown (naming the closest valid keys), owned by mixcpt (naming what
    decides it), renamed (naming mixcpt's key) or of the wrong type."""
    types = _training_argument_types()
    valid = sorted({*declared, *(set(types) - set(OWNED) - set(RENAMED))})
    out, errors = {}, []
    for key, value in given.items():
        if key in OWNED:
            errors.append(_error(key, f"not settable here: {OWNED[key]}", value))
        elif key in RENAMED:
            errors.append(_error(key, f"mixcpt names this key {RENAMED[key]}", value))
        elif key not in types:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            message = f"unknown key (not a TrainingArguments field either){hint}"
            errors.append(_error(key, message, value))
        else:
            try:
                out[key] = TypeAdapter(types[key]).validate_python(value)
            except ValidationError:
                expected = f"expected {_type_name(types[key])} (TrainingArguments.{key})"
                errors.append(_error(key, f"{expected}, got {value!r}", value))
    if errors:
        raise ValidationError.from_exception_data("TrainingConfig", errors)
    return out


class TrainingConfig(Strict):
    """Hyper-parameters handed to `transformers.TrainingArguments`.

    The keys declared here are mixcpt's, with its names and defaults (`lr_scheduler` is
    TrainingArguments.lr_scheduler_type, `num_epochs` num_train_epochs, `per_device_batch_size`
    per_device_train_batch_size, `gradient_checkpointing` activation_checkpointing). Any other
    TrainingArguments field (optim, adam_beta2, ddp_timeout, torch_compile, warmup_steps, ...) may
    be given too and is passed through as it is: its name and type are checked against the
    installed TrainingArguments, which documents it (its field's `help`). Fields that mixcpt sets
    itself (`OWNED`) are refused, naming what decides them; those renamed here (`RENAMED`) are
    refused, naming mixcpt's key.
    """

    model_config = ConfigDict(extra="allow")

    learning_rate: float = Field(
        2e-5,
        gt=0,
        description="Peak learning rate of the optimizer (TrainingArguments.learning_rate, "
        "AdamW by default). About 1e-5 to 5e-5 for full fine-tuning, 1e-4 for LoRA, 5e-7 for DPO.",
    )
    lr_scheduler: Literal[
        "linear",
        "cosine",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "cosine_with_min_lr",
        "cosine_warmup_with_min_lr",
        "polynomial",
        "inverse_sqrt",
        "warmup_stable_decay",
    ] = Field(
        "cosine",
        description="Learning-rate schedule (TrainingArguments.lr_scheduler_type): linear or "
        "cosine decay to 0 after warm-up, or constant; constant ignores warmup_ratio, "
        "constant_with_warmup does not. The others take arguments from lr_scheduler_kwargs "
        "(e.g. {min_lr_rate: 0.1} for cosine_with_min_lr).",
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the steps spent warming up linearly from 0, in [0, 1) (passed as "
        "TrainingArguments.warmup_steps, which reads a float below 1 as a ratio). For a number "
        "of steps give warmup_steps instead (not both).",
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
    report_to: str | list[str] = Field(
        "tensorboard",
        description="Where the loss terms, learning rate and gradient norm are logged "
        "(TrainingArguments.report_to): tensorboard (event files in DIR/logs/<arm>/<stage>/, "
        "`tensorboard --logdir DIR`), wandb, mlflow, ..., a list of them, or none.",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A non-finite loss stops the run (last checkpoint intact) or skips the batch "
        "(zero gradient). Read by the cpt stage only; SFT and DPO ignore it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _passthrough(cls, data: Any) -> Any:
        """The mapping given, its keys not declared here checked and converted
        (`_check_passthrough`)."""
        if not isinstance(data, dict):
            return data
        if "warmup_steps" in data and "warmup_ratio" in data:  # both would set warmup_steps
            error = _error("warmup_steps", "give warmup_ratio or warmup_steps, not both", None)
            raise ValidationError.from_exception_data(cls.__name__, [error])
        extra = {k: v for k, v in data.items() if k not in cls.model_fields}
        return {**data, **_check_passthrough(cls.model_fields, extra)} if extra else data


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
    """Stage 1: knowledge-mixture continual pre-training, loss = ce_weight*CE + lssd_weight*D, D the
    distillation term `objective` names (LSSD by default).

    `alpha` is the paper's parameterisation of the same loss, alpha*NTP + (1 - alpha)*LSSD: when
    given, it sets the two weights (so the rest of mixcpt only ever reads them), and giving it
    with either weight is an error."""

    ce_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of next-token cross-entropy (the traditional, mixture-ce and replay "
        "arms use 1). Exclusive with alpha.",
    )
    lssd_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the distillation term `objective` names (logit swap "
        "self-distillation by default; 0: plain CPT, no teacher; the traditional, mixture-ce and "
        "replay arms use 0). Exclusive with alpha.",
    )
    objective: Literal["lssd", "kl", "mft"] = Field(
        "lssd",
        description="The distillation term's target, from the frozen base as teacher (design §1): "
        "lssd (the paper's logit swap: the label and the teacher's top-1 exchange logits), kl "
        "(plain distillation to the teacher, uncorrected) or mft (Minifinetuning, arXiv "
        "2506.15702: the label's one-hot mixed in so it leads the teacher's top-1 by "
        "mft_threshold).",
    )
    mft_threshold: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Minifinetuning's margin tau in (0, 1], used when objective is mft: the "
        "target puts the label tau above the teacher's top-1 (or lifts it by tau, capped at 1, "
        "where the top-1 is the label).",
    )
    alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="The paper's form of the loss, alpha*NTP + (1 - alpha)*LSSD (its value is not "
        "public): sets ce_weight = alpha and lssd_weight = 1 - alpha, so alpha 0.5 trains as "
        "ce_weight = lssd_weight = 0.5 and alpha 1 is plain CPT with no teacher. Exclusive with "
        "ce_weight and lssd_weight (a weight given beside it must be the one it sets); unset (the "
        "default) uses those two. The traditional, mixture-ce and replay arms ignore it (plain "
        "CE).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of the distillation target and student, and of "
        "kl_to_base (cross-entropy stays at 1); part of the cache teacher's key.",
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
    compile_loss: bool = Field(
        False,
        description="Run the vocabulary-wide loss's per-chunk work through torch.compile, which "
        "fuses its passes over [chunk, vocabulary] (on a GPU, a few kernels instead of one per "
        "operation); the first steps pay for compiling. On the CPU the fused C kernel is usually "
        "faster. The model itself compiles with training.torch_compile: true.",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="Used when teacher is lora: stage 1 of every arm then trains these adapters "
        "instead of the full model and merges them into the weights when saving.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Training settings of stage 1, every arm's unless it overrides them.",
    )

    @model_validator(mode="before")
    @classmethod
    def _alpha_sets_the_weights(cls, data: Any) -> Any:
        alpha = data.get("alpha") if isinstance(data, dict) else None
        if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):  # else the field says why
            return data
        implied = {"ce_weight": alpha, "lssd_weight": 1 - alpha}
        # A weight beside alpha is refused unless it is the one alpha sets, so that a dumped config
        # (which lists all three) loads back.
        clashing = [k for k, v in implied.items() if k in data and data[k] != v]
        if clashing:
            raise ValueError(
                f"alpha and {' and '.join(clashing)} are exclusive: give alpha (the paper's "
                "alpha*NTP + (1 - alpha)*LSSD, which sets ce_weight = alpha and lssd_weight = "
                "1 - alpha) or the two weights, not both"
            )
        return {**data, **implied}

    @model_validator(mode="after")
    def _some_loss(self) -> CPTConfig:
        if self.ce_weight == 0 and self.lssd_weight == 0:
            raise ValueError("ce_weight and lssd_weight are both 0; nothing would be trained")
        return self

"""Where the teacher's logits come from (design §6), for whichever `cpt.objective` distils from it.

The teacher is the model as it was before stage 1. Three sources, one interface
(`Teacher.target`), chosen by `cpt.teacher`:

- `online`: a frozen deep copy of the base model, run without grad beside the student;
- `lora`:   the student itself with its LoRA adapters disabled (no second copy in memory);
- `cache`:  the teacher's top-k log-probabilities, computed once over the packed D_MIX and kept
            on disk, so training carries no teacher model at all (`teacher_cache`).
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from mixcpt.errors import ConfigError
from mixcpt.models import vocab_size
from mixcpt.train.forward import LossForward
from mixcpt.train.targets import Target, TeacherRows


class Teacher:
    """A source of teacher targets."""

    def target(self, inputs: dict[str, torch.Tensor]) -> Target:
        """The teacher target of a batch (`inputs` as the dataset gives them, on the student's
        device): position t holds the teacher's prediction of token t + 1, as the student's rows
        do."""
        raise NotImplementedError

    def follow(self, student: torch.nn.Module) -> None:
        """Called with the student as training runs it (wrapped by DDP, or sharded by FSDP2),
        before each batch's target: a teacher that holds its own model places it alike."""


class OnlineTeacher(Teacher):
    """A frozen deep copy of `teacher_model` (eval mode, no grad), its parameters in `dtype`
    (default: theirs), moved to the student's device on first use. It is not part of the trained
    model, so the Trainer never wraps it: under DDP each process holds a whole copy, while under
    FSDP2 (`fully_shard`) and DeepSpeed ZeRO-3 `follow` shards it the way the student is sharded,
    so each of N processes holds 1/N of it. Its logits are made a chunk at a time inside the loss,
    in its own dtype (from its hidden states, see `LossForward`; a sharded teacher gives logits)."""

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        student_vocab_size: int,
        dtype: torch.dtype | None = None,
    ):
        if vocab_size(teacher_model) != student_vocab_size:
            raise ConfigError(
                f"cpt.teacher: the teacher's vocabulary has {vocab_size(teacher_model)} tokens, "
                f"the student's {student_vocab_size}; LSSD needs the same vocabulary"
            )
        self.model = frozen_copy(teacher_model, dtype)
        self.forward = LossForward(self.model)

    def target(self, inputs):
        if not self.sharded:
            self.model.to(inputs["input_ids"].device)  # a no-op after the first batch
        with torch.no_grad():
            rows, weight, _ = self.forward(self.model, inputs)
        if isinstance(self.model, FSDPModule):
            # FSDP2 keeps the root's parameters (embeddings, output layer) gathered after forward
            # for the backward that follows; a teacher has none, so they go back to their shards
            self.model.reshard()
        return TeacherRows(rows, weight)

    sharded = False

    def follow(self, student):
        if self.sharded:
            return
        if isinstance(student, FSDPModule):
            self._shard_like_fsdp2(student)
        elif zero_stage(student) == 3:
            self._partition_like_zero3(student)

    def _shard_like_fsdp2(self, student: FSDPModule) -> None:
        # Shard each decoder layer (the classes a transformers model names as units that must not
        # be split: those FSDP wraps), then the root, which keeps the embeddings, final norm and
        # output layer in one unit (so tied embeddings stay tied), on the student's device mesh:
        # its forward then gathers a layer at a time, as the student's. The student's own units
        # (accelerate may group them otherwise, or wrap them for activation checkpointing) need
        # not be mirrored: the teacher only runs forwards.
        mesh = next(p for p in student.parameters() if isinstance(p, DTensor)).device_mesh
        units = set(getattr(self.model, "_no_split_modules", None) or ())
        for module in self.model.modules():
            if type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.sharded = True

    def _partition_like_zero3(self, engine: torch.nn.Module) -> None:
        """Wrap the teacher in a DeepSpeed engine of its own with the student's ZeRO-3 config and
        no optimizer (an inference engine, as TRL wraps its reference models): its parameters are
        partitioned over the processes and gathered a layer at a time inside forward. The
        persistence threshold (parameters smaller than it stay whole on every process) and the
        buckets are sized to the model, as TRL does, so the small norms stay whole and the large
        matrices are split."""
        import deepspeed  # only under ZeRO-3, where it is installed

        config = copy.deepcopy(engine.config)  # the student's resolved config (no "auto" left)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        zero = config.setdefault("zero_optimization", {})
        zero["stage"] = 3
        if hidden:
            zero.update(
                reduce_bucket_size=hidden * hidden,
                stage3_param_persistence_threshold=10 * hidden,
                stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            )
        self.model, *_ = deepspeed.initialize(model=self.model, config=config)
        self.model.eval()
        # outside forward the output layer holds an empty partition: the loss takes logits
        self.forward = LossForward(self.model.module, hidden=False)
        self.sharded = True


class LoraTeacher(Teacher):
    """The PEFT-wrapped student with its adapters disabled: exactly the frozen base model."""

    def __init__(self, peft_model: torch.nn.Module):
        if not hasattr(peft_model, "disable_adapter"):
            raise ConfigError("cpt.teacher: lora needs the student wrapped with PEFT LoRA adapters")
        self.peft_model = peft_model
        # An adapted output layer is not a plain nn.Linear: then the teacher gives logits.
        self.forward = LossForward(peft_model)

    def target(self, inputs):
        # The adapter layers are toggled on the tuner (`base_model`) directly:
        # PeftModel.disable_adapter() would also walk every parameter (get_model_status) on each
        # step, for a warning only.
        tuner = self.peft_model.base_model
        # The unwrapped PEFT model, not the DDP wrapper: no gradient flows, no sync needed.
        with torch.no_grad():
            tuner.disable_adapter_layers()
            try:
                rows, weight, _ = self.forward(self.peft_model, inputs)
            finally:
                tuner.enable_adapter_layers()
        return TeacherRows(rows, weight)


def zero_stage(model: torch.nn.Module) -> int:
    """The DeepSpeed ZeRO stage of `model` when it is a DeepSpeed engine (accelerate wraps the
    student in one under DeepSpeed), else 0. Read without importing deepspeed."""
    stage = getattr(model, "zero_optimization_stage", None)
    return stage() if callable(stage) else 0


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A deep copy of `model` in eval mode, its parameters frozen and cast to `dtype` (None: kept
    as they are). Each parameter is cast as it is copied, so a float32 student never has a whole
    float32 twin on its device, even for a moment; buffers (rotary frequencies) are copied as they
    are, as from_pretrained leaves them."""
    copies = {
        id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo=copies).eval()

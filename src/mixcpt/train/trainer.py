"""The stage-1 trainer: `transformers.Trainer` with loss = ce_weight * L_CE + lssd_weight * L_D, L_D
the distillation term of `objective` (L_LSSD, L_KL or L_MFT, design §1).

Only `compute_loss` (and `log`, to report the loss terms) is overridden; schedules, gradient
accumulation, checkpoints, resume, logging and DDP/FSDP/DeepSpeed all come from Trainer.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from mixcpt.errors import ConfigError
from mixcpt.losses import IGNORE_INDEX, next_token_labels
from mixcpt.train.forward import LossForward, packed_forward_inputs
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.targets import Objective
from mixcpt.train.teachers import Teacher


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and `on_nonfinite` is "stop". Every process of a launch
    raises it; `report` is True on the one process that should print it."""

    report = True


class LSSDTrainer(Trainer):
    """Trains on packed blocks (input_ids, position_ids, labels[, block_index]).

    Extra arguments: `teacher` (needed when lssd_weight > 0, never run otherwise), the two loss
    weights, the distillation `objective` ("lssd", "kl" or "mft", with `mft_threshold`) and its
    `temperature`, `loss_chunk_size` (positions per chunk of the vocabulary-wide loss),
    `compile_loss` (that loss's chunks through torch.compile) and `on_nonfinite` ("stop" raises
    `NonFiniteLossError`, leaving the last checkpoint intact; "skip" gives the batch zero
    gradient). Logs `ce_loss` and, with a teacher, the distillation term under the objective's name
    (`lssd_loss`, `kl_loss` or `mft_loss`), `teacher_top1_match` (share of supervised positions
    where the teacher's top-1 was the label) and `kl_to_base`, the forgetting monitor: the mean
    KL(t || p) at the loss's temperature from the unmodified teacher t (the model before stage 1)
    to the student on the supervised training tokens (arXiv 2509.04259; bucketed with the cache
    teacher at k < V), computed in the same pass at nearly no cost.

    Both terms come from one fused chunked pass (`fused_loss.cpt_loss`) over the student's final
    hidden states and output layer, so the student's [B, T, V] logits are never made (see
    `forward.LossForward` for when it falls back to logits). The forward still goes through `model`,
    the DDP-wrapped module, so gradients sync as usual.
    """

    def __init__(
        self,
        *args,
        teacher: Teacher | None = None,
        ce_weight: float = 1.0,
        lssd_weight: float = 1.0,
        temperature: float = 1.0,
        objective: Objective = "lssd",
        mft_threshold: float = 0.2,
        loss_chunk_size: int = 256,
        compile_loss: bool = False,
        on_nonfinite: str = "stop",
        **kwargs,
    ):
        if ce_weight == 0 and lssd_weight == 0:
            raise ConfigError("cpt: ce_weight and lssd_weight are both 0; nothing would be trained")
        if lssd_weight > 0 and teacher is None:
            raise ValueError(f"LSSDTrainer: lssd_weight > 0 ({objective}) needs a teacher")
        super().__init__(*args, **kwargs)
        # Have Trainer count the supervised positions of each optimizer step (`num_items_in_batch`,
        # over every micro-batch of gradient accumulation and every process) whatever the model's
        # forward accepts: compute_loss normalises by it, so micro-batches with more padding weigh
        # less, as in one big batch.
        self.model_accepts_loss_kwargs = True
        self.teacher = teacher if lssd_weight > 0 else None
        self.ce_weight, self.lssd_weight = ce_weight, lssd_weight
        self.temperature, self.loss_chunk_size, self.on_nonfinite = (
            temperature,
            loss_chunk_size,
            on_nonfinite,
        )
        self.compile_loss = compile_loss
        self.objective, self.mft_threshold = objective, mft_threshold
        # FSDP and DeepSpeed ZeRO-3 gather the output layer's weight only inside forward: use logits
        # there. DDP and ZeRO-1/2 hold it whole on every process: the memory-flat path applies.
        self.student_forward = LossForward(self.model, hidden=not shards_parameters(self))
        self._sums: dict[str, torch.Tensor] = {}  # loss terms summed since the last log, on device
        # values a callback measured at this step (the forgetting monitor's), added to its log
        self.step_logs: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # [B, T]: the target of position t is token t + 1
        labels = next_token_labels(inputs["labels"])
        if return_outputs:  # the caller wants the logits (prediction_step): make them
            outputs = model(**packed_forward_inputs(inputs))
            student, weight = outputs.logits, None  # [B, T, V]
        else:
            # [B, T, H] and [V, H], or logits
            student, weight, outputs = self.student_forward(model, inputs)
        target = None
        if self.teacher is not None:
            self.teacher.follow(model)  # under FSDP2 or ZeRO-3 a model of its own is sharded alike
            target = self.teacher.target(inputs)
        with self.accelerator.autocast():  # the chunked output layer in the forward's precision
            result = cpt_loss(
                student,
                labels,
                target,
                weight,
                self.ce_weight,
                self.lssd_weight,
                self.temperature,
                IGNORE_INDEX,
                self.loss_chunk_size,
                self.compile_loss,
                self.objective,
                self.mft_threshold,
            )
        supervised = (labels != IGNORE_INDEX).sum()
        loss = result.loss  # mean over this micro-batch's supervised positions
        # -> sum over them / supervised positions of the whole step
        if num_items_in_batch is not None:
            loss = loss * supervised / num_items_in_batch
            # the count spans processes, and DDP averages gradients
            if self.args.average_tokens_across_devices:
                # (as Trainer.compute_loss scales a model's own loss)
                loss = loss * (
                    self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu
                )
        # Sums over supervised positions, so the logged means weigh every position alike, as the
        # loss does; every key on every batch and rank, so the sums can be reduced across processes
        # in `log`.
        terms = {
            "ce": result.ce * supervised,
            "distill": result.distill * supervised,
            "kl_to_base": result.kl_to_base * supervised,
            "teacher_top1_matches": result.teacher_top1_matches,
            "supervised": supervised,
            "skipped_batches": torch.zeros_like(result.ce),
        }
        nonfinite = self._nonfinite_processes(loss)
        if nonfinite:
            loss = self._nonfinite(model, result, terms, nonfinite)
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0) + value.float()
        return (loss, outputs) if return_outputs else loss

    @property
    def distill_key(self) -> str:
        """The log key of the distillation term: lssd_loss, kl_loss or mft_loss."""
        return f"{self.objective}_loss"

    def _nonfinite_processes(self, loss: torch.Tensor) -> list[int]:
        """The indices of the processes whose micro-batch loss is not finite ([] when all are).

        Every process must take the same branch: one that raised alone would leave the others
        blocked in the next all-reduce of gradients (a hang, then the watchdog's dump), and one that
        skipped alone would give DDP mismatched gradients. So the flags are all-reduced (one tiny
        collective per micro-batch; one process only reads its own)."""
        bad = torch.zeros(self.accelerator.num_processes, device=loss.device)
        bad[self.accelerator.process_index] = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bad.nonzero().flatten().tolist()

    def _nonfinite(
        self, model, result, terms: dict[str, torch.Tensor], processes: list[int]
    ) -> torch.Tensor:
        """Stop (raise on every process alike) or zero the batch's contribution on every process."""
        if self.on_nonfinite == "stop":
            where = ""
            if self.accelerator.num_processes > 1:
                where = f" on process {', '.join(map(str, processes))}"
                where += f" of {self.accelerator.num_processes}"
            error = NonFiniteLossError(
                f"non-finite loss at step {self.state.global_step}{where} "
                f"(ce_loss={result.ce.item():.4g}, "
                f"{self.distill_key}={result.distill.item():.4g}); "
                f"the last checkpoint in {self.args.output_dir} is intact. Set on_nonfinite: "
                f"skip and rerun to resume from it, or lower the learning rate and delete "
                f"{self.args.output_dir} to restart the stage."
            )
            # one line for the launch, from the first process that saw it (with its loss terms)
            error.report = self.accelerator.process_index == processes[0]
            raise error
        zero = torch.zeros_like(result.ce)
        terms.update(dict.fromkeys(terms, zero), skipped_batches=zero + 1)
        # A zero that touches every trainable parameter and none of the poisoned graph: the batch
        # adds nothing to the gradients, and DDP still sees a gradient for each parameter.
        return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(self.step_logs)
        self.step_logs = {}
        if self._sums:
            names = sorted(self._sums)
            totals = self.accelerator.reduce(
                torch.stack([self._sums[n] for n in names]), reduction="sum"
            )
            sums = dict(zip(names, totals.tolist()))
            supervised = max(sums["supervised"], 1)
            logs["ce_loss"] = round(sums["ce"] / supervised, 6)
            if self.teacher is not None:
                logs[self.distill_key] = round(sums["distill"] / supervised, 6)
                logs["teacher_top1_match"] = round(sums["teacher_top1_matches"] / supervised, 6)
                logs["kl_to_base"] = round(sums["kl_to_base"] / supervised, 6)
            if sums["skipped_batches"]:
                logs["skipped_batches"] = int(sums["skipped_batches"])
            self._sums = {}
        super().log(logs, start_time)


def shards_parameters(trainer: Trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no process holds the whole model (ZeRO-1/2
    partition only optimizer state and gradients)."""
    return trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled()

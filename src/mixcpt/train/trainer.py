"""The stage-1 trainer: `transformers.Trainer` with loss = ce_weight * L_CE + lssd_weight * L_LSSD.

Only `compute_loss` (and `log`, to report the loss terms) is overridden; schedules, gradient
accumulation, checkpoints, resume, logging and DDP/FSDP/DeepSpeed all come from Trainer.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.errors import ConfigError
from mixcpt.losses import cross_entropy
from mixcpt.teachers import Teacher


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and `on_nonfinite` is "stop"."""


class LSSDTrainer(Trainer):
    """Trains on packed blocks (input_ids, position_ids, labels[, block_index]).

    Extra arguments: `teacher` (needed when lssd_weight > 0, never run otherwise), the two loss
    weights, the LSSD `temperature`, `loss_chunk_size` (positions per chunk of the
    vocabulary-wide losses) and `on_nonfinite` ("stop" raises `NonFiniteLossError`, leaving the
    last checkpoint intact; "skip" gives the batch zero gradient). Logs `ce_loss`, `lssd_loss` and
    `teacher_top1_match` (share of supervised positions where the teacher's top-1 was the label).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; Trainer divides by GA steps

    def __init__(self, *args, teacher: Teacher | None = None, ce_weight: float = 1.0, lssd_weight: float = 1.0,
                 temperature: float = 1.0, loss_chunk_size: int = 1024, on_nonfinite: str = "stop", **kwargs):
        if ce_weight == 0 and lssd_weight == 0:
            raise ConfigError("cpt: ce_weight and lssd_weight are both 0; nothing would be trained")
        if lssd_weight > 0 and teacher is None:
            raise ValueError("LSSDTrainer: lssd_weight > 0 needs a teacher")
        super().__init__(*args, **kwargs)
        self.teacher = teacher if lssd_weight > 0 else None
        self.ce_weight, self.lssd_weight = ce_weight, lssd_weight
        self.temperature, self.loss_chunk_size, self.on_nonfinite = temperature, loss_chunk_size, on_nonfinite
        self._sums: dict[str, torch.Tensor] = {}  # loss terms summed since the last log, on device

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]  # [B, T-1]: the target of position t is token t + 1
        # No attention mask: position ids restart per document, so transformers masks block-diagonally.
        outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
        logits = outputs.logits[:, :-1]  # [B, T-1, V]

        ce = cross_entropy(logits, labels, chunk_size=self.loss_chunk_size)
        loss = self.ce_weight * ce if self.ce_weight > 0 else 0.0
        zero = torch.zeros((), device=ce.device)
        # Every key on every batch and rank, so the sums can be reduced across processes in `log`.
        terms = {"ce_loss": ce.detach(), "lssd_loss": zero, "teacher_top1_matches": zero,
                 "supervised": (labels != IGNORE_INDEX).sum(), "skipped_batches": zero}
        if self.teacher is not None:
            lssd, top1_matches = self.teacher.lssd(model, inputs, logits, labels, self.temperature,
                                                   self.loss_chunk_size)
            loss = loss + self.lssd_weight * lssd
            terms.update(lssd_loss=lssd.detach(), teacher_top1_matches=top1_matches)

        if not torch.isfinite(loss):
            loss = self._nonfinite(model, terms)
        for name, value in {**terms, "batches": zero + 1}.items():
            self._sums[name] = self._sums.get(name, 0) + value.float()
        return (loss, outputs) if return_outputs else loss

    def _nonfinite(self, model, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        shown = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items() if k.endswith("loss"))
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.global_step} ({shown}); the last checkpoint in "
                f"{self.args.output_dir} is intact. Lower the learning rate, or set on_nonfinite: skip.")
        terms.update(ce_loss=torch.zeros_like(terms["ce_loss"]), lssd_loss=torch.zeros_like(terms["ce_loss"]),
                     skipped_batches=torch.ones_like(terms["ce_loss"]))
        # A zero that touches every trainable parameter and none of the poisoned graph: the batch adds
        # nothing to the gradients, and DDP still sees a gradient for each parameter.
        return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._sums:
            names = sorted(self._sums)
            totals = self.accelerator.reduce(torch.stack([self._sums[n] for n in names]), reduction="sum")
            sums = dict(zip(names, totals.tolist()))
            logs["ce_loss"] = round(sums["ce_loss"] / sums["batches"], 6)
            if self.teacher is not None:
                logs["lssd_loss"] = round(sums["lssd_loss"] / sums["batches"], 6)
                logs["teacher_top1_match"] = round(sums["teacher_top1_matches"] / max(sums["supervised"], 1), 6)
            if sums["skipped_batches"]:
                logs["skipped_batches"] = int(sums["skipped_batches"])
            self._sums = {}
        super().log(logs, start_time)

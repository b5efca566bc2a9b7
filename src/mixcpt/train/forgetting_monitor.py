"""The forgetting monitor of stage-1 arms without a teacher (traditional, mixture-ce, replay):
the forward KL(base || model) on the run's fixed probe text (`eval.probe`), logged as
`kl_to_base` at every step the Trainer logs (every `cpt.training.logging_steps` steps), into
results.json's log history and TensorBoard. Forward KL to the base has been found to track
forgetting (arXiv 2509.04259); arms with a teacher log the same key from the teacher's
distribution on their training tokens instead.

The probe is cut into the windows the eval stage's `kl_per_window` scores (the same tokens, the
same conditioning), so the last logged value and the eval stage's KL to base on the trained model
measure the same thing, up to the bucketing below.

The base's side is computed once, before the first step, from the student itself (before step 0
it *is* the base), and kept in the stage's work folder (`REFERENCE_FILE`): a resumed run reads it
rather than taking an already-trained model for the base. It is stored as the teacher cache
stores a teacher (mixcpt.train.teacher_cache): per predicted probe position the base's top-k
log-probabilities and ids and the log of the remaining mass, a few MB at a 128k vocabulary. The
KL is then taken between the two distributions coarsened to k + 1 buckets (the base's top-k
tokens and one tail bucket; `targets.bucketed_kl`, as the cache teacher's loss), which is a lower
bound of the full KL (coarsening never increases a KL divergence) and equals it when k is the
vocabulary.

Under DDP or FSDP every process runs the probe (an FSDP forward gathers weights with collectives,
so all must); each then holds the same value, and the Trainer's main process writes it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.evaluate.scoring import text_windows
from mixcpt.responses import pad_batch, padded_forward_inputs
from mixcpt.train.forward import LossForward
from mixcpt.train.targets import bucketed_kl, student_buckets
from mixcpt.train.teacher_cache import top_k_logprobs
from mixcpt.train.trainer import shards_parameters

# The base's log-probabilities kept per probe position, as many as the teacher cache keeps by
# default; the rest of the vocabulary is one tail bucket.
PROBE_TOP_K = 64
REFERENCE_FILE = "kl_probe_reference.pt"  # in the stage's work folder
LOG_KEY = "kl_to_base"


class ProbeReference(NamedTuple):
    """The base's next-token distribution at the N predicted positions of the probe."""

    logprobs: torch.Tensor  # [N, k] float32, most likely first
    ids: torch.Tensor  # [N, k] int64
    tail: torch.Tensor  # [N] float32, log of the mass outside the top k (-inf when k = V)


def probe_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int
) -> list[dict[str, list[int]]]:
    """The probe `text` as the eval stage windows it for `kl_per_window` (`features` rows of at
    most `max_length + 1` ids, every token after the first predicted exactly once)."""
    return text_windows(tokenizer, [text], max_length)[0]


def probe_positions(
    model: torch.nn.Module,
    forward: LossForward,
    windows: list[dict[str, list[int]]],
    batch_size: int,
    pad_token_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per batch of `batch_size` windows, the model's rows at the batch's predicted positions:
    (hidden states [n, H], output weight [V, H]) or (logits [n, V], None), `forward` deciding
    (`LossForward`). Positions come window after window, each window's in order, whatever the
    batch size. Call under no_grad with the model in eval mode."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = pad_batch(windows[start : start + batch_size], pad_token_id)
        # the last id predicts nothing; position t predicts id t + 1
        inputs = {"input_ids": batch["input_ids"][:, :-1].to(device)}  # [b, T-1]
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)  # [b, T-1]
        rows, weight, _ = forward(model, inputs, padded_forward_inputs(inputs))  # [b, T-1, H|V]
        yield rows[scored], weight  # [n, H|V]


def _logits(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """float32 logits [c, V] of hidden states [c, H] with the output weight, or of logits."""
    return (rows if weight is None else rows.to(weight.dtype) @ weight.T).float()


def base_reference(
    positions: Iterator[tuple[torch.Tensor, torch.Tensor | None]], top_k: int, chunk_size: int
) -> ProbeReference:
    """The base's top-`top_k` log-probabilities (capped at V), ids and log tail mass at every
    position `probe_positions` yields for the base, at temperature 1, on the CPU."""
    parts = []
    for rows, weight in positions:
        logprobs, ids, tail = top_k_logprobs(rows, weight, top_k, 1.0, chunk_size)
        parts.append((logprobs.cpu(), ids.cpu(), tail.cpu()))
    return ProbeReference(*(torch.cat(p) for p in zip(*parts)))


def kl_to_reference(
    positions: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    reference: ProbeReference,
    chunk_size: int,
) -> float:
    """Mean over the probe's predicted positions of KL(base || model) between the base
    (`reference`) and the model whose rows `positions` yields, both coarsened to the base's top-k
    tokens and one tail bucket (`targets.bucketed_kl`, as the cache teacher's loss is: a lower
    bound of the full KL, equal to it when k = V), `chunk_size` positions at a time (one
    [chunk, V] float32 tensor at a time)."""
    total, done = 0.0, 0
    for rows, weight in positions:
        for start in range(0, len(rows), chunk_size):
            x = rows[start : start + chunk_size]
            log_p = F.log_softmax(_logits(x, weight), dim=-1)  # [c, V]
            logprobs, ids, tail = (t[done : done + len(x)].to(x.device) for t in reference)
            q, q_tail = logprobs.float().exp(), tail.float().exp()  # [c, k], [c]
            total += bucketed_kl(q, q_tail, *student_buckets(log_p, ids.long())).item()
            done += len(x)
    if done != len(reference.tail):
        raise ValueError(f"the probe has {done} positions, its reference {len(reference.tail)}")
    return total / max(done, 1)


class ForgettingMonitor(TrainerCallback):
    """Logs `kl_to_base` (the module docstring) at every step the Trainer logs, through the
    trainer's `step_logs`. The base's reference is made at the start of training (`global_step`
    0) and saved in `folder`, or read from there when the run resumes; a resume without a
    matching reference turns the monitor off with one line. `seconds` is the time spent on the
    probe (reference included): the monitor's cost."""

    def __init__(
        self,
        trainer: Trainer,
        windows: list[dict[str, list[int]]],
        folder: Path,
        probe_hash: str,
        batch_size: int,
        top_k: int = PROBE_TOP_K,
        chunk_size: int = 256,
    ):
        self.trainer, self.windows, self.folder = trainer, windows, Path(folder)
        self.batch_size, self.top_k, self.chunk_size = batch_size, top_k, chunk_size
        self.probe_hash = probe_hash
        self.reference: ProbeReference | None = None
        self.seconds = 0.0
        self._forward: LossForward | None = None

    def _positions(self, model: torch.nn.Module):
        """`probe_positions` of `model` (what the forward goes through: under FSDP the sharded
        module) over the probe."""
        if self._forward is None:  # made once the Trainer has prepared the model
            unwrapped = self.trainer.accelerator.unwrap_model(model)
            self._forward = LossForward(unwrapped, hidden=not shards_parameters(self.trainer))
        pad = self.trainer.processing_class.pad_token_id
        return probe_positions(model, self._forward, self.windows, self.batch_size, pad)

    def _probe(self, model: torch.nn.Module, measure):
        """`measure(positions)` under no_grad with the model in eval mode, then back in its mode;
        the time it took is added to `seconds`."""
        started, was_training = time.perf_counter(), model.training
        model.eval()
        try:
            with torch.no_grad():
                return measure(self._positions(model))
        finally:
            model.train(was_training)
            self.seconds += time.perf_counter() - started

    def _meta(self) -> dict:
        """What a saved reference must have been made with to serve this run."""
        return {"probe": self.probe_hash, "top_k": self.top_k}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        path = self.folder / REFERENCE_FILE
        if state.global_step == 0:  # nothing trained yet: the model is the base
            reference = self._probe(
                model, lambda positions: base_reference(positions, self.top_k, self.chunk_size)
            )
            if state.is_world_process_zero:
                self.folder.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".tmp")
                torch.save({"meta": self._meta(), **reference._asdict()}, partial)
                os.replace(partial, path)
            self.reference = reference
            return
        saved = torch.load(path, weights_only=True) if path.is_file() else None
        if saved is not None and saved["meta"] == self._meta():
            self.reference = ProbeReference(saved["logprobs"], saved["ids"], saved["tail"])
            return
        if state.is_world_process_zero:
            why = "none was saved" if saved is None else "it was made from another probe or k"
            print(
                f"mixcpt: {LOG_KEY}: forgetting monitor off for this resumed run: the base's "
                f"reference on the probe ({path}) cannot be used ({why}), and the model has "
                "already trained",
                file=sys.stderr,
                flush=True,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # DefaultFlowCallback, first in the list, has decided whether this step logs
        if self.reference is None or not control.should_log:
            return
        kl = self._probe(
            model, lambda positions: kl_to_reference(positions, self.reference, self.chunk_size)
        )
        self.trainer.step_logs[LOG_KEY] = round(kl, 8)


def attach_forgetting_monitor(
    trainer: Trainer,
    probe: str | None,
    max_length: int,
    batch_size: int,
    chunk_size: int,
    work: Path,
    top_k: int = PROBE_TOP_K,
) -> ForgettingMonitor | None:
    """Add a `ForgettingMonitor` on the `probe` file (`eval.probe`, windowed by `max_length`,
    `batch_size` windows per forward) to `trainer`, its reference kept in `work`; returns it.
    Without a probe, says once that the monitor is off and returns None."""
    if probe is None:
        if trainer.is_world_process_zero():
            print(
                f"mixcpt: {LOG_KEY}: no eval.probe configured: the forgetting monitor of this "
                "arm (it has no teacher) is off",
                flush=True,
            )
        return None
    text = Path(probe).read_text(encoding="utf-8")
    windows = probe_windows(trainer.processing_class, text, max_length)
    probe_hash = hashlib.sha256(f"{max_length}\0{text}".encode()).hexdigest()
    monitor = ForgettingMonitor(trainer, windows, work, probe_hash, batch_size, top_k, chunk_size)
    trainer.add_callback(monitor)
    return monitor


def forgetting_monitor(trainer: Trainer) -> ForgettingMonitor | None:
    """The trainer's `ForgettingMonitor`, or None."""
    callbacks = trainer.callback_handler.callbacks
    return next((c for c in callbacks if isinstance(c, ForgettingMonitor)), None)

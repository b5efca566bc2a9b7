"""What every training stage (cpt, sft, dpo) does around its Trainer: resume from the last
complete checkpoint (refusing one started with other settings), stop at a step boundary with a
checkpoint on SIGTERM / SIGUSR1, report a full disk in one line, log to TensorBoard in the run
folder, record its metrics, save the model atomically, clean up."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import TrainOutput

from mixcpt import preempt
from mixcpt.atomic import folder_bytes, lack_of_space, write_json_atomic
from mixcpt.config.training import LOGGING_KEYS
from mixcpt.errors import ConfigError, DiskFullError
from mixcpt.fingerprints import RECORD_FILE
from mixcpt.models import save_trained_model
from mixcpt.rundir import RunDir

# Beside a stage's checkpoints: what the stage was started with (`started_with`).
STARTED_WITH = "started_with.json"

# Settings that may change between a run and its resume: they change when and how things are
# logged, saved or computed, never what an optimizer step does (loss_chunk_size and
# gradient_checkpointing trade memory for time, compile_loss computes the same loss with fused
# kernels; on_nonfinite only acts on a non-finite loss).
RESUMABLE_CHANGES = LOGGING_KEYS | {
    "save_steps",
    "save_total_limit",
    "loss_chunk_size",
    "compile_loss",
    "gradient_checkpointing",
    "on_nonfinite",
}


def last_complete_checkpoint(work: Path) -> str | None:
    """The newest Trainer checkpoint in `work` that was written to the end, or None.

    transformers (5.x) writes `checkpoint-N/` in place, trainer_state.json last, and
    `get_last_checkpoint` returns the highest N whether or not its writing finished. A process
    killed or out of disk space mid-save leaves a partial folder; resuming from it would fail or
    load half a state. Partial folders are deleted here (they belong to this stage's work folder
    only), so the run resumes from the previous, complete checkpoint and rewrites step N.
    """
    if not work.is_dir():
        return None
    complete = []
    for path in sorted(work.glob("checkpoint-*")):
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        if is_complete(path):
            complete.append((int(step), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def is_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint folder was written to the end (its trainer_state.json, written last,
    is there and whole)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def train_and_save(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    run: RunDir,
    key: str,
    metrics_of: Callable[[TrainOutput], dict],
    *,
    merge_lora: bool = False,
    record: dict | None = None,
    started_with: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> dict:
    """Train stage `key` ("<arm>/<stage>") of `run`, resuming from the last complete checkpoint in
    its work folder (`run.work(arm, stage)`, where the Trainer's `output_dir` must point) if a
    previous run left one; record `metrics_of(output)` plus `resumed_from` in results.json under
    stages/`key`; log to `run.logs(arm, stage)` (`log_to`); write the model (weights in `dtype`,
    the run's `model.dtype`) and tokenizer to `run.stage(arm, stage)` atomically (LoRA adapters
    merged with `merge_lora`, the fingerprint `record` beside them), then delete the checkpoints.
    Call on every process; returns the metrics.

    Metrics are recorded before the folder appears: a process killed in between leaves no folder,
    so the stage reruns (from its last checkpoint), and a finished stage always has its metrics.

    `started_with` (the stage's config section, seed, model, data and teacher: `check_started_with`)
    is kept beside the checkpoints; a resume from checkpoints started with other settings is a
    ConfigError naming them. A stop signal during training saves a checkpoint at the end of the
    optimizer step and raises `Preempted` (`StopOnSignal`); one after training lets the final save
    finish first. A checkpoint save that runs out of space raises `DiskFullError`.
    """
    arm, stage = key.split("/")
    final, work = run.stage(arm, stage), run.work(arm, stage)
    with preempt.deferred(f"{key} finished first and was saved"):
        resume = last_complete_checkpoint(work)
        if started_with is not None:
            check_started_with(work, started_with, resume, trainer.is_world_process_zero())
        log_to(trainer, run.logs(arm, stage), resume)
        stop = StopOnSignal()
        trainer.add_callback(stop)
        report_full_disk(trainer, work)
        output = trainer.train(resume_from_checkpoint=resume)
        if stop.saved_at is not None:
            preempt.stop(
                f"{key}: checkpoint of step {stop.saved_at} saved in "
                f"{work / f'checkpoint-{stop.saved_at}'}",
                stop.signum,
            )
        metrics = {**metrics_of(output), "resumed_from": resume}
        if trainer.is_world_process_zero():
            run.update_results("stages", key, metrics)
        extra = {} if record is None else {RECORD_FILE: record}
        save_trained_model(trainer, tokenizer, final, dtype, merge_lora, extra)
        if trainer.is_world_process_zero():
            shutil.rmtree(work, ignore_errors=True)
        return metrics


def trained_samples(trainer: Trainer) -> int:
    """Samples (blocks in cpt, samples in sft, pairs in dpo) that the optimizer steps taken so
    far consumed, over every process; a last, short batch of an epoch counts as full."""
    args = trainer.args
    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return trainer.state.global_step * per_step


def log_to(trainer: Trainer, folder: Path, resume: str | None) -> None:
    """Make the Trainer's TensorBoard writer (report_to: tensorboard) write into `folder`, which
    outlives the stage's work folder (transformers' default, runs/ inside it, is deleted with it).

    A fresh start (`resume` None) empties `folder`: its events described the model being
    replaced. A resume from checkpoint-N adds to them, hiding the steps after N that the
    interrupted run had logged (TensorBoard's purge_step), so each step shows once."""
    callbacks = trainer.callback_handler.callbacks
    tensorboard = next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)
    if tensorboard is None or not trainer.is_world_process_zero():  # it writes on the main one
        return
    from torch.utils.tensorboard import SummaryWriter  # loads tensorboard: only when used

    if resume is None:
        shutil.rmtree(folder, ignore_errors=True)
    purge_step = int(Path(resume).name.removeprefix("checkpoint-")) + 1 if resume else None
    tensorboard.tb_writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _any_process(signum: int, device: torch.device) -> int:
    """The largest of `signum` (0: none) over the processes of a distributed run (every process
    must call it at the same point), so that all of them stop at the same step, even those the
    signal did not reach; `signum` itself in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    tensor = torch.tensor([signum], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class StopOnSignal(TrainerCallback):
    """Preemption through the Trainer's own flow: once a stop signal has come (`mixcpt.preempt`,
    in any process of the run), the step that ends asks for a checkpoint (`should_save`), and the
    save asks training to stop (`should_training_stop`), so the Trainer writes checkpoint-N with
    its usual files, then leaves its loop as at the end of training. `saved_at` is that step.

    A signal during the last step stops nothing: the final model is saved instead. Under a
    distributed launch the processes agree on the signal every step (one all-reduce of one
    number), since it may reach them at different steps, or only some of them; `signum` is the
    signal agreed on."""

    def __init__(self):
        self.saved_at: int | None = None
        self.signum = 0
        self._stopping = False

    def on_step_end(self, args, state, control, **kwargs):
        self.signum = _any_process(preempt.requested() or 0, args.device)
        if self.signum and state.global_step < state.max_steps:
            control.should_save = True
            self._stopping = True
        return control

    def on_save(self, args, state, control, **kwargs):
        # here, not at the step end: the control state recorded in the checkpoint stays clean
        if self._stopping:
            control.should_training_stop = True
            self.saved_at = state.global_step
        return control


def report_full_disk(trainer: Trainer, work: Path) -> None:
    """Make a checkpoint save that runs out of disk space raise `DiskFullError` (one line: the
    checkpoint folder, the space it needs), after removing the partial checkpoint; the previous
    checkpoints stay as they were (the Trainer deletes old ones only after a save succeeded)."""
    save = trainer._save_checkpoint  # the one method every Trainer's checkpoint goes through

    def save_or_report(model, trial):
        try:
            return save(model, trial)
        except Exception as err:
            target = work / f"checkpoint-{trainer.state.global_step}"
            previous = newest_complete_checkpoint(work, other_than=target)
            estimate = folder_bytes(previous) if previous else checkpoint_estimate(trainer.model)
            needed = max(estimate, folder_bytes(target))
            if not lack_of_space(err, work):
                raise
            if trainer.is_world_process_zero() and not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
            raise DiskFullError(
                target,
                needed,
                "a checkpoint",
                "free some space and rerun the same command: it resumes from "
                + (previous.name if previous else "the start of the stage"),
                "the size of the previous one" if previous else "weights and optimizer state",
            ) from err

    trainer._save_checkpoint = save_or_report


def newest_complete_checkpoint(work: Path, other_than: Path) -> Path | None:
    """The newest complete checkpoint in `work` other than `other_than`, if any (deletes
    nothing, unlike `last_complete_checkpoint`)."""
    complete = [
        (int(p.name.removeprefix("checkpoint-")), p)
        for p in work.glob("checkpoint-*")
        if p != other_than and p.name.removeprefix("checkpoint-").isdigit() and is_complete(p)
    ]
    return max(complete)[1] if complete else None


def checkpoint_estimate(model: torch.nn.Module) -> int:
    """About the bytes of a first checkpoint: the weights, plus two AdamW moments per trainable
    weight."""
    return sum(
        p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in model.parameters()
    )


def check_started_with(
    work: Path, started_with: dict[str, Any], resume: str | None, writer: bool
) -> None:
    """Keep `started_with` beside the checkpoints of a stage that starts afresh (`resume` None;
    written by the `writer` process), or compare it with what the checkpoints were started with.

    A resumed Trainer restores the optimizer's learning rate, the schedule and the data order from
    the checkpoint, so resuming under other settings would silently mix two runs: any difference
    (other than `RESUMABLE_CHANGES`) is a ConfigError naming the keys, which says to restore them
    or to delete the work folder and restart the stage. Checkpoints from before this record (no
    file) are resumed unchecked, with a warning.
    """
    path = work / STARTED_WITH
    wanted = json.loads(json.dumps(started_with))  # as it reads back: lists, not tuples
    if resume is None:
        if writer:
            write_json_atomic(path, wanted)
        return
    if not path.is_file():
        if writer:
            print(
                f"mixcpt: warning: {work}: checkpoints without {STARTED_WITH} (an older mixcpt); "
                "resuming without checking that they were started with this config",
                file=sys.stderr,
            )
        return
    found = json.loads(path.read_text(encoding="utf-8"))
    diffs = [
        (name, was, now)
        for name, was, now in _differences(found, wanted)
        if name.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES
    ]
    if diffs:
        shown = "; ".join(
            f"{name}: {_short(was)} then, {_short(now)} now" for name, was, now in diffs[:3]
        )
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigError(
            f"{shown}{more}: the checkpoints in {work} were started with other settings, and "
            f"resuming would mix the two runs; restore them, or delete {work} to restart this "
            "stage"
        )


def _differences(was: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two JSON trees."""
    if isinstance(was, dict) and isinstance(now, dict):
        out = []
        for k in list(was) + [k for k in now if k not in was]:
            name = f"{prefix}.{k}" if prefix else str(k)
            out += _differences(was.get(k, "<absent>"), now.get(k, "<absent>"), name)
        return out
    return [] if was == now else [(prefix, was, now)]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."

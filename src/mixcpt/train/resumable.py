"""What every training stage (cpt, sft, dpo) does around its Trainer: resume from the last
complete checkpoint, record its metrics, save the model atomically, clean up."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import TrainOutput

from mixcpt.fingerprints import RECORD_FILE
from mixcpt.models import save_trained_model
from mixcpt.rundir import RunDir


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
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            complete.append((int(step), path))
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def train_and_save(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    final: Path,
    work: Path,
    run: RunDir,
    key: str,
    metrics_of: Callable[[TrainOutput], dict],
    merge_lora: bool = False,
    record: dict | None = None,
) -> dict:
    """Train (resuming from the last complete checkpoint in `work` if a previous run left one),
    record `metrics_of(output)` plus `resumed_from` in results.json under stages/`key`, write the
    model and tokenizer to `final` atomically (LoRA adapters merged with `merge_lora`, the
    fingerprint `record` beside them), then delete the checkpoints. Call on every process;
    returns the metrics.

    Metrics are recorded before the folder appears: a process killed in between leaves no folder,
    so the stage reruns (from its last checkpoint), and a finished stage always has its metrics.
    """
    resume = last_complete_checkpoint(work)
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = {**metrics_of(output), "resumed_from": resume}
    if trainer.is_world_process_zero():
        run.update_results("stages", key, metrics)
    extra = {} if record is None else {RECORD_FILE: record}
    save_trained_model(trainer, tokenizer, final, merge_lora, extra)
    if trainer.is_world_process_zero():
        shutil.rmtree(work, ignore_errors=True)
    return metrics

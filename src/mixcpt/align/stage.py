"""What every alignment stage does around its Trainer: skip when done, resume, save atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import TrainOutput

from mixcpt.errors import InputError
from mixcpt.rundir import RunDir, last_complete_checkpoint
from mixcpt.train.stage import save_trained_model


def recorded_metrics(run: RunDir, key: str) -> dict:
    """The metrics a finished stage recorded in results.json ({} when none were recorded)."""
    return run.read_results().get("stages", {}).get(key, {})


def require_model(folder: Path, previous: str) -> Path:
    """`folder` when it holds a finished stage; else an InputError saying which stage to run first."""
    if not folder.is_dir():
        raise InputError(folder, None, f"model folder missing; run the `{previous}` stage first")
    return folder


def train_and_save(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    final: Path,
    work: Path,
    run: RunDir,
    key: str,
    metrics_of: Callable[[TrainOutput], dict],
) -> dict:
    """Train (resuming from the last complete checkpoint in `work` if a previous run left one),
    record `metrics_of(output)` in results.json under stages/`key`, write the model and tokenizer
    to `final` atomically, then delete the checkpoints. Call on every process; returns the metrics.

    Metrics are recorded before the folder appears: a process killed in between leaves no folder,
    so the stage reruns, and a finished stage always has its metrics.
    """
    output = trainer.train(resume_from_checkpoint=last_complete_checkpoint(work))
    metrics = metrics_of(output)
    if trainer.is_world_process_zero():
        run.update_results("stages", key, metrics)
    save_trained_model(trainer, tokenizer, final)
    if trainer.is_world_process_zero():
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def log_history_metrics(log_history: list[dict], names: tuple[str, ...]) -> dict:
    """The last logged value of each of `names` (absent names are left out)."""
    last = {}
    for entry in log_history:
        last.update({k: entry[k] for k in names if k in entry})
    return last

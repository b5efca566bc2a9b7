"""What every alignment stage does around its Trainer: skip when done, resume, save atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from mixcpt.errors import InputError
from mixcpt.models import save_model
from mixcpt.rundir import RunDir, atomic_dir


def recorded_metrics(run: RunDir, key: str) -> dict:
    """The metrics a finished stage recorded in results.json ({} when none were recorded)."""
    return run.read_results().get("stages", {}).get(key, {})


def require_model(folder: Path, previous: str) -> Path:
    """`folder` when it holds a finished stage; else an InputError saying which stage to run first."""
    if not folder.is_dir():
        raise InputError(folder, None, f"model folder missing; run the `{previous}` stage first")
    return folder


def train_and_save(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, final: Path, work: Path) -> TrainOutput:
    """Train (resuming from the last checkpoint in `work` if a previous run left one), write the
    model and tokenizer to `final` atomically, then delete the checkpoints."""
    last = get_last_checkpoint(str(work)) if work.is_dir() else None
    output = trainer.train(resume_from_checkpoint=last)
    if trainer.args.should_save:  # the main process only, under DDP
        with atomic_dir(final) as tmp:
            save_model(trainer.accelerator.unwrap_model(trainer.model), tokenizer, tmp)
        shutil.rmtree(work, ignore_errors=True)
    return output


def log_history_metrics(log_history: list[dict], names: tuple[str, ...]) -> dict:
    """The last logged value of each of `names` (absent names are left out)."""
    last = {}
    for entry in log_history:
        last.update({k: entry[k] for k in names if k in entry})
    return last

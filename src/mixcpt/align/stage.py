"""What the SFT and DPO stages share around their Trainers: deciding whether to rebuild, the model,
tokenizer and samples an arm's alignment stage starts from, its training arguments, and training
and saving with what a resume must match (`train.resumable`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput

from mixcpt.align.samples import POOL_FILES, usable_rows
from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.fingerprints import begin
from mixcpt.pipeline import selection_owner, stage1_owner
from mixcpt.responses import chat_tokenizer
from mixcpt.rundir import RunDir
from mixcpt.stage_inputs import file_hash
from mixcpt.train.arguments import training_arguments
from mixcpt.train.resumable import train_and_save

# stage -> (the stage whose model it starts from, the kind of samples it trains on)
STARTS_FROM = {"sft": ("cpt", "instruction"), "dpo": ("sft", "preference")}


@dataclass(frozen=True)
class AlignmentStage:
    """Alignment stage `name` ("sft" or "dpo") of `arm`, to be built (`begin_alignment`)."""

    name: str
    arm: str
    run: RunDir
    cfg: Config  # the arm's config
    record: dict  # the fingerprint stored with the model
    start: Path  # the model folder it trains from
    tokenizer: PreTrainedTokenizerBase  # that model's, with a chat template
    rows: list[dict]  # the usable samples it aligns on
    samples: Path  # the file they came from

    def training_arguments(self) -> TrainingArguments:
        """The stage's config section's training settings, checkpoints in its work folder."""
        return training_arguments(
            getattr(self.cfg, self.name).training,
            self.run.work(self.arm, self.name),
            self.cfg.seed,
            self.cfg.model.dtype,
            remove_unused_columns=False,
        )

    def train_and_save(self, trainer: Trainer, metrics_of: Callable[[TrainOutput], dict]) -> dict:
        """`train.resumable.train_and_save` of this stage: resumable only with the same config
        section, seed, model settings and samples file; returns the metrics."""
        return train_and_save(
            trainer,
            self.tokenizer,
            self.run,
            f"{self.arm}/{self.name}",
            metrics_of,
            record=self.record,
            started_with={**started_with(self.cfg, self.name), "samples": file_hash(self.samples)},
            dtype=self.cfg.model.dtype,
        )


def begin_alignment(
    cfg: Config, run: RunDir, arm: str, name: str, force: bool = False
) -> AlignmentStage | None:
    """Stage `name` ("sft", "dpo") of `arm` as `fingerprints.begin` decides: None when its recorded
    output is reused (the caller returns `run.recorded_metrics`), else what it trains from: the
    model folder of the stage before it (SFT: the arm's stage-1 model, its own or the one it
    shares; DPO: its own SFT model) with that model's chat tokenizer, and the usable samples it
    aligns on (its selection, or the whole pool for an arm with `align_on: pool`). `cfg` is the
    run's config (with its arms)."""
    record = begin(cfg, run, f"{name}/{arm}", force)
    if record is None:
        return None
    previous, kind = STARTS_FROM[name]
    arm_cfg = find_arm(cfg, arm).config
    start = run.finished_model(stage1_owner(cfg, arm) if previous == "cpt" else arm, previous)
    tokenizer = chat_tokenizer(arm_cfg, start)
    selection = selection_owner(cfg, arm)
    samples = (run.selection(selection) if selection else run.data / "pool") / POOL_FILES[kind]
    rows = usable_rows(samples, kind)
    return AlignmentStage(name, arm, run, arm_cfg, record, start, tokenizer, rows, samples)


def started_with(cfg: Config, stage: str) -> dict:
    """What the checkpoints of alignment `stage` ("sft", "dpo") may only be resumed with
    (`train_and_save`), besides the samples: its config section (`cfg`: the arm's config), the
    seed, the model settings."""
    return {
        stage: getattr(cfg, stage).model_dump(mode="json"),
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
    }

"""Stage 2b: supervised fine-tuning on instructions, loss on response tokens only (design §1).

The plain `transformers.Trainer` does it: the collator right-pads and labels the prompt
IGNORE_INDEX, and the model's own loss then averages over response tokens (normalised across
gradient-accumulation steps by the Trainer). No subclass is needed. TRL's SFTTrainer was not
used because it truncates the whole sequence (keep_start; keep_end is deprecated), while we
must cut the prompt from the left and keep the response, and it would add a second
tokenisation path beside the one selection, DPO and evaluation share (mixcpt.responses).
"""

from __future__ import annotations

from functools import partial

from transformers import Trainer

from mixcpt.align.samples import alignment_inputs
from mixcpt.config import Config
from mixcpt.config.arms import find_arm
from mixcpt.fingerprints import begin
from mixcpt.models import model_from
from mixcpt.responses import encode_chat, features, fit_to_length, pad_batch
from mixcpt.rundir import RunDir
from mixcpt.stage_inputs import file_hash
from mixcpt.train.arguments import training_arguments
from mixcpt.train.resumable import train_and_save, trained_samples


def sft_features(
    rows: list[dict], tokenizer, max_length: int, source: str
) -> list[dict[str, list[int]]]:
    """`features` (input_ids, labels) per instruction row through the chat template; prompt
    tokens labelled IGNORE_INDEX."""
    encoded = [
        [encode_chat(tokenizer, row["messages"][:-1], row["messages"][-1]["content"])]
        for row in rows
    ]
    return [features(*sample[0]) for sample in fit_to_length(encoded, max_length, source)]


def run_sft(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """SFT of `arm` from its stage-1 model, with the arm's sft settings, on its selected
    instructions ("mixcpt") or on the whole pool ("baseline", `align_on: pool`). Saves
    `run.stage(arm, "sft")`; returns the metrics recorded in results.json (those of the existing
    folder when it was built from the same inputs and not `force`)."""
    key, final, work = f"{arm}/sft", run.stage(arm, "sft"), run.work(arm, "sft")
    record = begin(cfg, run, f"sft/{arm}", force)
    if record is None:
        return run.recorded_metrics(key)
    start, tokenizer, rows, path = alignment_inputs(cfg, run, arm, "cpt", "instruction")
    cfg = find_arm(cfg, arm).config
    train_set = sft_features(rows, tokenizer, cfg.sft.max_length, str(path))

    model = model_from(cfg.model, start, trained=True)
    args = training_arguments(
        cfg.sft.training, work, cfg.seed, cfg.model.dtype, remove_unused_columns=False
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
    )
    return train_and_save(
        trainer,
        tokenizer,
        final,
        work,
        run,
        key,
        lambda output: {
            "train_loss": output.training_loss,
            "runtime_s": output.metrics["train_runtime"],
            "steps": output.global_step,
            "log_history": trainer.state.log_history,
            "n_samples": len(train_set),
            "samples": trained_samples(trainer),  # n_samples x epochs, or as max_steps allows
        },
        record=record,
        started_with={**started_with(cfg, "sft"), "samples": file_hash(path)},
        dtype=cfg.model.dtype,
    )


def started_with(cfg: Config, stage: str) -> dict:
    """What the checkpoints of alignment `stage` ("sft", "dpo") may only be resumed with
    (`train_and_save`), besides the samples: its config section (`cfg`: the arm's config), the
    seed, the model settings."""
    return {
        stage: getattr(cfg, stage).model_dump(mode="json"),
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
    }

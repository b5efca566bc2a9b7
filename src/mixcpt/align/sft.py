"""Stage 2b: supervised fine-tuning on instructions, loss on response tokens only (design §1).

The collator right-pads and labels the prompt IGNORE_INDEX; the loss is the mean cross-entropy
over response tokens (normalised across gradient-accumulation steps by the Trainer), the value
of the model's own loss. `SFTTrainer` computes it with stage 1's fused chunked cross-entropy
(`fused_loss.cpt_loss`) from the final hidden states, so the output layer runs on response
positions only and the [B, T, V] logits are never made (benchmarks/RESULTS.md: against TRL's
SFTTrainer). TRL's SFTTrainer was not used because it truncates the whole sequence (keep_start;
keep_end is deprecated), while we must cut the prompt from the left and keep the response, and it
would add a second tokenisation path beside the one selection, DPO and evaluation share
(mixcpt.responses).
"""

from __future__ import annotations

from functools import partial

from transformers import Trainer

from mixcpt.align.stage import begin_alignment
from mixcpt.config import Config
from mixcpt.data.packing import IGNORE_INDEX
from mixcpt.losses import next_token_labels
from mixcpt.models import model_from
from mixcpt.responses import (
    encode_chat,
    features,
    fit_to_length,
    pad_batch,
    padded_forward_inputs,
)
from mixcpt.rundir import RunDir
from mixcpt.train.forward import LossForward
from mixcpt.train.fused_loss import cpt_loss
from mixcpt.train.resumable import trained_samples
from mixcpt.train.trainer import shards_parameters


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


class SFTTrainer(Trainer):
    """Trainer whose loss is the model's own (mean cross-entropy over the labelled tokens, summed
    and divided by Trainer's `num_items_in_batch` when it counts them), computed by
    `fused_loss.cpt_loss` from the final hidden states (`train.forward.LossForward`, which falls
    back to logits where the output layer is not a plain linear one)."""

    def __init__(self, *args, loss_chunk_size: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # Trainer counts the labelled tokens of each step
        self.loss_chunk_size = loss_chunk_size
        # FSDP and DeepSpeed ZeRO-3 gather the output layer's weight only inside forward
        self.sft_forward = LossForward(self.model, hidden=not shards_parameters(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # the caller wants the logits (prediction_step): the model's own loss
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        rows, weight, _ = self.sft_forward(model, inputs, padded_forward_inputs(inputs))
        labels = next_token_labels(inputs["labels"])  # [B, T]: the target of position t
        with self.accelerator.autocast():  # the output layer in the forward's precision
            result = cpt_loss(
                rows, labels, None, weight, lssd_weight=0.0, chunk_size=self.loss_chunk_size
            )
        loss = result.loss  # mean over this micro-batch's labelled tokens
        if num_items_in_batch is not None:  # -> their sum / the labelled tokens of the step
            loss = loss * (labels != IGNORE_INDEX).sum() / num_items_in_batch
            # the count spans processes, and DDP averages gradients (as Trainer.compute_loss
            # scales a model's own loss)
            if self.args.average_tokens_across_devices:
                loss = loss * (
                    self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu
                )
        return loss


def run_sft(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """SFT of `arm` from its stage-1 model, with the arm's sft settings, on its selected
    instructions ("mixcpt") or on the whole pool ("traditional", `align_on: pool`). Saves
    `run.stage(arm, "sft")`; returns the metrics recorded in results.json (those of the existing
    folder when it was built from the same inputs and not `force`)."""
    stage = begin_alignment(cfg, run, arm, "sft", force)
    if stage is None:
        return run.recorded_metrics(f"{arm}/sft")
    cfg, tokenizer = stage.cfg, stage.tokenizer
    train_set = sft_features(stage.rows, tokenizer, cfg.sft.max_length, str(stage.samples))

    trainer = SFTTrainer(
        model=model_from(cfg.model, stage.start, trained=True),
        args=stage.training_arguments(),
        train_dataset=train_set,
        data_collator=partial(pad_batch, pad_token_id=tokenizer.pad_token_id),
    )
    return stage.train_and_save(
        trainer,
        lambda output: {
            "train_loss": output.training_loss,
            "runtime_s": output.metrics["train_runtime"],
            "steps": output.global_step,
            "log_history": trainer.state.log_history,
            "n_samples": len(train_set),
            "samples": trained_samples(trainer),  # n_samples x epochs, or as max_steps allows
        },
    )

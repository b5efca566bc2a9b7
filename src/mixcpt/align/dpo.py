"""Stage 2c: DPO on preference pairs with the SFT model as reference (design §1, §4).

`DPOTrainer` is a thin `transformers.Trainer` subclass whose `compute_loss` calls
`mixcpt.losses.dpo_loss`, so the §4 function is exactly what trains. Reference log-probs are
either precomputed once before training (`dpo.precompute_ref`: the policy starts as the
reference, so the same model scores them, under the autocast its training forward runs in, and no
second copy is ever held) or taken from a frozen reference copy (stored in `model.dtype`) at every
step.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial

import torch
from transformers import PreTrainedModel, Trainer

from mixcpt.align.stage import begin_alignment
from mixcpt.config import Config
from mixcpt.losses import dpo_loss
from mixcpt.models import model_from
from mixcpt.responses import (
    encode_chat,
    features,
    fit_to_length,
    pad_batch,
    padded_forward_inputs,
    response_logps,
    score_responses,
    share_prompt,
)
from mixcpt.rundir import RunDir
from mixcpt.train.forward import LossForward
from mixcpt.train.resumable import trained_samples
from mixcpt.train.trainer import shards_parameters

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def pair_features(rows: list[dict], tokenizer, max_length: int, source: str) -> list[dict]:
    """Per preference row: {"chosen": features, "rejected": features}, both through the chat
    template with the same prompt ids (`share_prompt`), left-truncated alike so that the longer
    response fits."""
    encoded = [
        share_prompt([encode_chat(tokenizer, row["messages"], row[side]) for side in SIDES])
        for row in rows
    ]
    return [
        {"chosen": features(*chosen), "rejected": features(*rejected)}
        for chosen, rejected in fit_to_length(encoded, max_length, source)
    ]


def pair_collate(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows, the B chosen sequences first, then the B rejected ones, so the
    policy scores both sides in a single forward; precomputed reference log-probs ride along."""
    # [2B, T]
    batch = pad_batch([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_token_id)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows])  # [B]
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows])  # [B]
    return batch


def precompute_reference(
    model: PreTrainedModel, pairs: list[dict], batch_size: int, pad_token_id: int
) -> None:
    """Add ref_chosen_logps / ref_rejected_logps (summed response log-probs under `model`, in the
    caller's autocast) to each pair. Under DDP every process scores all pairs: the result is the
    same everywhere and needs no gather."""
    sums, _ = score_responses(
        model,
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
        batch_size,
        pad_token_id,
        "reference log-probs",
    )
    for pair, chosen, rejected in zip(pairs, sums[: len(pairs)], sums[len(pairs) :]):
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = chosen, rejected


class DPOTrainer(Trainer):
    """Trainer whose loss is `mixcpt.losses.dpo_loss`; batches come from `pair_collate`.

    `log` is overridden too (as TRL does) to add the mean rewards of the steps since the last log.
    """

    loss_is_scaled_for_ga = False  # dpo_loss is a mean over this micro-batch's pairs

    def __init__(self, *args, beta: float, ref_model: PreTrainedModel | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.ref_model = (
            None
            if ref_model is None
            else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        )
        self.reward_logs = defaultdict(list)
        # The output layer runs on the response positions only, from the final hidden states, as
        # in `score_responses` (which computes the precomputed reference log-probs): FSDP and
        # DeepSpeed ZeRO-3 gather its weight only inside forward, so they use logits.
        hidden = not shards_parameters(self)
        self.policy_forward = LossForward(self.model, hidden=hidden)
        self.ref_forward = None if ref_model is None else LossForward(ref_model, hidden=hidden)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = padded_forward_inputs(inputs)
        if return_outputs:  # the caller wants the logits (prediction_step): make them
            outputs = model(**batch)
            rows, weight = outputs.logits, None  # [2B, T, V]
        else:
            rows, weight, outputs = self.policy_forward(model, inputs, batch)  # [2B, T, H | V]
        with self.accelerator.autocast():  # the output layer in the forward's precision
            policy_logps, _ = response_logps(rows, inputs["labels"], weight)  # [2B]
        policy_chosen, policy_rejected = policy_logps.chunk(2)  # [B], [B]
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            with torch.no_grad(), self.accelerator.autocast():
                ref_rows, ref_weight, _ = self.ref_forward(self.ref_model, inputs, batch)
                ref_logps, _ = response_logps(ref_rows, inputs["labels"], ref_weight)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta
        )
        chosen_rewards, rejected_rewards = self.accelerator.gather_for_metrics(
            (chosen_rewards, rejected_rewards)
        )
        self.reward_logs["rewards/chosen"].append(chosen_rewards.mean().item())
        self.reward_logs["rewards/rejected"].append(rejected_rewards.mean().item())
        self.reward_logs["rewards/accuracies"].append(
            (chosen_rewards > rejected_rewards).float().mean().item()
        )
        self.reward_logs["rewards/margins"].append(
            (chosen_rewards - rejected_rewards).mean().item()
        )
        return (loss, {"logits": outputs.logits}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({name: sum(values) / len(values) for name, values in self.reward_logs.items()})
        self.reward_logs.clear()
        super().log(logs, start_time)


def run_dpo(cfg: Config, run: RunDir, arm: str, force: bool = False) -> dict:
    """DPO of `arm` from its SFT model, with the arm's dpo settings, on its selected preference
    pairs ("mixcpt") or on the whole pool ("traditional", `align_on: pool`). Saves
    `run.stage(arm, "dpo")`; returns the metrics recorded in results.json
    (those of the existing folder when it was built from the same inputs and not `force`)."""
    stage = begin_alignment(cfg, run, arm, "dpo", force)
    if stage is None:
        return run.recorded_metrics(f"{arm}/dpo")
    cfg, tokenizer, start = stage.cfg, stage.tokenizer, stage.start
    train_set = pair_features(stage.rows, tokenizer, cfg.dpo.max_length, str(stage.samples))

    model, ref_model = model_from(cfg.model, start, trained=True), None
    if not cfg.dpo.precompute_ref:  # a frozen copy, stored in model.dtype
        ref_model = model_from(cfg.model, start).eval().requires_grad_(False)
    args = stage.training_arguments()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        beta=cfg.dpo.beta,
        ref_model=ref_model,
        data_collator=partial(pair_collate, pad_token_id=tokenizer.pad_token_id),
    )
    if cfg.dpo.precompute_ref:
        model.to(args.device)
        # under the autocast the policy's forward runs in: policy == reference at step 0
        with trainer.accelerator.autocast():
            precompute_reference(
                model, train_set, args.per_device_train_batch_size, tokenizer.pad_token_id
            )
        model.train()

    def metrics_of(output) -> dict:
        history = trainer.state.log_history
        last = log_history_metrics(history, ("loss", *REWARD_METRICS))  # of the last logged steps
        return {
            "final_loss": last.get("loss"),
            "train_loss": output.training_loss,
            "reward_accuracy": last.get("rewards/accuracies"),
            "reward_margin": last.get("rewards/margins"),
            "chosen_reward": last.get("rewards/chosen"),
            "rejected_reward": last.get("rewards/rejected"),
            "runtime_s": output.metrics["train_runtime"],
            "steps": output.global_step,
            "n_pairs": len(train_set),
            "pairs": trained_samples(trainer),  # n_pairs x epochs, or as max_steps allows
            "log_history": history,
        }

    return stage.train_and_save(trainer, metrics_of)


def log_history_metrics(log_history: list[dict], names: tuple[str, ...]) -> dict:
    """The last logged value of each of `names` (absent names are left out)."""
    last = {}
    for entry in log_history:
        last.update({k: entry[k] for k in names if k in entry})
    return last

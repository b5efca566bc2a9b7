import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainerCallback

from mixcpt.align import stage as alignment_stage
from mixcpt.align.dpo import pair_collate, pair_features, run_dpo
from mixcpt.losses import dpo_loss
from mixcpt.models import load_model, load_tokenizer
from mixcpt.responses import score_responses
from mixcpt.train import resumable


def test_dpo_loss_matches_the_closed_form():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) * 3 for _ in range(4))
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3)
    assert torch.allclose(loss, -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr))).mean())
    assert torch.allclose(chosen_rewards, 0.3 * (pc - rc))
    assert torch.allclose(rejected_rewards, 0.3 * (pr - rr))


def test_pair_collate_puts_chosen_rows_first(tiny_tokenizer, pool_rows):
    pairs = pair_features(pool_rows[1][:2], tiny_tokenizer, max_length=64, source="pool")
    for pair, ref in zip(pairs, (-1.0, -2.0)):
        pair["ref_chosen_logps"], pair["ref_rejected_logps"] = ref, ref - 1
    batch = pair_collate(pairs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for i, side in ((0, "chosen"), (1, "chosen"), (2, "rejected"), (3, "rejected")):
        ids = pairs[i % 2][side]["input_ids"]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -2.0]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0]


def margins(folder, pairs, pad_token_id) -> torch.Tensor:
    """log p(chosen) - log p(rejected) per pair under the model in `folder`."""
    sums, _ = score_responses(
        load_model(folder),
        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
        4,
        pad_token_id,
        "test",
    )
    sums = torch.tensor(sums)
    return sums[: len(pairs)] - sums[len(pairs) :]


@pytest.fixture
def sft_run(run):
    """The run with its cpt models copied as the sft stage."""
    for arm in ("mixcpt", "baseline"):
        shutil.copytree(run.stage(arm, "cpt"), run.stage(arm, "sft"))
    return run


def test_dpo_steps_raise_the_chosen_minus_rejected_margin(make_cfg, sft_run, pool_rows, caplog):
    run = sft_run
    cfg = make_cfg(
        dpo={
            "training": {
                "max_steps": 6,
                "per_device_batch_size": 4,
                "learning_rate": 3e-3,
                "logging_steps": 1,
                "lr_scheduler": "constant",
            }
        }
    )
    with caplog.at_level(logging.WARNING):
        metrics = run_dpo(cfg, run, "baseline")
    assert "skipped 1 of 9 preference samples (1 with identical chosen and rejected)" in caplog.text

    tok = load_tokenizer(run.stage("baseline", "sft"))
    pairs = pair_features(pool_rows[1][:8], tok, cfg.dpo.max_length, "pool")
    before = margins(run.stage("baseline", "sft"), pairs, tok.pad_token_id)
    after = margins(run.stage("baseline", "dpo"), pairs, tok.pad_token_id)
    assert (after - before).mean() > 0
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] > 0.5
    assert metrics["reward_margin"] == pytest.approx(
        metrics["chosen_reward"] - metrics["rejected_reward"]
    )
    assert metrics["final_loss"] < metrics["log_history"][0]["loss"]
    assert metrics["n_pairs"] == 8 and metrics["steps"] == 6
    assert metrics == run.read_results()["stages"]["baseline/dpo"]
    assert AutoModelForCausalLM.from_pretrained(run.stage("baseline", "dpo")).num_parameters() > 0
    assert not run.work("baseline", "dpo").exists()


def test_precomputed_and_frozen_reference_train_the_same(make_cfg, sft_run, pool_rows):
    """The precomputed reference log-probs are those a frozen copy of the SFT model gives."""
    run = sft_run
    run.selection("mixcpt").mkdir(parents=True)
    shutil.copy(run.data / "pool" / "preferences.jsonl", run.selection("mixcpt"))
    frozen = run_dpo(make_cfg(dpo={"precompute_ref": False}), run, "mixcpt")
    precomputed = run_dpo(make_cfg(), run, "baseline")
    first_losses = [e["loss"] for e in frozen["log_history"] if "loss" in e]
    assert first_losses == pytest.approx(
        [e["loss"] for e in precomputed["log_history"] if "loss" in e], rel=1e-4
    )
    assert first_losses[0] == pytest.approx(
        0.6931, abs=1e-3
    )  # policy == reference at step 1: -log sigmoid(0)


class StepSpy(TrainerCallback):
    """The weights and gradients of the first optimizer step: before it, and the weights after."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def one_bf16_dpo_step(make_cfg, run, monkeypatch) -> tuple[StepSpy, dict]:
    """One DPO step (2 pairs) at lr 5e-7 of the baseline arm with `model.dtype: bfloat16`,
    precomputed reference: what `StepSpy` saw, and the stage's metrics."""
    spy = StepSpy()

    def train_and_save(trainer, *args, **kwargs):
        trainer.add_callback(spy)
        return resumable.train_and_save(trainer, *args, **kwargs)

    monkeypatch.setattr(alignment_stage, "train_and_save", train_and_save)
    training = {"max_steps": 1, "learning_rate": 5e-7, "per_device_batch_size": 2}
    cfg = make_cfg(model={"dtype": "bfloat16"}, dpo={"training": training})
    return spy, run_dpo(cfg, run, "baseline")


def test_a_bf16_dpo_step_at_lr_5e_7_moves_every_weight_with_a_gradient(
    make_cfg, sft_run, monkeypatch
):
    """AdamW's first step moves each weight by about lr = 5e-7 (where |grad| >> its eps, 1e-8):
    below half a bf16 unit for any |w| above 2e-4, so bf16 weights would keep almost all of it;
    the float32 masters take all of it."""
    spy, _ = one_bf16_dpo_step(make_cfg, sft_run, monkeypatch)
    for name, grad in spy.grads.items():
        assert spy.after[name].dtype == torch.float32
        moved, pushed = spy.after[name] != spy.before[name], grad.abs() > 1e-6
        assert pushed.any() and moved[pushed].all(), name


def test_bf16_dpo_starts_with_zero_rewards(make_cfg, sft_run, monkeypatch):
    """The precomputed reference log-probs are computed under the policy's autocast, so at step 0,
    where the policy is the reference, every reward is 0 (scored without it, in pure bf16: 9e-5).
    Larger batches pad the two passes to other widths, which leaves float32 rounding (2e-6)."""
    _, metrics = one_bf16_dpo_step(make_cfg, sft_run, monkeypatch)
    (first,) = [e for e in metrics["log_history"] if "rewards/margins" in e]
    for reward in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[reward]) < 1e-6

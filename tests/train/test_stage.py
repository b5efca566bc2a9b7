"""The cpt stage: trains an arm, writes a plain HF folder and its metrics, skips and resumes."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixcpt.config.arms import find_arm
from mixcpt.errors import ConfigError
from mixcpt.train import resumable, stage
from mixcpt.train.stage import run_cpt
from mixcpt.train.teachers import OnlineTeacher
from mixcpt.train.trainer import LSSDTrainer

from .conftest import DOMAIN, GENERAL


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_mixcpt_arm_trains_saves_a_plain_model_and_records_metrics(cpt_run):
    make_config, run = cpt_run
    metrics = run_cpt(make_config(), run, "mixcpt")

    final = run.stage("mixcpt", "cpt")
    trained, base = weights(final), weights(run.base)
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert (final / "tokenizer.json").exists()
    assert not run.work("mixcpt", "cpt").exists()
    recorded = run.read_results()["stages"]["mixcpt/cpt"]
    assert recorded["steps"] == metrics["steps"] == 4
    logged = [h for h in recorded["log_history"] if "lssd_loss" in h]
    assert logged and all(0 <= h["teacher_top1_match"] <= 1 for h in logged)

    # A second call finds the folder and returns what was recorded, without training.
    assert run_cpt(make_config(), run, "mixcpt") == recorded


def test_baseline_arm_is_plain_cross_entropy_on_the_domain_stream(cpt_run, monkeypatch):
    make_config, run = cpt_run
    monkeypatch.setattr(
        stage, "load_teacher", lambda *a, **k: pytest.fail("the baseline must not build a teacher")
    )
    metrics = run_cpt(make_config(), run, "baseline")
    assert metrics["lssd_weight"] == 0 and metrics["teacher"] is None
    assert any("ce_loss" in h for h in metrics["log_history"])
    assert not any("lssd_loss" in h for h in metrics["log_history"])
    assert run.stage("baseline", "cpt").exists()


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
    cpt_run, monkeypatch
):
    make_config, run = cpt_run
    cfg = make_config(teacher="online", lssd_weight=0.0)  # plain CE: quick
    run_cpt(cfg, run, "mixcpt")  # the reference, uninterrupted: 4 steps
    expected = weights(run.stage("mixcpt", "cpt"))

    real_step = LSSDTrainer.training_step
    steps_run = []

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3 and not steps_run:
            raise Interrupted
        return real_step(self, *args, **kwargs)

    def count(self, *args, **kwargs):
        steps_run.append(self.state.global_step)
        return real_step(self, *args, **kwargs)

    shutil.rmtree(run.stage("mixcpt", "cpt"))
    monkeypatch.setattr(LSSDTrainer, "training_step", crash_at_step_3)
    with pytest.raises(Interrupted):
        run_cpt(cfg, run, "mixcpt")
    assert not run.stage("mixcpt", "cpt").exists()
    assert (run.work("mixcpt", "cpt") / "checkpoint-2").exists()

    monkeypatch.setattr(LSSDTrainer, "training_step", count)
    metrics = run_cpt(cfg, run, "mixcpt")
    assert steps_run == [2, 3]  # only the steps after the checkpoint
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps"] == 4
    resumed = weights(run.stage("mixcpt", "cpt"))
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=1e-5)


def test_lora_teacher_trains_adapters_and_saves_merged_plain_weights(cpt_run):
    make_config, run = cpt_run
    cfg = make_config(teacher="lora", lora={"r": 4, "alpha": 8}, training={"learning_rate": 1e-2})
    metrics = run_cpt(cfg, run, "mixcpt")
    assert any("lssd_loss" in h for h in metrics["log_history"])
    trained, base = weights(run.stage("mixcpt", "cpt")), weights(run.base)
    assert trained.keys() == base.keys()  # merged: no lora_A/lora_B tensors left
    assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize("teacher", ["online", "lora"])
def test_a_bf16_run_trains_float32_weights_and_saves_bf16(cpt_run, monkeypatch, teacher):
    """`model.dtype: bfloat16` is the storage of the frozen weights (the online teacher, a LoRA
    base) and of the saved folder; what trains is float32."""
    make_config, run = cpt_run
    lora = {"lora": {"r": 4, "alpha": 8}} if teacher == "lora" else {}
    cfg = make_config(teacher=teacher, training={"max_steps": 2}, **lora)
    cfg.model.dtype = "bfloat16"
    dtypes, save = {}, resumable.save_trained_model

    def spy(trainer, *args):  # the trained model's dtypes, before a LoRA merge
        params = list(trainer.model.parameters())
        frozen = trainer.teacher.model.parameters() if teacher == "online" else params
        dtypes["trained"] = {p.dtype for p in params if p.requires_grad}
        dtypes["frozen"] = {p.dtype for p in frozen if not p.requires_grad}
        return save(trainer, *args)

    monkeypatch.setattr(resumable, "save_trained_model", spy)
    run_cpt(cfg, run, "mixcpt")

    assert dtypes == {"trained": {torch.float32}, "frozen": {torch.bfloat16}}
    trained = AutoModelForCausalLM.from_pretrained(run.stage("mixcpt", "cpt"))
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    base = weights(run.base)
    assert any(not torch.equal(t.float(), base[k]) for k, t in trained.state_dict().items())


def test_cache_teacher_builds_its_cache_in_the_run_folder(cpt_run):
    make_config, run = cpt_run
    metrics = run_cpt(make_config(teacher="cache", cache_top_k=8), run, "mixcpt")
    assert (run.root / "teacher_cache" / "meta.json").exists()
    assert (
        metrics["teacher_cache_bytes_per_token"] == 8 * (2 + 4) + 4
    )  # fp16 values, int32 ids, fp32 tail
    assert any("lssd_loss" in h for h in metrics["log_history"])


def test_both_loss_weights_zero_is_a_config_error(cpt_run):
    make_config, _ = cpt_run
    with pytest.raises(ConfigError, match="ce_weight and lssd_weight"):
        make_config(ce_weight=0, lssd_weight=0)


def test_alpha_half_trains_the_loss_of_both_weights_half_and_the_baseline_stays_plain_ce(
    cpt_run, tiny_model, tiny_tokenizer
):
    make_config, run = cpt_run
    blocks = stage.training_blocks(run, "mix")
    batch = {k: torch.as_tensor(np.stack([blocks[i][k] for i in range(3)])) for k in blocks[0]}
    teacher = OnlineTeacher(tiny_model, tiny_model.config.vocab_size)

    def loss_of(cfg):
        cpt = find_arm(cfg, "mixcpt").config.cpt
        trainer = stage.cpt_trainer(
            cfg, cpt, tiny_model, tiny_tokenizer, blocks, teacher, run.work("mixcpt", "cpt")
        )
        with torch.no_grad():
            return trainer.compute_loss(tiny_model, batch).item()

    alpha = loss_of(make_config(alpha=0.5))
    assert alpha == loss_of(make_config(ce_weight=0.5, lssd_weight=0.5))
    assert alpha != loss_of(make_config())  # the weights matter: 1 and 1 by default

    baseline = find_arm(make_config(alpha=0.2), "baseline").config.cpt
    assert (baseline.ce_weight, baseline.lssd_weight, baseline.alpha) == (1.0, 0.0, None)


def test_both_arms_train_on_the_same_domain_tokens(cpt_run, tiny_tokenizer, monkeypatch):
    """Mix-CPT's budget is 8 steps of 8 blocks: two passes over D_MIX's 32 blocks; the baseline
    then makes two passes over D_K (fewer steps). The domain tokens of every D_MIX block Mix-CPT
    trains on are, as a multiset, the tokens the baseline trains on."""
    make_config, run = cpt_run
    cfg = make_config(lssd_weight=0.0, training={"max_steps": 8, "per_device_batch_size": 8})
    fed = []  # (arm, block indices) of every micro-batch
    real_loss = LSSDTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        fed.append((self.args.output_dir, inputs["block_index"].tolist()))
        return real_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LSSDTrainer, "compute_loss", record)
    metrics = {arm: run_cpt(cfg, run, arm) for arm in ("mixcpt", "baseline")}

    def trained_tokens(arm, keep):
        """Counter of the token ids the arm's batches held at flat positions `keep` marks."""
        blocks = stage.training_blocks(run, {"mixcpt": "mix", "baseline": "domain"}[arm])
        flat = np.asarray(blocks.input_ids).reshape(-1)
        rows = [i for out, batch in fed if out == str(run.work(arm, "cpt")) for i in batch]
        size = blocks.block_size
        return Counter(
            int(flat[p]) for i in rows for p in range(i * size, (i + 1) * size) if keep[p]
        )

    # D_MIX alternates domain and general documents (the fixture): mark the domain ones' tokens
    lengths = [len(tiny_tokenizer(t).input_ids) + 1 for pair in zip(DOMAIN, GENERAL) for t in pair]
    mix = stage.training_blocks(run, "mix")
    assert len(mix) == 32
    is_domain = np.zeros(len(mix) * mix.block_size, dtype=bool)
    is_domain[: sum(lengths)] = np.repeat(np.arange(len(lengths)) % 2 == 0, lengths)
    domain = stage.training_blocks(run, "domain")
    is_real = np.arange(len(domain) * domain.block_size) < domain.n_tokens

    from_mix, from_domain = trained_tokens("mixcpt", is_domain), trained_tokens("baseline", is_real)
    assert from_mix == from_domain
    assert sum(from_mix.values()) == 2 * domain.n_tokens
    assert metrics["mixcpt"]["domain_tokens"] == metrics["baseline"]["domain_tokens"]
    assert metrics["mixcpt"]["domain_tokens"] == 2 * domain.n_tokens
    recorded = run.read_results()["data"]["domain_tokens_trained"]
    assert recorded == {"mixcpt": 2 * domain.n_tokens, "baseline": 2 * domain.n_tokens}


def test_with_max_steps_the_baseline_makes_as_many_passes_over_d_k(cpt_run):
    make_config, run = cpt_run
    # 32 blocks of D_MIX, 3 per step: 11 steps a pass (the last batch holds 2 blocks)
    cfg = make_config(training={"max_steps": 22, "per_device_batch_size": 3})
    matched = stage.domain_matched(find_arm(cfg, "baseline").config.cpt, run, processes=1)
    assert (matched.training.max_steps, matched.training.num_epochs) == (-1, 2.0)
    # two processes take 6 blocks a step: 6 steps a pass
    matched = stage.domain_matched(find_arm(cfg, "baseline").config.cpt, run, processes=2)
    assert matched.training.num_epochs == 22 / 6
    assert matched.training.learning_rate == cfg.cpt.training.learning_rate

"""The forgetting monitor of arms without a teacher: KL(base || model) on the probe while
training, logged as kl_to_base."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from transformers import TrainerControl, TrainerState

from mixcpt.data.packing import IndexedBlocks
from mixcpt.train import forgetting_monitor
from mixcpt.train.forgetting_monitor import (
    REFERENCE_FILE,
    attach_forgetting_monitor,
    base_reference,
    kl_to_reference,
    probe_positions,
    probe_windows,
)
from mixcpt.train.forward import LossForward
from mixcpt.train.stage import run_cpt
from mixcpt.train.trainer import LSSDTrainer

from .conftest import DOMAIN, GENERAL, HELD_OUT, pack
from .test_stage import Interrupted
from .test_trainer import make_trainer

PROBE = "\n\n".join(HELD_OUT + GENERAL[:3])
MAX_LENGTH = 24  # several windows, so the windowing and the batching are exercised


@pytest.fixture
def blocks(tmp_path, tiny_tokenizer):
    """The domain documents, packed: what the trainer trains on."""
    pack(tiny_tokenizer, DOMAIN, tmp_path / "domain", "domain-v1")
    return IndexedBlocks(tmp_path / "domain")


def dense_kl(base, model, windows, k: int | None = None) -> float:
    """Mean over the probe's predicted tokens of KL(p_base || p_model) in float64, on the whole
    vocabulary, one window at a time; with `k`, of the two distributions coarsened to the base's
    top-k tokens and one bucket for the rest."""
    base, model = copy.deepcopy(base).double().eval(), copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w["input_ids"][:-1]])  # the last id predicts nothing
            log_q = base(ids).logits.log_softmax(-1)[0]  # [T, V]
            log_p = model(ids).logits.log_softmax(-1)[0]
            if k is not None:
                top = log_q.topk(k, dim=-1).indices  # [T, k]
                q, p = log_q.exp().gather(-1, top), log_p.exp().gather(-1, top)
                log_q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1).log()  # [T, k + 1]
                log_p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1).log()
            total += (log_q.exp() * (log_q - log_p)).sum().item()
            count += ids.shape[1]
    return total / count


def test_a_teacherless_trainer_logs_the_exact_kl_to_the_base_on_the_probe(
    tiny_model,
    tiny_tokenizer,
    blocks,
    tmp_path,
):
    base = copy.deepcopy(tiny_model)
    model = copy.deepcopy(tiny_model).train()
    trainer = make_trainer(
        model, blocks, tmp_path, lssd_weight=0.0, processing_class=tiny_tokenizer
    )
    (tmp_path / "probe.txt").write_text(PROBE)
    vocab = len(tiny_tokenizer)
    monitor = attach_forgetting_monitor(
        trainer, str(tmp_path / "probe.txt"), MAX_LENGTH, 2, 16, tmp_path / "work", top_k=vocab
    )
    trainer.train()

    logged = [(h["step"], h["kl_to_base"]) for h in trainer.state.log_history if "kl_to_base" in h]
    assert [step for step, _ in logged] == [2, 4]  # every logging step
    assert all(math.isfinite(kl) and kl > 0 for _, kl in logged)
    windows = probe_windows(tiny_tokenizer, PROBE, MAX_LENGTH)
    assert len(windows) > 2
    # k = V: the bucketed KL is the full one; the last log is of the final weights
    assert logged[-1][1] == pytest.approx(dense_kl(base, model, windows), rel=1e-4)
    assert (tmp_path / "work" / REFERENCE_FILE).is_file()
    assert monitor.seconds > 0


def test_with_k_below_the_vocabulary_the_kl_is_a_lower_bound(tiny_model, tiny_tokenizer):
    base = copy.deepcopy(tiny_model)
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = probe_windows(tiny_tokenizer, PROBE, MAX_LENGTH)

    def positions(m):
        return probe_positions(m, LossForward(m), windows, 3, tiny_tokenizer.pad_token_id)

    dense = dense_kl(base, model, windows)
    with torch.no_grad():
        for k, chunk in ((8, 5), (len(tiny_tokenizer), 7)):
            reference = base_reference(positions(base), k, chunk)
            assert reference.ids.shape[-1] == k
            kl = kl_to_reference(positions(model), reference, chunk)
            if k < len(tiny_tokenizer):
                assert 0 < kl < dense
                assert kl == pytest.approx(dense_kl(base, model, windows, k), rel=1e-4)
            else:
                assert kl == pytest.approx(dense, rel=1e-4)
            assert kl_to_reference(positions(base), reference, chunk) == pytest.approx(0, abs=1e-5)


def test_the_probe_leaves_the_model_in_train_mode_and_logs_only_on_logging_steps(
    tiny_model,
    tiny_tokenizer,
    blocks,
    tmp_path,
):
    trainer = make_trainer(
        tiny_model.train(),
        blocks,
        tmp_path,
        lssd_weight=0.0,
        processing_class=tiny_tokenizer,
    )
    (tmp_path / "probe.txt").write_text(PROBE)
    monitor = attach_forgetting_monitor(
        trainer, str(tmp_path / "probe.txt"), MAX_LENGTH, 2, 16, tmp_path / "work"
    )
    state, control = TrainerState(), TrainerControl()
    monitor.on_train_begin(trainer.args, state, control, model=tiny_model)
    assert tiny_model.training
    state.global_step = 1
    monitor.on_step_end(trainer.args, state, control, model=tiny_model)
    assert trainer.step_logs == {}  # not a logging step
    control.should_log = True
    monitor.on_step_end(trainer.args, state, control, model=tiny_model)
    assert trainer.step_logs["kl_to_base"] == pytest.approx(0, abs=1e-5)  # still the base
    assert tiny_model.training


def test_without_a_probe_the_monitor_is_off_and_says_so(
    tiny_model,
    tiny_tokenizer,
    blocks,
    tmp_path,
    capsys,
):
    trainer = make_trainer(tiny_model, blocks, tmp_path, lssd_weight=0.0)
    assert attach_forgetting_monitor(trainer, None, MAX_LENGTH, 2, 16, tmp_path) is None
    assert "no eval.probe configured" in capsys.readouterr().out


def test_a_resumed_teacherless_arm_reads_the_base_reference_saved_before_its_first_step(
    cpt_run, monkeypatch, capsys
):
    make_config, run = cpt_run
    cfg = make_config(lssd_weight=0.0)  # plain CE: no teacher
    probe = run.root.parent / "probe.txt"
    probe.write_text(PROBE)
    cfg.eval.probe, cfg.eval.max_length = str(probe), MAX_LENGTH

    real_step = LSSDTrainer.training_step

    def crash_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise Interrupted
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(LSSDTrainer, "training_step", crash_at_step_3)
    with pytest.raises(Interrupted):
        run_cpt(cfg, run, "mixcpt")  # CE only: no teacher
    work = run.work("mixcpt", "cpt")
    assert (work / REFERENCE_FILE).is_file() and (work / "checkpoint-2").is_dir()

    monkeypatch.setattr(LSSDTrainer, "training_step", real_step)
    # the model has trained by now: a reference made from it would not be the base's
    monkeypatch.setattr(
        forgetting_monitor, "base_reference", lambda *a: pytest.fail("recomputed on resume")
    )
    metrics = run_cpt(cfg, run, "mixcpt")
    logged = [h for h in metrics["log_history"] if "kl_to_base" in h]
    # step 2 from the checkpoint's history, step 4 measured by the resumed run
    assert [h["step"] for h in logged] == [2, 4] and logged[-1]["kl_to_base"] > 0
    assert metrics["kl_probe_s"] > 0

    # a resume without the saved reference turns the monitor off, with one line
    monkeypatch.setattr(forgetting_monitor, "base_reference", base_reference)
    shutil.rmtree(run.stage("mixcpt", "cpt"))
    run.update_results("stages", "mixcpt/cpt", {})
    monkeypatch.setattr(LSSDTrainer, "training_step", crash_at_step_3)
    with pytest.raises(Interrupted):
        run_cpt(cfg, run, "mixcpt", force=True)
    (work / REFERENCE_FILE).unlink()
    monkeypatch.setattr(LSSDTrainer, "training_step", real_step)
    capsys.readouterr()
    metrics = run_cpt(cfg, run, "mixcpt")
    assert [h["step"] for h in metrics["log_history"] if "kl_to_base" in h] == [2]
    assert capsys.readouterr().err.count("forgetting monitor off") == 1

"""The main job end to end: `mixcpt demo --quick` trains both arms and evaluates every stage."""

import json

import pytest
from transformers import AutoModelForCausalLM

from mixcpt.cli import main
from mixcpt.rundir import TRAINED_STAGES

ARMS = ("mixcpt", "traditional")  # the arms of --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    return out


def test_every_stage_of_both_arms_is_a_loadable_model(quick_run):
    for arm in ARMS:
        for stage in TRAINED_STAGES:
            model = AutoModelForCausalLM.from_pretrained(quick_run / arm / stage)
            assert model.num_parameters() > 100_000
            # and `tensorboard --logdir DIR` shows its training curves
            assert list((quick_run / "logs" / arm / stage).glob("events.out.tfevents.*"))


def test_results_hold_both_arms_at_every_stage_and_the_report_exists(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    rows = {(r["arm"], r["stage"]): r for r in results["eval"]["rows"]}
    assert set(rows) == {("base", "base")} | {(a, s) for a in ARMS for s in TRAINED_STAGES}
    assert all(r["status"] == "ok" for r in rows.values())
    assert {
        "mixcpt/cpt",
        "traditional/cpt",
        "mixcpt/sft",
        "traditional/sft",
        "mixcpt/dpo",
        "traditional/dpo",
    } <= set(results["stages"])
    assert (quick_run / "report.html").stat().st_size > 10_000 and (
        quick_run / "report.md"
    ).exists()
    assert (quick_run / "config.yaml").exists()  # stages can be rerun by hand


def test_stage_one_gains_domain_knowledge_over_the_base(quick_run):
    rows = {
        (r["arm"], r["stage"]): r["scores"]
        for r in json.loads((quick_run / "results.json").read_text())["eval"]["rows"]
    }
    # 60 questions and a quick base too weak to answer its own general questions well: the
    # better arm gains clearly, and Mix-CPT (half its tokens general) does not lose
    base = rows[("base", "base")]["domain_qa_mc"]["acc_norm"]
    cpt = {arm: rows[(arm, "cpt")]["domain_qa_mc"]["acc_norm"] for arm in ARMS}
    assert max(cpt.values()) >= base + 0.1 and cpt["mixcpt"] >= base, (base, cpt)


def test_a_rerun_reuses_everything(quick_run, monkeypatch):
    import mixcpt.train.stage as cpt_stage

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(cpt_stage, "LSSDTrainer", no_training)
    before = json.loads((quick_run / "results.json").read_text())["stages"]["mixcpt/cpt"]
    assert main(["demo", "--quick", "--output", str(quick_run)]) == 0
    assert json.loads((quick_run / "results.json").read_text())["stages"]["mixcpt/cpt"] == before

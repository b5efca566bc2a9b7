"""examples/quickstart.yaml runs as shipped: every stage of both arms, from the committed tiny model
and data, with nothing prepared beforehand and nothing downloaded."""

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from mixcpt.cli import main
from mixcpt.config import load_config
from mixcpt.fingerprints import nodes
from mixcpt.rundir import TRAINED_STAGES

ARMS = ("mixcpt", "baseline")  # what a config without `arms:` trains

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """The run folder of one `mixcpt run` of the quickstart, shared by the tests below."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    assert main(["run", str(QUICKSTART), "--output", str(out)]) == 0
    return out


def test_quickstart_runs_every_stage_end_to_end(quickstart):
    out = quickstart
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    results = json.loads((out / "results.json").read_text())
    rows = {(r["arm"], r["stage"]): r for r in results["eval"]["rows"]}
    assert set(rows) == {("base", "base")} | {(a, s) for a in ARMS for s in TRAINED_STAGES}
    assert all(r["status"] == "ok" for r in rows.values())
    assert {f"{a}/{s}" for a in ARMS for s in TRAINED_STAGES} <= set(results["stages"])

    model = AutoModelForCausalLM.from_pretrained(out / "mixcpt" / "dpo")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000

    # `tensorboard --logdir DIR` shows every training stage: the logs outlive the work folders
    for arm in ARMS:
        for stage in TRAINED_STAGES:
            assert list((out / "logs" / arm / stage).glob("events.out.tfevents.*")), (arm, stage)
    events = EventAccumulator(str(out / "logs" / "mixcpt" / "cpt"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    terms = {"ce_loss", "lssd_loss", "teacher_top1_match", "learning_rate", "grad_norm"}
    assert {f"train/{name}" for name in terms} <= scalars
    training = load_config(QUICKSTART).cpt.training
    steps = [event.step for event in events.Scalars("train/lssd_loss")]
    assert steps == list(range(training.logging_steps, training.max_steps + 1, 10))


def test_every_stage_is_timed_and_a_rerun_keeps_the_timings_of_what_it_reuses(quickstart, capsys):
    results = json.loads((quickstart / "results.json").read_text())
    timing = results["timing"]
    assert set(timing) == set(nodes(load_config(QUICKSTART)))
    for node, entry in timing.items():
        assert entry["wall_s"] > 0 and entry["processed"] > 0 and entry["per_s"] > 0, node
        assert not entry["reused"], node
    assert timing["cpt/mixcpt"]["unit"] == "tokens"
    assert timing["cpt/mixcpt"]["processed"] == results["stages"]["mixcpt/cpt"]["tokens"]
    md = (quickstart / "report.md").read_text()
    table = md.split("## Time per stage", 1)[1]
    assert all(f"| {node} | " in table for node in timing if node != "report")
    assert "Whole run: " in table

    # every stage reused but the report: its timing is new, the others keep theirs
    assert main(["run", str(QUICKSTART), "--output", str(quickstart), "--force", "report"]) == 0
    printed = capsys.readouterr().out
    assert re.search(
        r"mixcpt: report: done in [0-9.]+ s \(\d+ stages, [0-9.,]+ stages/s\)", printed
    )
    again = json.loads((quickstart / "results.json").read_text())["timing"]
    for node, entry in again.items():
        if node != "report":
            assert entry == {**timing[node], "reused": True}, node
    assert "| cpt/mixcpt | " in (quickstart / "report.md").read_text()
    assert "| reused |" in (quickstart / "report.md").read_text()

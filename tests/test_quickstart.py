"""examples/quickstart.yaml runs as shipped: every stage of both arms, from the committed tiny model
and data, with nothing prepared beforehand and nothing downloaded."""

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from mixcpt.cli import main
from mixcpt.config import load_config
from mixcpt.rundir import ARMS, TRAINED_STAGES

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def test_quickstart_runs_every_stage_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(QUICKSTART), "--output", str(out)]) == 0

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

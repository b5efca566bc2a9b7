"""Arms: which stage each arm builds itself and which it shares, and a run of several arms end to
end (stage 1 trained once for the arms that share it, a selection per select setting, a row per
arm in the eval table and the report)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mixcpt.cli import main
from mixcpt.config import config_from_dict, load_config
from mixcpt.fingerprints import nodes
from mixcpt.pipeline import selection_owner, stage1_owner, stage_arms

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def arms_cfg(tmp_path, tiny_model_dir):
    """arms_cfg(arms) -> Config of a tiny run training `arms`, with preference data."""
    (tmp_path / "domain.txt").write_text("Zorbax orbits Vega.\n")
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')

    def make(arms):
        raw = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"domain": [{"path": "domain.txt"}], "preferences": [{"path": "prefs.jsonl"}]},
            "arms": arms,
        }
        return config_from_dict(raw, root=tmp_path)

    return make


def test_arms_with_the_same_stage_one_settings_share_one_model_and_selection(arms_cfg):
    cfg = arms_cfg(
        [
            "mixcpt",
            "traditional",
            "mixture-ce",
            "random-k",
            "whole-pool",
            {"name": "random-again", "like": "random-k"},
            {"name": "k-50", "like": "mixcpt", "select": {"k": 50}},
            {"name": "lssd-half", "like": "mixcpt", "cpt": {"lssd_weight": 0.5}},
            # a performance knob changes no model: still mixcpt's stage 1
            {"name": "big-chunks", "like": "whole-pool", "cpt": {"loss_chunk_size": 4096}},
        ]
    )
    assert stage_arms(cfg, "cpt") == ["mixcpt", "traditional", "mixture-ce", "lssd-half"]
    owners = {arm: stage1_owner(cfg, arm) for arm in ("random-k", "whole-pool", "big-chunks")}
    assert owners == dict.fromkeys(owners, "mixcpt")
    assert stage_arms(cfg, "select") == ["mixcpt", "mixture-ce", "random-k", "k-50", "lssd-half"]
    assert selection_owner(cfg, "random-again") == "random-k"
    assert selection_owner(cfg, "traditional") is selection_owner(cfg, "whole-pool") is None
    assert len(stage_arms(cfg, "sft")) == len(stage_arms(cfg, "dpo")) == 9


def test_the_distillation_objective_makes_a_stage_one_model_of_its_own(arms_cfg):
    cfg = arms_cfg(
        [
            "mixcpt",
            "mixture-kl",
            "mixture-mft",
            {"name": "mft-half", "like": "mixture-mft", "cpt": {"mft_threshold": 0.5}},
            # the threshold is mft's alone: still mixture-kl's model
            {"name": "kl-margin", "like": "mixture-kl", "cpt": {"mft_threshold": 0.5}},
            # without a teacher the objective changes nothing: mixture-ce's model
            {"name": "ce-kl", "like": "mixture-ce", "cpt": {"objective": "kl"}},
            "mixture-ce",
        ]
    )
    assert cfg.cpt.objective == "lssd"  # the default, mixcpt's
    assert stage_arms(cfg, "cpt") == ["mixcpt", "mixture-kl", "mixture-mft", "mft-half", "ce-kl"]
    assert stage1_owner(cfg, "kl-margin") == "mixture-kl"
    assert stage1_owner(cfg, "mixture-ce") == "ce-kl"


def test_baseline_dpo_and_no_preferences_decide_which_arms_run_dpo(arms_cfg, tmp_path):
    cfg = arms_cfg(["mixcpt", "baseline", {"name": "sft-only", "like": "mixcpt", "run_dpo": False}])
    assert stage_arms(cfg, "dpo") == ["mixcpt", "baseline"]
    raw = {
        "model": {"path": cfg.model.path},
        "data": {"domain": [{"path": "domain.txt"}], "preferences": [{"path": "prefs.jsonl"}]},
        "baseline": {"dpo": False},
    }
    assert stage_arms(config_from_dict(raw, root=tmp_path), "dpo") == ["mixcpt"]
    del raw["data"]["preferences"]
    assert stage_arms(config_from_dict(raw, root=tmp_path), "dpo") == []


def test_replay_and_lora_train_stage_one_models_of_their_own(arms_cfg, tmp_path):
    """Stage 1 of mixcpt (cache teacher), replay (CE on D_R) and lora (adapters, the LoRA-disabled
    base as teacher): three models, none shared, and the teacher cache left as mixcpt built it."""
    import torch
    from transformers import AutoModelForCausalLM

    from mixcpt.pipeline import run_stage
    from mixcpt.rundir import RunDir

    texts = [f"The river R{i} flows past the town T{i} to the sea." for i in range(40)]
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = arms_cfg(["mixcpt"])  # for the tiny model and the data files it writes
    training = {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-2}
    data = {"block_size": 16, "replay": [{"path": "general.jsonl"}], "replay_share": 0.5}
    raw = {
        "model": {"path": cfg.model.path},
        "data": {**cfg.data.model_dump(include={"domain", "preferences"}), **data},
        "cpt": {"teacher": "cache", "training": training},
        "arms": ["mixcpt", "replay", "lora"],
    }
    cfg = config_from_dict(raw, root=tmp_path)
    assert stage_arms(cfg, "cpt") == ["mixcpt", "replay", "lora"]
    run = RunDir(tmp_path / "run")
    run_stage("data", cfg, run)
    run_stage("cpt", cfg, run, arm="mixcpt")
    cache = {f: f.stat().st_mtime_ns for f in (run.root / "teacher_cache").iterdir()}
    run_stage("cpt", cfg, run)
    assert {f: f.stat().st_mtime_ns for f in (run.root / "teacher_cache").iterdir()} == cache

    def weights(arm):
        return AutoModelForCausalLM.from_pretrained(run.stage(arm, "cpt")).state_dict()

    mixcpt = weights("mixcpt")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path).state_dict()
    for arm in ("replay", "lora"):
        trained = weights(arm)
        assert trained.keys() == base.keys()  # lora: adapters merged, a plain model folder
        assert any(not torch.equal(trained[k], mixcpt[k]) for k in trained), arm
        assert any(not torch.equal(trained[k], base[k]) for k in trained), arm
    stages = run.read_results()["stages"]
    assert stages["lora/cpt"]["teacher"] == "lora" and stages["replay/cpt"]["teacher"] is None
    # the replay arm's passes over D_R hold D_K's domain tokens once each
    domain = run.read_results()["data"]["domain"]["n_tokens"]
    assert stages["replay/cpt"]["domain_tokens"] == round(stages["replay/cpt"]["passes"] * domain)


@pytest.fixture(scope="module")
def three_arms(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of examples/arms.yaml cut to mixcpt, random-k and whole-pool with a
    few steps each, run once by `mixcpt run`."""
    root = tmp_path_factory.mktemp("arms")
    shutil.copytree(EXAMPLES / "quickstart", root / "quickstart")
    raw = yaml.safe_load((EXAMPLES / "arms.yaml").read_text())
    raw["arms"] = ["mixcpt", "random-k", "whole-pool"]
    raw["cpt"]["training"].update(max_steps=8, save_steps=8)
    raw["sft"]["training"]["max_steps"] = 4
    raw["dpo"]["training"]["max_steps"] = 2
    config = root / "arms.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = root / "run"
    assert main(["run", str(config), "--output", str(out)]) == 0
    return config, out


def test_arms_that_share_stage_one_train_it_once(three_arms, capsys):
    config, out = three_arms
    assert nodes(load_config(config)) == [
        "data",
        "cpt/mixcpt",
        "select/mixcpt",
        "select/random-k",
        *[
            f"{stage}/{arm}"
            for stage in ("sft", "dpo")
            for arm in ("mixcpt", "random-k", "whole-pool")
        ],
        "eval",
        "report",
    ]
    results = json.loads((out / "results.json").read_text())
    assert [k for k in results["stages"] if k.endswith("/cpt")] == ["mixcpt/cpt"]
    assert not (out / "random-k" / "cpt").exists() and not (out / "whole-pool" / "cpt").exists()

    # one arm's stage 1 on its own: the shared one, reused, and said so
    assert main(["cpt", str(config), "--output", str(out), "--arm", "random-k"]) == 0
    printed = capsys.readouterr().out
    assert "cpt/random-k: shares cpt/mixcpt" in printed and "cpt/mixcpt: reused" in printed
    assert main(["cpt", str(config), "--output", str(out), "--arm", "nope"]) == 2
    assert "its arms: mixcpt, random-k, whole-pool" in capsys.readouterr().err


def test_each_arm_aligns_on_its_own_samples(three_arms):
    _, out = three_arms
    stages = json.loads((out / "results.json").read_text())["stages"]

    def selected(arm: str) -> set[str]:
        rows = (out / arm / "selection" / "selection.jsonl").read_text().splitlines()
        return {r["id"] for r in map(json.loads, rows) if r["selected"]}

    assert stages["random-k/select"]["strategy"] == "random"
    assert stages["random-k/select"]["stage1"] == "mixcpt"
    for arm in ("mixcpt", "random-k"):
        assert stages[f"{arm}/select"]["instructions"]["selected"] == 20
    assert selected("mixcpt") != selected("random-k")
    assert stages["mixcpt/sft"]["n_samples"] == stages["random-k/sft"]["n_samples"] == 20
    pool = stages["mixcpt/select"]["instructions"]
    assert stages["whole-pool/sft"]["n_samples"] == pool["pool"] - pool["skipped"] > 20


def test_eval_and_report_have_every_arm(three_arms):
    _, out = three_arms
    results = json.loads((out / "results.json").read_text())
    rows = {(r["arm"], r["stage"]): r for r in results["eval"]["rows"]}
    arms = ("mixcpt", "random-k", "whole-pool")
    assert set(rows) == {("base", "base")} | {(a, s) for a in arms for s in ("cpt", "sft", "dpo")}
    assert all(r["status"] == "ok" for r in rows.values())
    shared = rows[("random-k", "cpt")]
    assert shared["shared_with"] == "mixcpt"
    assert shared["scores"] == rows[("mixcpt", "cpt")]["scores"]
    assert rows[("random-k", "sft")]["scores"] != rows[("mixcpt", "sft")]["scores"]

    assert [a["arm"] for a in results["arms"]] == list(arms)
    md = (out / "report.md").read_text()
    table = md.split("## Arms", 1)[1].split("## Results", 1)[0]
    assert (
        "| random-k | random-k | mix stream, 1 CE + 1 LSSD (online teacher) (the model of " in table
    )
    assert "k=20 at random" in table and "| the whole pool |" in table
    assert "| 20 samples, 4 steps |" in table
    assert "| random-k | cpt (= mixcpt) |" in md


def test_a_changed_arm_rebuilds_only_that_arm(three_arms, tmp_path, capsys):
    config, finished = three_arms
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    raw = yaml.safe_load(config.read_text())
    raw["arms"][1] = {"name": "random-k", "select": {"k": 10}}
    changed = config.with_name("k10.yaml")
    changed.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["status", str(out), "--config", str(changed)]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in printed}
    stale = {node for node, state in lines.items() if state.startswith("stale")}
    assert stale == {"select/random-k", "sft/random-k", "dpo/random-k", "eval", "report"}
    assert lines["select/random-k"] == "stale (select.k changed: 20 -> 10)"
    assert lines["cpt/mixcpt"] == "done; also used by random-k, whole-pool"

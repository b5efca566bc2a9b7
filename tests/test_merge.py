"""Merge arms: an arm's stage-1 model interpolated toward the base without training, written as any
stage's model folder, a node of the build graph, and a row of the eval table; and the names that
`--arms` accepts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mixcpt.cli import main
from mixcpt.config import Config, config_from_dict, load_config
from mixcpt.config.arm_names import arms_named
from mixcpt.config.arms import ArmConfig
from mixcpt.errors import ConfigError
from mixcpt.fingerprints import RECORD_FILE, nodes, recorded
from mixcpt.merge import merge_into, merged_model, save_merged
from mixcpt.rundir import RunDir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MERGE = {"name": "baseline-merge-0.25", "like": "merge", "of": "baseline", "base_weight": 0.25}


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_each_tensor_moves_toward_the_base_by_its_weight(weight, make_tiny_llama):
    arm, base = make_tiny_llama(50, seed=0, tied=True), make_tiny_llama(50, seed=1, tied=True)
    before = {n: t.clone() for n, t in arm.state_dict().items()}
    base_state = base.state_dict()
    asked = []

    def base_tensor(names):
        asked.append(names)
        return base_state[names[0]]

    merge_into(arm, base_tensor, weight)
    for name, tensor in arm.state_dict().items():
        expected = (1 - weight) * before[name] + weight * base_state[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    # the tied embeddings are one tensor, merged once, and still tied
    assert ["model.embed_tokens.weight", "lm_head.weight"] in asked
    assert sum("lm_head.weight" in names for names in asked) == 1
    assert arm.lm_head.weight.data_ptr() == arm.model.embed_tokens.weight.data_ptr()


@pytest.fixture
def two_models(tmp_path, tiny_tokenizer, make_tiny_llama):
    """(config in bfloat16, arm folder, base folder) of two tiny Llamas with untied embeddings."""
    folders = []
    for seed, name in ((0, "arm"), (1, "base")):
        make_tiny_llama(len(tiny_tokenizer), seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    (tmp_path / "d.txt").write_text("a domain document")
    raw = {"model": {"path": "base", "dtype": "bfloat16"}, "data": {"domain": [{"path": "d.txt"}]}}
    return config_from_dict(raw, root=tmp_path), *folders


def test_the_merge_is_a_loadable_folder_in_the_model_dtype(two_models, tmp_path):
    cfg, arm, base = two_models
    final = tmp_path / "merged"
    merged, tokenizer, tensors = merged_model(cfg, arm, str(base), 0.25)
    save_merged(merged, tokenizer, final, {"build": "x"})
    model = AutoModelForCausalLM.from_pretrained(final)
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((final / RECORD_FILE).read_text()) == {"build": "x"}
    assert (final / "tokenizer.json").is_file() and list(final.glob("*.safetensors"))
    arm_state = AutoModelForCausalLM.from_pretrained(arm).state_dict()
    base_state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert tensors == len(arm_state)  # untied: every tensor on its own
    for name, tensor in model.state_dict().items():
        # float32 sums of the arm's weights as loaded (bfloat16) and the base's as stored (float32
        # here), rounded to bfloat16 once
        a, b = arm_state[name].bfloat16().float(), base_state[name]
        assert torch.equal(tensor, (0.75 * a + 0.25 * b).bfloat16()), name


def test_a_base_stored_in_another_layout_is_merged_as_transformers_loads_it(
    two_models, monkeypatch
):
    import mixcpt.merge

    cfg, arm, base = two_models
    streamed = merged_model(cfg, arm, str(base), 0.25)[0].state_dict()
    # files whose tensor names are not the model's: none of them found
    monkeypatch.setattr(mixcpt.merge, "weight_files", lambda path: [])
    loaded = merged_model(cfg, arm, str(base), 0.25)[0].state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in streamed.items())


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of the quickstart cut to the baseline arm and its merge at 0.25, a
    few steps, no preference data and one benchmark (and the probe), run once by `mixcpt run`."""
    root = tmp_path_factory.mktemp("merge")
    shutil.copytree(EXAMPLES / "quickstart", root / "quickstart")
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    del raw["data"]["preferences"], raw["baseline"]
    raw["arms"] = ["baseline", MERGE]
    raw["cpt"]["training"].update(max_steps=4, save_steps=4)
    raw["sft"]["training"]["max_steps"] = 2
    raw["eval"]["benchmarks"] = [b for b in raw["eval"]["benchmarks"] if b["name"] == "general_mc"]
    config = root / "merge.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = root / "run"
    assert main(["run", str(config), "--output", str(out)]) == 0
    return config, out


def test_a_merge_arm_is_a_stage_one_row_of_the_eval_table(merged_run):
    config, out = merged_run
    assert nodes(load_config(config)) == [
        "data",
        "cpt/baseline",
        "cpt/baseline-merge-0.25",
        "sft/baseline",
        "eval",
        "report",
    ]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["arm"], r["stage"]): r for r in results["eval"]["rows"]}
    assert set(rows) == {("base", "base"), ("baseline-merge-0.25", "cpt")} | {
        ("baseline", s) for s in ("cpt", "sft", "dpo")
    }
    merged = rows[("baseline-merge-0.25", "cpt")]
    assert merged["status"] == "ok" and merged["merge"] == {"of": "baseline", "base_weight": 0.25}
    assert merged["intervals"]["kl_to_base"] is not None
    kl = {arm: rows[(arm, "cpt")]["retention"]["kl_to_base"] for arm in ("baseline", MERGE["name"])}
    assert 0 < kl[MERGE["name"]] < kl["baseline"]  # a quarter of the way back toward the base
    stage = results["stages"]["baseline-merge-0.25/cpt"]
    assert stage["merge_of"] == "baseline" and stage["tokens"] == 0
    assert not (out / ".work" / "baseline-merge-0.25-cpt").exists()
    md = (out / "report.md").read_text()
    assert "| baseline-merge-0.25 | cpt (= 0.75·baseline + 0.25·base) |" in md
    assert "no training: (1−λ)·baseline + λ·base, λ = 0.25" in md


def test_the_merge_is_reused_and_rebuilt_when_the_arm_it_merges_is(merged_run, tmp_path, capsys):
    config, finished = merged_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    run, node = RunDir(out), "cpt/baseline-merge-0.25"
    build = recorded(run, node)["build"]
    capsys.readouterr()
    assert main(["cpt", str(config), "--output", str(out)]) == 0
    assert f"{node}: reused" in capsys.readouterr().out
    assert recorded(run, node)["build"] == build

    assert main(["cpt", str(config), "--output", str(out), "--arm", "baseline", "--force"]) == 0
    capsys.readouterr()
    assert main(["status", str(out), "--config", str(config)]) == 0
    assert f"{node}  stale (cpt/baseline was rebuilt)" in capsys.readouterr().out
    assert main(["cpt", str(config), "--output", str(out), "--arm", MERGE["name"]]) == 0
    assert f"{node}: rebuilding (cpt/baseline was rebuilt)" in capsys.readouterr().out
    assert recorded(run, node)["build"] != build


@pytest.mark.parametrize(
    "entry, message",
    [
        ({**MERGE, "of": "mixcpt"}, "arms.baseline-merge-0.25.of: a merge arm names the trained"),
        ({**MERGE, "base_weight": None}, "arms.baseline-merge-0.25.base_weight: a merge arm needs"),
        ({**MERGE, "base_weight": 1.5}, "base_weight: Input should be less than or equal to 1"),
        (
            {**MERGE, "cpt": {"lssd_weight": 0}},
            "baseline-merge-0.25.cpt: a merge arm trains nothing",
        ),
        (
            {"name": "x", "like": "mixcpt", "of": "baseline"},
            "arms.x.of: only a merge arm (like: merge) sets it",
        ),
    ],
)
def test_a_bad_merge_arm_is_named_with_its_key(tmp_path, entry, message):
    (tmp_path / "d.txt").write_text("a domain document")
    raw = {"model": {"path": "m"}, "data": {"domain": [{"path": "d.txt"}]}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({**raw, "arms": ["baseline", entry]}, root=tmp_path)


def test_arms_are_named_by_builtin_config_or_merge_names_or_all():
    configured = [ArmConfig(name="mixcpt"), ArmConfig(name="short", like="mixcpt")]
    chosen = arms_named(["short", "short-merge-0.5", "baseline"], configured)
    assert [e.name for e in chosen] == ["short", "short-merge-0.5", "baseline"]
    assert (chosen[1].like, chosen[1].of, chosen[1].base_weight) == ("merge", "short", 0.5)
    everything = [e.name for e in arms_named(["all"], configured)]
    assert everything[:2] == ["mixcpt", "traditional"] and "whole-pool" in everything
    assert "baseline" not in everything  # the older name of traditional: not trained twice
    assert everything[-6:] == [
        f"{arm}-merge-{w}" for arm in ("mixcpt", "traditional") for w in ("0.25", "0.5", "0.75")
    ]
    for bad in ("nope", "mixcpt-merge-2", "nope-merge-0.5"):
        with pytest.raises(ConfigError, match=f"no arm '{bad}'; the arms are mixcpt, short, "):
            arms_named([bad], configured)
    with pytest.raises(ConfigError, match="--arms: arms.mixcpt-merge-0.5.of: a merge arm names"):
        arms_named(["baseline", "mixcpt-merge-0.5"], configured)  # a merge of an arm left out


def test_demo_arms_are_written_to_the_run_config_before_anything_is_built(tmp_path, capsys):
    from mixcpt.demo.run import demo_config

    raw = demo_config(RunDir(tmp_path), quick=True, seed=0, arms=["mixcpt", "mixcpt-merge-0.5"])
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    Config.model_validate(written)  # a valid config (its files are written later)
    assert (
        written["arms"]
        == raw["arms"]
        == [
            "mixcpt",
            {"name": "mixcpt-merge-0.5", "like": "merge", "of": "mixcpt", "base_weight": 0.5},
        ]
    )
    out = tmp_path / "bad"
    assert main(["demo", "--quick", "--output", str(out), "--arms", "mixcpt,lasso"]) == 2
    err = capsys.readouterr().err
    assert "no arm 'lasso'; the arms are mixcpt, traditional, mixture-ce" in err
    assert not (out / "world").exists()

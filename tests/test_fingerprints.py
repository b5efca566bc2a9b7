"""The run folder is a build graph: a rerun rebuilds exactly what a change affects, and `mixcpt
status` says what a rerun would do. Rebuilds are read from the records and file times, not from
the log."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from mixcpt import fingerprints, stage_inputs
from mixcpt.cli import main
from mixcpt.config import config_from_dict
from mixcpt.errors import UserError
from mixcpt.fingerprints import RECORD_FILE, begin, difference, inputs_now, recorded
from mixcpt.rundir import RunDir
from mixcpt.runlock import LOCK_NAME

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NODES = [
    "data",
    "cpt/mixcpt",
    "cpt/baseline",
    "select/mixcpt",
    "sft/mixcpt",
    "sft/baseline",
    "dpo/mixcpt",
    "dpo/baseline",
    "eval",
    "report",
]


def copy_project(dest: Path) -> Path:
    """examples/quickstart.yaml and the files beside it, copied to `dest`; returns the config."""
    shutil.copytree(EXAMPLES / "quickstart", dest / "quickstart")
    shutil.copy(EXAMPLES / "quickstart.yaml", dest / "quickstart.yaml")
    return dest / "quickstart.yaml"


def edited(config: Path, name: str, **changes) -> Path:
    """A copy of `config` beside it, named `name`, with dotted keys set: edited(c, "x.yaml",
    **{"cpt.lssd_weight": 0})."""
    raw = yaml.safe_load(config.read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        section = raw
        for key in path:
            section = section[key]
        section[last] = value
    out = config.with_name(name)
    out.write_text(yaml.safe_dump(raw))
    return out


def builds(out: Path) -> dict[str, tuple]:
    """node -> (build id, time of the file that shows it was written) of every output."""
    run = RunDir(out)
    stamp = {
        "data": out / "data" / "mix" / "input_ids.npy",
        "select/mixcpt": out / "mixcpt" / "selection" / "selection.jsonl",
        "eval": out / "results.json",
        "report": out / "report.html",
    }
    state = {}
    for node in NODES:
        stage, _, arm = node.partition("/")
        path = stamp.get(node, out / arm / stage / "model.safetensors")
        record = recorded(run, node)
        # eval and report live in results.json, which every stage rewrites: their build id says
        state[node] = (record["build"], None if node == "eval" else path.stat().st_mtime_ns)
    return state


def rebuilt(before: dict, out: Path) -> set[str]:
    after = builds(out)
    return {node for node in NODES if after[node] != before[node]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The quickstart's config, in a copy of the project that tests may change."""
    return copy_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def finished(project, tmp_path_factory) -> Path:
    """A run folder of the quickstart with every stage done."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(project), "--output", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of the finished run folder (file times kept) for one test to change."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_rerun_with_nothing_changed_rebuilds_nothing(project, run_copy):
    before = builds(run_copy)
    assert main(["run", str(project), "--output", str(run_copy)]) == 0
    assert rebuilt(before, run_copy) == set()


def test_a_stage_one_setting_rebuilds_that_arm_from_stage_one_on(project, run_copy):
    before = builds(run_copy)
    results = json.loads((run_copy / "results.json").read_text())
    config = edited(project, "lssd_off.yaml", **{"cpt.lssd_weight": 0})
    assert main(["run", str(config), "--output", str(run_copy)]) == 0

    assert rebuilt(before, run_copy) == {
        "cpt/mixcpt",
        "select/mixcpt",
        "sft/mixcpt",
        "dpo/mixcpt",
        "eval",
        "report",
    }
    now = json.loads((run_copy / "results.json").read_text())
    assert now["stages"]["mixcpt/cpt"]["lssd_weight"] == 0.0
    assert now["stages"]["baseline/cpt"] == results["stages"]["baseline/cpt"]
    assert now["data"] == results["data"]
    assert not (run_copy / ".work").exists() or not any((run_copy / ".work").iterdir())


def test_a_changed_benchmark_file_rebuilds_only_eval_and_report(tmp_path, run_copy):
    config = copy_project(tmp_path / "moved")  # elsewhere: where the files lie does not count
    before = builds(run_copy)
    assert main(["run", str(config), "--output", str(run_copy)]) == 0
    assert rebuilt(before, run_copy) == set()

    bench = tmp_path / "moved" / "quickstart" / "bench" / "domain_mc.jsonl"
    lines = bench.read_text().splitlines(keepends=True)
    bench.write_text("".join(lines[:-1]))  # one question fewer
    assert main(["run", str(config), "--output", str(run_copy)]) == 0
    assert rebuilt(before, run_copy) == {"eval", "report"}


def test_force_rebuilds_the_named_stage_and_every_later_one(project, run_copy):
    before = builds(run_copy)
    assert main(["run", str(project), "--output", str(run_copy), "--force", "sft"]) == 0
    assert rebuilt(before, run_copy) == {
        "sft/mixcpt",
        "sft/baseline",
        "dpo/mixcpt",
        "dpo/baseline",
        "eval",
        "report",
    }


def status(capsys, *argv) -> tuple[int, dict[str, str]]:
    """(exit code, {node: state and reason}) of `mixcpt status ARGV`; stderr is left to read."""
    code = main(["status", *map(str, argv)])
    lines = capsys.readouterr().out.splitlines()[1:]  # after the heading
    return code, {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}


def test_status_of_a_fresh_a_finished_and_a_stale_folder(project, finished, tmp_path, capsys):
    (tmp_path / "fresh").mkdir()
    code, fresh = status(capsys, tmp_path / "fresh", "--config", project)
    assert code == 0 and fresh == dict.fromkeys(NODES, "missing")

    code, done = status(capsys, finished, "--config", project)
    assert code == 0 and done == dict.fromkeys(NODES, "done")

    changed = edited(project, "lssd_half.yaml", **{"cpt.lssd_weight": 0.5})
    code, stale = status(capsys, finished, "--config", changed)
    assert code == 0
    assert stale["cpt/mixcpt"] == "stale (cpt.lssd_weight changed: 1.0 -> 0.5)"
    assert stale["select/mixcpt"] == "stale (cpt/mixcpt is stale)"
    assert stale["dpo/mixcpt"] == "stale (sft/mixcpt is stale)"
    assert stale["eval"] == stale["report"] == "stale (cpt/mixcpt is stale)"
    assert {n for n, s in stale.items() if s == "done"} == {
        "data",
        "cpt/baseline",
        "sft/baseline",
        "dpo/baseline",
    }


def test_status_reads_the_config_in_the_run_folder_or_asks_for_one(project, run_copy, capsys):
    assert main(["status", str(run_copy)]) == 2
    assert "--config CONFIG" in capsys.readouterr().err
    (run_copy / "config.yaml").write_text(
        project.read_text().replace("quickstart/", f"{project.parent}/quickstart/")
    )
    code, done = status(capsys, run_copy)
    assert code == 0 and done == dict.fromkeys(NODES, "done")


# ---- the parts, on tiny inputs ------------------------------------------------------------------


@pytest.fixture
def tiny_cfg(tmp_path, tiny_model_dir):
    """tiny_cfg(**{"dotted.key": value}) -> Config of a run with the tiny model and one file."""
    (tmp_path / "domain.txt").write_text("Zorbax orbits Vega.\n")

    def make(**changes):
        raw = {"model": {"path": str(tiny_model_dir)}, "data": {"domain": [{"path": "domain.txt"}]}}
        for dotted, value in changes.items():
            *path, last = dotted.split(".")
            section = raw
            for key in path:
                section = section.setdefault(key, {})
            section[last] = value
        return config_from_dict(raw, root=tmp_path)

    return make


def test_only_settings_that_change_an_output_count(tiny_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    base = {node: inputs_now(tiny_cfg(), run, node) for node in NODES[:-1] if "dpo" not in node}

    def changed(**change) -> set[str]:
        cfg = tiny_cfg(**change)
        return {node for node, inputs in base.items() if inputs_now(cfg, run, node) != inputs}

    # the baseline arm trains with plain CE whatever the LSSD settings say
    assert changed(**{"cpt.lssd_weight": 0.5}) == {"cpt/mixcpt"}
    assert changed(**{"cpt.temperature": 2.0}) == {"cpt/mixcpt"}
    # alpha is the two weights it sets: alpha 0.5 is the same build as both weights 0.5
    assert changed(**{"cpt.alpha": 0.5}) == {"cpt/mixcpt"}
    halves = tiny_cfg(**{"cpt.ce_weight": 0.5, "cpt.lssd_weight": 0.5})
    assert inputs_now(tiny_cfg(**{"cpt.alpha": 0.5}), run, "cpt/mixcpt") == inputs_now(
        halves, run, "cpt/mixcpt"
    )
    assert changed(**{"cpt.training.learning_rate": 1e-4}) == {"cpt/mixcpt", "cpt/baseline"}
    # a TrainingArguments field passed through counts like ours; where and how often logs go not
    assert changed(**{"sft.training.optim": "adafactor"}) == {"sft/mixcpt", "sft/baseline"}
    assert changed(**{"cpt.training.report_to": "none"}) == set()
    assert changed(**{"cpt.compile_loss": True}) == set()  # the same loss, computed faster
    assert changed(**{"sft.training.logging_first_step": True}) == set()
    assert changed(**{"select.k": 5}) == {"select/mixcpt"}
    assert changed(**{"select.fas_quantile": 0.3}) == set()  # only fas reads it; the default is ppl
    assert changed(**{"eval.max_length": 64}) == {"eval"}
    assert changed(**{"data.block_size": 64}) == {"data"}
    for knob in (
        "cpt.loss_chunk_size",
        "cpt.training.logging_steps",
        "cpt.training.save_steps",
        "select.batch_size",
        "eval.batch_size",
        "data.tokenize_batch_size",
    ):
        assert changed(**{knob: 3}) == set(), knob


def test_difference_names_the_first_changed_input():
    old = {
        "config": {"cpt.lssd_weight": 1.0, "cpt.teacher": "online"},
        "files": {"eval.probe": "sha256:a"},
        "stages": {"data": "b1"},
        "mixcpt": "0.1.0",
    }
    config = {**old["config"], "cpt.lssd_weight": 0.0}
    assert difference(old, {**old, "config": config}) == "cpt.lssd_weight changed: 1.0 -> 0.0"
    probe = {"eval.probe": "sha256:b"}
    assert difference(old, {**old, "files": probe}) == "eval.probe: file contents changed"
    assert difference(old, {**old, "stages": {"data": "b2"}}) == "data was rebuilt"
    assert difference(old, {**old, "stages": {"data": None}}) == "data is missing"
    assert difference(old, {**old, "mixcpt": "0.2.0"}) == "mixcpt version changed: 0.1.0 -> 0.2.0"
    assert difference(old, old) == ""


def test_a_file_is_hashed_once_per_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(stage_inputs, "_known", None)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * (2 << 20))
    os.utime(weights, ns=(10**18, 10**18))  # written long ago: not racily clean
    first = stage_inputs.file_hash(weights)
    assert str(weights) in json.loads((tmp_path / "cache/mixcpt/file-hashes.json").read_text())

    monkeypatch.setattr(stage_inputs, "_known", None)  # a new process reads the cache file
    weights.write_bytes(b"b" * (2 << 20))
    os.utime(weights, ns=(10**18, 10**18))  # same size, same time: the remembered hash
    assert stage_inputs.file_hash(weights) == first
    os.utime(weights, ns=(10**18, 10**18 + 1))
    assert stage_inputs.file_hash(weights) != first


def test_a_rebuild_drops_checkpoints_of_other_inputs_and_keeps_its_own(tiny_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    work = run.work("mixcpt", "cpt")
    (work / "checkpoint-2").mkdir(parents=True)
    (work / RECORD_FILE).write_text(json.dumps({"fingerprint": "of other inputs"}))
    run.update_results("stages", "mixcpt/cpt", {"steps": 2})

    record = begin(tiny_cfg(), run, "cpt/mixcpt")
    assert record is not None and not (work / "checkpoint-2").exists()
    assert json.loads((work / RECORD_FILE).read_text())["fingerprint"] == record["fingerprint"]
    assert "mixcpt/cpt" not in run.read_results()["stages"]

    (work / "checkpoint-2").mkdir()  # interrupted: the rerun resumes from here
    assert begin(tiny_cfg(), run, "cpt/mixcpt")["fingerprint"] == record["fingerprint"]
    assert (work / "checkpoint-2").is_dir()
    begin(tiny_cfg(), run, "cpt/mixcpt", force=True)
    assert not (work / "checkpoint-2").exists()


def test_a_stage_refuses_to_read_a_stale_output(tiny_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    run.data.mkdir(parents=True)
    inputs = inputs_now(tiny_cfg(), run, "data")
    fingerprints.write_record(run.data, fingerprints.make_record(inputs))
    assert begin(tiny_cfg(), run, "cpt/mixcpt") is not None  # data is current: fine

    cpt = run.stage("mixcpt", "cpt")
    cpt.mkdir(parents=True)
    fingerprints.write_record(
        cpt, fingerprints.make_record(inputs_now(tiny_cfg(), run, "cpt/mixcpt"))
    )
    stale = r"data is stale \(data.block_size changed: 1024 -> 64\); rebuild it first"
    for node in ("cpt/mixcpt", "select/mixcpt"):  # named, however far down the stage that reads it
        with pytest.raises(UserError, match=stale):
            begin(tiny_cfg(**{"data.block_size": 64}), run, node)


def test_status_names_the_command_running_in_the_folder(project, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": "mixcpt run c.yaml"}
    (folder / LOCK_NAME).write_text(json.dumps({**holder, "since": "2026-12-01 18:00:00"}))
    assert main(["status", str(folder), "--config", str(project)]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert f"running: pid {os.getpid()} on host {socket.gethostname()}" in heading
    (folder / LOCK_NAME).write_text(json.dumps({**holder, "pid": 2**22 + 12345}))  # a dead pid
    assert main(["status", str(folder), "--config", str(project)]) == 0
    assert "running" not in capsys.readouterr().out.splitlines()[0]

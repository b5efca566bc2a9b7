import json

import pytest

from mixcpt.cli import main
from mixcpt.rundir import RunDir


def test_data_stage_from_the_command_line(tmp_path, tiny_model_dir):
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20))
    )
    (tmp_path / "c.yaml").write_text(
        "model: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}], block_size: 16}\n"
    )
    assert main(["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "data" / "mix" / "input_ids.npy").exists()
    assert "data" in json.loads((tmp_path / "run" / "results.json").read_text())


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, mixcpt_cli):
    (tmp_path / "c.yaml").write_text(
        "model: {path: m}\ndata: {domain: [{path: d.txt}]}\nbogus: 1\n"
    )
    (tmp_path / "afile").write_text("")
    for args, needle in [
        (
            ["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")],
            "bogus: unknown key",
        ),
        (
            ["data", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "run")],
            "does not exist",
        ),
        (
            ["data", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "afile")],
            "must be a folder",
        ),
    ]:
        proc = mixcpt_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def _fake_runs(fake_eval_table, calls):
    """A stand-in for one seed's whole run: records (seed, folder) and leaves an eval table whose
    Mix-CPT domain score grows with the seed."""

    def run_one(seed, folder):
        calls.append((seed, folder.name))
        cells = {
            ("base", "base"): {"domain": 0.25, "general": 0.8},
            ("mixcpt", "cpt"): {"domain": 0.5 + 0.1 * (seed % 3), "general": 0.7, "kl": 0.1},
        }
        table = fake_eval_table(cells)
        for key in ("rows", "benchmarks"):
            RunDir(folder).update_results("eval", key, table[key])

    return run_one


def test_run_seeds_runs_each_seed_in_its_folder_and_aggregates(
    tmp_path, tiny_model_dir, fake_eval_table, monkeypatch
):
    import mixcpt.pipeline

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "doc"}) + "\n")
    (tmp_path / "c.yaml").write_text(
        "seed: 5\nmodel: {path: ./tiny-llama}\ndata: {domain: [{path: d.jsonl}]}\n"
    )
    calls = []
    run_one = _fake_runs(fake_eval_table, calls)
    monkeypatch.setattr(
        mixcpt.pipeline, "run_pipeline", lambda cfg, run, *a, **k: run_one(cfg.seed, run.root)
    )
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.yaml"), "--output", str(out), "--seeds", "2"]) == 0
    assert calls == [(5, "seed-5"), (6, "seed-6")]  # the config's seed + 0, 1
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"]["values"] == [5, 6] and len(results["claims"]) == 5
    cpt = next(r for r in results["eval"]["rows"] if r["stage"] == "cpt")
    assert cpt["scores"]["dom"]["acc_norm"] == pytest.approx((0.7 + 0.5) / 2)
    assert "## Claims" in (out / "report.md").read_text()


def test_demo_seeds_with_quick(tmp_path, fake_eval_table, monkeypatch, capsys):
    import mixcpt.demo.run

    calls = []
    run_one = _fake_runs(fake_eval_table, calls)
    monkeypatch.setattr(
        mixcpt.demo.run, "_run_one", lambda run, quick, seed, arms=None: run_one(seed, run.root)
    )
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "3", "--output", str(out)]) == 0
    assert calls == [(0, "seed-0"), (1, "seed-1"), (2, "seed-2")]
    assert json.loads((out / "results.json").read_text())["seeds"]["values"] == [0, 1, 2]
    assert "claim 1: inconclusive" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--seeds", "0", "--output", str(out)])
    assert stop.value.code == 2 and "--seeds: must be at least 1" in capsys.readouterr().err


def test_python_dash_m_mixcpt_is_the_mixcpt_command(tmp_path):
    import subprocess
    import sys

    # `python -m mixcpt` lets a script choose the interpreter (examples/real/run_study.sh)
    done = subprocess.run(
        [sys.executable, "-m", "mixcpt", "status", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "mixcpt" in done.stderr + done.stdout

import copy
import json

import pytest
import torch

from mixcpt.config import config_from_dict
from mixcpt.errors import InputError
from mixcpt.evaluate.stage import run_eval
from mixcpt.rundir import RunDir


@pytest.fixture
def eval_config(tmp_path, tiny_model_dir):
    files = tmp_path / "inputs"
    files.mkdir()
    (files / "domain.txt").write_text("The planet Zorbax orbits the star Vega.\n")
    (files / "probe.txt").write_text(
        "The quick brown fox jumps over the lazy dog. Bob works at Acme.\n"
    )
    (files / "mc.jsonl").write_text(
        json.dumps(
            {
                "question": "Which star does Zorbax orbit?",
                "choices": ["Vega", "the Sun"],
                "answer": 0,
            }
        )
        + "\n"
    )
    (files / "qa.jsonl").write_text(
        json.dumps({"prompt": "Where was Alice born?", "answer": "Paris"}) + "\n"
    )
    (files / "ppl.jsonl").write_text(
        json.dumps({"text": "Alice was born in Paris in 1970."}) + "\n"
    )
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"domain": [{"path": "domain.txt"}]},
        "eval": {
            "benchmarks": [
                {"name": "zorbax", "path": "mc.jsonl", "kind": "multiple_choice", "tag": "domain"},
                {
                    "name": "qa",
                    "path": "qa.jsonl",
                    "kind": "generation",
                    "tag": "general",
                    "max_new_tokens": 4,
                },
                {"name": "text", "path": "ppl.jsonl", "kind": "perplexity", "tag": "general"},
            ],
            "probe": "probe.txt",
            "batch_size": 2,
            "max_length": 64,
        },
    }
    return config_from_dict(raw, files)


def test_run_eval_reports_missing_stages_and_retention(
    tmp_path, eval_config, tiny_model, tiny_tokenizer
):
    run = RunDir(tmp_path / "run")
    cpt = copy.deepcopy(tiny_model)  # stands in for a trained stage: the base, moved a little
    with torch.no_grad():
        for p in cpt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cpt.save_pretrained(run.stage("mixcpt", "cpt"))
    tiny_tokenizer.save_pretrained(run.stage("mixcpt", "cpt"))

    result = run_eval(eval_config, run)

    rows = {(r["arm"], r["stage"]): r for r in result["rows"]}
    assert len(rows) == 7
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {
        ("base", "base"),
        ("mixcpt", "cpt"),
    }
    assert (
        rows[("baseline", "sft")]["status"] == "missing"
        and rows[("baseline", "sft")]["scores"] == {}
    )
    base, cpt_row = rows[("base", "base")], rows[("mixcpt", "cpt")]
    assert base["model"] == eval_config.model.path
    assert set(cpt_row["scores"]) == {"zorbax", "qa", "text"}
    assert set(cpt_row["scores"]["zorbax"]) == {"acc", "acc_norm"}
    # retention: KL on the probe and the change of each *general* benchmark's main score
    assert base["retention"]["kl_to_base"] == 0.0 and cpt_row["retention"]["kl_to_base"] > 0
    assert set(cpt_row["retention"]["delta"]) == {"qa", "text"}
    assert cpt_row["retention"]["delta"]["text"] == pytest.approx(
        cpt_row["scores"]["text"]["bits_per_byte"] - base["scores"]["text"]["bits_per_byte"]
    )
    assert result["benchmarks"]["zorbax"]["main_metric"] == "acc_norm"
    stored = run.read_results()["eval"]
    assert {k: stored[k] for k in ("rows", "benchmarks")} == result


def test_rerun_reuses_the_table_until_a_model_changes(
    tmp_path, eval_config, tiny_model, tiny_tokenizer, monkeypatch
):
    import mixcpt.evaluate.stage as eval_stage

    run = RunDir(tmp_path / "run")
    first = run_eval(eval_config, run)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was evaluated again although nothing changed")

    with monkeypatch.context() as mp:
        mp.setattr(eval_stage, "_load", no_loading)
        assert run_eval(eval_config, run) == first
    tiny_model.save_pretrained(run.stage("mixcpt", "cpt"))  # a new stage model appears
    tiny_tokenizer.save_pretrained(run.stage("mixcpt", "cpt"))
    rows = {(r["arm"], r["stage"]): r for r in run_eval(eval_config, run)["rows"]}
    assert rows[("mixcpt", "cpt")]["status"] == "ok"


def test_run_eval_stops_on_bad_benchmark_before_loading_models(tmp_path, eval_config):
    bad = tmp_path / "inputs" / "mc.jsonl"
    bad.write_text(bad.read_text() + '{"question": "q", "choices": ["a"], "answer": 1}\n')
    with pytest.raises(InputError, match=f"{bad}:2:"):
        run_eval(eval_config, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()

import copy
import json

import pytest
import torch

from mixcpt.config import config_from_dict
from mixcpt.errors import ConfigError, InputError
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
    for stage in ("cpt", "sft"):  # the same weights stand in for an aligned stage too
        cpt.save_pretrained(run.stage("mixcpt", stage))
        tiny_tokenizer.save_pretrained(run.stage("mixcpt", stage))

    result = run_eval(eval_config, run)

    rows = {(r["arm"], r["stage"]): r for r in result["rows"]}
    assert len(rows) == 7
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {
        ("base", "base"),
        ("mixcpt", "cpt"),
        ("mixcpt", "sft"),
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
    assert {k: stored[k] for k in ("rows", "benchmarks", "bootstrap")} == result


def test_every_stage_is_scored_plain_and_aligned_stages_also_through_chat(
    tmp_path, eval_config, tiny_model, tiny_tokenizer
):
    run = RunDir(tmp_path / "run")
    for stage in ("cpt", "sft"):  # the base's weights: any score difference is the format's
        tiny_model.save_pretrained(run.stage("mixcpt", stage))
        tiny_tokenizer.save_pretrained(run.stage("mixcpt", stage))
    rows = {(r["arm"], r["stage"]): r for r in run_eval(eval_config, run)["rows"]}
    base, cpt, sft = rows[("base", "base")], rows[("mixcpt", "cpt")], rows[("mixcpt", "sft")]
    # plain scores of the same weights are the same at every stage: no format confound
    assert base["scores"] == cpt["scores"] == sft["scores"]
    assert all(d == 0 for d in sft["retention"]["delta"].values())
    assert base["chat_scores"] == cpt["chat_scores"] == {}
    assert set(sft["chat_scores"]) == {"zorbax", "qa"}  # perplexity has no prompt
    # per-item main scores, from which the score is the mean (or sum / sum for bits per byte)
    items = sft["items"]
    assert items["scores"]["zorbax"] == [sft["scores"]["zorbax"]["acc_norm"]]
    assert items["chat_scores"]["qa"] == [sft["chat_scores"]["qa"]["exact_match"]]
    bits = items["scores"]["text"]
    assert sum(bits["sum"]) / sum(bits["count"]) == pytest.approx(
        sft["scores"]["text"]["bits_per_byte"], rel=1e-5
    )
    kl = items["kl_to_base"]
    assert sum(kl["count"]) > 0 and sum(kl["sum"]) == pytest.approx(0.0, abs=1e-6)
    assert set(sft["intervals"]["chat_scores"]) == {"zorbax", "qa"}
    claims = run.read_results()["claims"]
    assert [c["id"] for c in claims] == [1, 2, 3, 4, 5]
    assert "arm traditional not in this run" in claims[0]["measures"][0]["reason"]


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


def test_stages_left_out_of_eval_stages_are_neither_scored_nor_rows(
    tmp_path, eval_config, tiny_model, tiny_tokenizer, monkeypatch
):
    import mixcpt.evaluate.stage as eval_stage

    run = RunDir(tmp_path / "run")
    for stage in ("cpt", "sft"):
        tiny_model.save_pretrained(run.stage("mixcpt", stage))
        tiny_tokenizer.save_pretrained(run.stage("mixcpt", stage))
    loaded = []
    load = eval_stage._load
    monkeypatch.setattr(
        eval_stage, "_load", lambda cfg, path, tok: loaded.append(path) or load(cfg, path, tok)
    )
    cfg = eval_config.model_copy(
        update={"eval": eval_config.eval.model_copy(update={"stages": ["cpt", "dpo"]})}
    )
    rows = {(r["arm"], r["stage"]): r for r in run_eval(cfg, run)["rows"]}
    arms = ("mixcpt", "baseline")
    assert set(rows) == {("base", "base"), *((a, s) for a in arms for s in ("cpt", "dpo"))}
    assert rows[("mixcpt", "cpt")]["status"] == "ok"
    assert loaded == [eval_config.model.path, str(run.stage("mixcpt", "cpt"))]  # no sft model
    # with every stage (the default) the sft model is scored: the setting, not the data, decides
    rows = {(r["arm"], r["stage"]): r for r in run_eval(eval_config, run)["rows"]}
    assert rows[("mixcpt", "sft")]["status"] == "ok"


def test_eval_stages_refuse_a_repeated_stage_and_read_only_the_stages_they_score(
    tiny_model_dir, tmp_path
):
    from mixcpt.fingerprints import upstream

    (tmp_path / "d.txt").write_text("x\n")

    def config(stages):
        raw = {
            "model": {"path": str(tiny_model_dir)},
            "data": {"domain": [{"path": "d.txt"}]},
            "eval": {"stages": stages},
        }
        return config_from_dict(raw, tmp_path)

    for bad, message in ((["cpt", "cpt"], "names a stage twice"), ([], "at least 1")):
        with pytest.raises(ConfigError, match=f"eval.stages.*{message}"):
            config(bad)
    # one spelling per set: the order written does not change the fingerprinted config
    assert config(["dpo", "cpt"]).eval.stages == ["cpt", "dpo"]
    # eval is stale only when a stage it scores changes
    assert {n.partition("/")[0] for n in upstream(config(["dpo", "cpt"]), "eval")} <= {"cpt", "dpo"}
    assert "sft/mixcpt" in upstream(config(["cpt", "sft", "dpo"]), "eval")

import json
import re
from dataclasses import fields

import pytest

from mixcpt.data.render import render_plain_prompt, render_plain_response
from mixcpt.demo.entities import DEMO_TEMPLATE, DOMAIN_QUESTIONS, GENERAL_QUESTIONS, render_plain
from mixcpt.demo.world import WorldFiles, write_world


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world") / "w", seed=0, size="quick")


@pytest.fixture(scope="module")
def facts(world):
    return json.loads(world.world.read_text())


def file_paths(files: WorldFiles):
    return {f.name: getattr(files, f.name) for f in fields(files) if f.name != "folder"}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, world):
    again = write_world(tmp_path / "again", seed=0, size="quick")
    other = write_world(tmp_path / "other", seed=1, size="quick")
    for name, path in file_paths(world).items():
        assert path.read_bytes() == file_paths(again)[name].read_bytes(), name
    assert other.domain.read_bytes() != world.domain.read_bytes()
    assert other.fingerprint() != world.fingerprint() == again.fingerprint()


def test_heldout_planets_are_only_in_the_domain_corpus_and_benchmarks(world, facts):
    heldout = facts["split"]["heldout"]
    assert heldout and set(heldout).isdisjoint(facts["split"]["train"])
    mentions = re.compile(r"\b(" + "|".join(heldout) + r")\b")
    for training_file in (world.instructions, world.preferences, world.general_pretrain):
        assert not mentions.search(training_file.read_text()), training_file.name
    domain_text = world.domain.read_text()
    assert all(re.search(rf"\b{name}\b", domain_text) for name in heldout)
    asked = {
        m.group(1)
        for r in read_jsonl(world.bench_domain_mc)
        for m in [mentions.search(r["question"])]
        if m
    }
    assert asked == set(heldout)


def test_train_planet_questions_are_in_the_instruction_pool_and_planets_nowhere_else(world, facts):
    train = set(facts["split"]["train"])
    asked = {
        name
        for r in read_jsonl(world.instructions)
        for name in train
        if f" {name} " in r["instruction"]
    }
    assert asked == train
    planet = re.compile(r"\b(" + "|".join(p["name"] for p in facts["planets"]) + r")\b")
    assert not planet.search(world.general_pretrain.read_text())  # the base never sees a planet


def test_general_benchmark_people_are_known_to_the_base_but_absent_from_the_pools(world, facts):
    bench = facts["split"]["general_benchmark"]
    assert bench and set(bench).isdisjoint(facts["split"]["general_pool"])
    mentions = re.compile(r"\b(" + "|".join(bench) + r")\b")
    for pool_file in (world.instructions, world.preferences):
        assert not mentions.search(pool_file.read_text()), pool_file.name
    assert {
        mentions.search(r["question"]).group(1) for r in read_jsonl(world.bench_general_mc)
    } <= set(bench)
    pretrain = world.general_pretrain.read_text()
    assert all(f"was {name} born?" in pretrain for name in bench)  # the base is taught their QA


def test_every_file_parses_in_its_declared_format(world):
    for path in (world.domain, world.general_pretrain, world.bench_general_ppl):
        rows = read_jsonl(path)
        assert rows and all(set(r) == {"text"} and r["text"].strip() for r in rows), path.name
    rows = read_jsonl(world.instructions)
    assert rows and all(
        set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"]
        for r in rows
    )
    assert any(r["input"] for r in rows)  # some tasks use the input field
    rows = read_jsonl(world.preferences)
    assert rows and all(
        set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in rows
    )
    for path in (world.bench_domain_mc, world.bench_general_mc):
        rows = read_jsonl(path)
        for r in rows:
            assert set(r) == {"question", "choices", "answer"}
            assert len(set(r["choices"])) == len(r["choices"]) == 4 and 0 <= r["answer"] < 4
    for path in (world.bench_domain_gen, world.bench_general_gen):
        rows = read_jsonl(path)
        assert rows and all(
            set(r) == {"prompt", "answers"} and r["answers"] and r["prompt"] for r in rows
        )
    assert world.probe.read_text().strip()


def test_benchmark_answers_are_the_true_values_and_distractors_other_values_of_the_attribute(
    world, facts
):
    truth = {}  # question -> (true value, every value of that attribute)
    for kind, questions in (("people", GENERAL_QUESTIONS), ("planets", DOMAIN_QUESTIONS)):
        for attr, question in questions.items():
            pool = {e[attr] for e in facts[kind]}
            truth.update({question.format(name=e["name"]): (e[attr], pool) for e in facts[kind]})
    for r in read_jsonl(world.bench_general_mc) + read_jsonl(world.bench_domain_mc):
        value, pool = truth[r["question"]]
        assert r["choices"][r["answer"]] == value and set(r["choices"]) <= pool
    for r in read_jsonl(world.bench_general_gen) + read_jsonl(world.bench_domain_gen):
        assert r["answers"] == [truth[r["prompt"]][0]]


def test_general_pretrain_holds_the_qa_in_the_stage1_plain_rendering(world):
    pretrain = {r["text"] for r in read_jsonl(world.general_pretrain)}
    general = [
        r for r in read_jsonl(world.instructions) if "planet" not in r["instruction"]
    ]  # pool people, tasks
    assert general and all(render_plain(r) in pretrain for r in general)
    r = general[0]
    assert render_plain(r) == (
        render_plain_prompt(r["instruction"], r["input"], DEMO_TEMPLATE)
        + render_plain_response(r["output"], DEMO_TEMPLATE)
    )
    assert (
        render_plain({"instruction": "Q?", "input": "", "output": "A"}) == "Question: Q?\nAnswer: A"
    )


def test_perplexity_bios_are_paraphrases_never_trained_on(world):
    pretrain = world.general_pretrain.read_text()
    ppl = [r["text"] for r in read_jsonl(world.bench_general_ppl)]
    assert ppl and not any(json.dumps(t)[1:-1] in pretrain for t in ppl)


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quick"):
        write_world(tmp_path / "w", size="huge")

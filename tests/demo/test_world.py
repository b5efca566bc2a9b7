import json
import re
from dataclasses import fields

import pytest

from mixcpt.data.render import render_plain_prompt, render_plain_response
from mixcpt.demo.entities import DEMO_TEMPLATE, render_plain
from mixcpt.demo.world import QUESTIONS, WorldFiles, write_world


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


def mentions_of(names):
    """A regex matching any of `names` as a whole word."""
    return re.compile(r"\b(" + "|".join(names) + r")\b")


def test_no_domain_entity_is_named_in_any_instruction_preference_or_pretraining_sample(
    world, facts
):
    domain = facts["split"]["domain"]
    mentions = mentions_of(domain)
    for training_file in (world.instructions, world.preferences, world.general_pretrain):
        for row in read_jsonl(training_file):
            assert not mentions.search(json.dumps(row, ensure_ascii=False)), training_file.name
    domain_names = set(domain)
    general_planets = [p["name"] for p in facts["planets"] if p["name"] not in domain_names]
    assert general_planets and mentions_of(general_planets).search(world.instructions.read_text())


def test_the_corpus_describes_every_domain_planet_in_several_paraphrases(world, facts):
    docs = [r["text"] for r in read_jsonl(world.domain)]
    for name in facts["split"]["domain"]:
        about = {d for d in docs if re.search(rf"\b{name}\b", d)}
        assert len(about) >= 3, name


def test_every_domain_question_is_about_a_domain_planet_and_its_answer_is_in_its_documents(
    world, facts
):
    domain = set(facts["split"]["domain"])
    planets = {p["name"]: p for p in facts["planets"]}
    docs = [r["text"] for r in read_jsonl(world.domain)]
    mentions = mentions_of(domain)
    items = [(r["question"], r["choices"][r["answer"]]) for r in read_jsonl(world.bench_domain_mc)]
    items += [(r["prompt"], r["answers"][0]) for r in read_jsonl(world.bench_domain_gen)]
    asked = set()
    for question, answer in items:
        name = mentions.search(question).group(1)
        asked.add(name)
        assert answer in planets[name].values()
        about = [d for d in docs if re.search(rf"\b{name}\b", d)]
        assert about and all(answer in d for d in about), (question, answer)
    assert asked == domain  # every domain planet is asked about


def test_general_benchmark_entities_are_known_to_the_base_but_absent_from_the_pools(world, facts):
    bench = facts["split"]["general_benchmark"]
    assert bench and set(bench).isdisjoint(facts["split"]["general_pool"])
    mentions = mentions_of(bench)
    for pool_file in (world.instructions, world.preferences):
        assert not mentions.search(pool_file.read_text()), pool_file.name
    asked = {mentions.search(r["question"]).group(1) for r in read_jsonl(world.bench_general_mc)}
    assert asked <= set(bench)
    pretrain = world.general_pretrain.read_text()
    assert all(
        f"was {name} born?" in pretrain or f"planet {name} " in pretrain for name in bench
    )  # the base is taught their QA


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
    for kind, questions in QUESTIONS.items():
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
    general = read_jsonl(world.instructions)  # pool people and planets, tasks
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

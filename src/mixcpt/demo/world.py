"""The demo's synthetic world (design.md §7; the claims issue's faithful world): seeded,
deterministic, written in the input formats of §5.

Two kinds of entities, each a row of attributes, described in paraphrased prose (templates and
sentence order vary, so a fact is stored as knowledge rather than as one string):
- fictional *people* (birth year, birth city, university, field, employer) and *planets* (star,
  discovery year, moons, atmosphere, discoverer);
- the *general* world is every person and the first `general_planets` planets. The base is
  pretrained on their texts mixed with question-answer pairs about all of them (mixed training of
  texts and QA is what makes facts extractable, Allen-Zhu & Li, "Physics of Language Models
  3.1"). The instruction and preference pools ask about half of them, the general benchmarks
  about the other half;
- the *domain* world is the remaining planets: new planets the base never saw, described only in
  the domain corpus (several paraphrases each), asked about only in the domain benchmarks. No
  training file other than the domain corpus names one, so a domain question can be answered
  only from what the corpus taught, in the answer format general planet questions taught.

`write_world(folder, seed, size)` writes every file; the same seed and size give byte-identical
files. It reads as its list of steps (entities, split, paraphrased texts, instruction and
preference pools, pretraining text, benchmarks, files), each a function below.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path

from mixcpt.atomic import atomic_dir
from mixcpt.demo.entities import (
    PERSON_QUESTIONS,
    PLANET_QUESTIONS,
    bio,
    facts,
    generation_item,
    make_entities,
    multiple_choice,
    other_tasks,
    paraphrases,
    planet_doc,
    qa,
    render_plain,
)


@dataclass(frozen=True)
class WorldSize:
    people: int
    general_planets: int  # known to the base; their QA teaches the planet-question format
    domain_planets: int  # described only in the domain corpus
    bios_per_person: int  # training paraphrases; one more per person is held out for perplexity
    docs_per_general_planet: int  # in the base's pretraining text
    docs_per_domain_planet: int  # in the domain corpus
    tasks_per_kind: int  # arithmetic, list reversal, sorting samples each
    preferences: int
    general_bench: int  # items of each general benchmark (multiple choice, generation)
    probe_bios: int


# fmt: off
# Chosen by experiment (benchmarks/demo_world_sizing.py, docs/demo-world-sizing.md): few domain
# planets with many paraphrases each are learnt within the stage-1 budget; many planets with few
# paraphrases are not.
SIZES = {
    "default": WorldSize(people=60, general_planets=60, domain_planets=32, bios_per_person=4,
                         docs_per_general_planet=4, docs_per_domain_planet=12, tasks_per_kind=60,
                         preferences=200, general_bench=120, probe_bios=30),
    "quick": WorldSize(people=30, general_planets=30, domain_planets=12, bios_per_person=3,
                       docs_per_general_planet=3, docs_per_domain_planet=8, tasks_per_kind=20,
                       preferences=80, general_bench=60, probe_bios=15),
}
# fmt: on

QUESTIONS = {"people": PERSON_QUESTIONS, "planets": PLANET_QUESTIONS}


@dataclass(frozen=True)
class WorldFiles:
    """Paths of everything `write_world` writes; `world.json` holds the entity tables and the
    split."""

    folder: Path
    domain: Path  # {"text"}: documents about the domain planets, several paraphrases each
    instructions: Path  # Alpaca: QA about pool people and pool planets, other tasks
    preferences: Path  # {"prompt","chosen","rejected"}: pool entities, right vs wrong answer
    # {"text"}: bios, general planet documents, QA about every general entity, other tasks (plain;
    # base model only)
    general_pretrain: Path
    bench_domain_mc: Path  # {"question","choices","answer"}: domain planets
    bench_domain_gen: Path  # {"prompt","answers"}: domain planets
    # benchmark people and planets: known to the base, absent from the pools (retention)
    bench_general_mc: Path
    bench_general_gen: Path
    bench_general_ppl: Path  # {"text"}: bios paraphrased differently from every training bio
    probe: Path  # plain text for KL(base || stage)
    world: Path  # entity tables, split, seed and size

    @classmethod
    def in_folder(cls, folder: Path) -> WorldFiles:
        names = {f.name: folder / f"{f.name}.jsonl" for f in fields(cls) if f.name != "folder"}
        names.update(probe=folder / "probe.txt", world=folder / "world.json")
        return cls(folder=folder, **names)

    def fingerprint(self) -> str:
        """sha256 over the contents of every file: equal fingerprints mean an identical world."""
        h = hashlib.sha256()
        for f in fields(self):
            if f.name != "folder":
                h.update(f.name.encode() + b"\0" + getattr(self, f.name).read_bytes() + b"\0")
        return h.hexdigest()


# ---- the steps of write_world ---------------------------------------------------------------
@dataclass(frozen=True)
class _Split:
    """Which entities each file may mention (see `_split`)."""

    pool_people: list[dict]
    bench_people: list[dict]
    pool_planets: list[dict]
    bench_planets: list[dict]
    domain_planets: list[dict]

    def pool_facts(self) -> list[tuple[dict, str, dict]]:
        """(entity, attribute, its question templates) for every fact the pools may ask."""
        return _facts(self.pool_people, self.pool_planets)

    def bench_facts(self) -> list[tuple[dict, str, dict]]:
        """(entity, attribute, its question templates) for every fact the general benchmarks
        may ask."""
        return _facts(self.bench_people, self.bench_planets)


def _facts(people: list[dict], planets: list[dict]) -> list[tuple[dict, str, dict]]:
    return [(e, a, PERSON_QUESTIONS) for e, a in facts(people, PERSON_QUESTIONS)] + [
        (e, a, PLANET_QUESTIONS) for e, a in facts(planets, PLANET_QUESTIONS)
    ]


def _split(people: list[dict], planets: list[dict], sz: WorldSize) -> _Split:
    """The first `sz.general_planets` planets are general, the rest domain; the people and the
    general planets are each cut in two halves.

    The base is pretrained on QA about every general entity; the instruction and preference pools
    ask only about the first halves, and the general benchmarks only about the second halves, so
    that general scores after alignment measure retention, not facts re-taught by the pool.
    """
    half_people, general = len(people) // 2, planets[: sz.general_planets]
    half_planets = len(general) // 2
    return _Split(
        pool_people=people[:half_people],
        bench_people=people[half_people:],
        pool_planets=general[:half_planets],
        bench_planets=general[half_planets:],
        domain_planets=planets[sz.general_planets :],
    )


@dataclass(frozen=True)
class _Texts:
    """The paraphrased prose of the world (see `_paraphrased_texts`)."""

    bios: list[list[str]]  # the training bios of each person
    heldout_bios: list[str]  # one per person, unlike all of that person's training bios
    general_docs: list[str]  # documents about the general planets (pretraining)
    domain_docs: list[str]  # documents about the domain planets, shuffled (the domain corpus)


def _paraphrased_texts(
    rng: random.Random, people: list[dict], split: _Split, sz: WorldSize
) -> _Texts:
    """Every person's bios, every general planet's and every domain planet's documents, each a set
    of distinct paraphrases of the sizes `sz` asks for."""
    bios = [paraphrases(rng, bio, p, sz.bios_per_person) for p in people]
    heldout_bios = [paraphrases(rng, bio, p, 1, avoid=set(b))[0] for p, b in zip(people, bios)]
    general_planets = split.pool_planets + split.bench_planets
    general_docs = [
        d
        for p in general_planets
        for d in paraphrases(rng, planet_doc, p, sz.docs_per_general_planet)
    ]
    domain_docs = [
        d
        for p in split.domain_planets
        for d in paraphrases(rng, planet_doc, p, sz.docs_per_domain_planet)
    ]
    rng.shuffle(domain_docs)
    return _Texts(bios, heldout_bios, general_docs, domain_docs)


def _values_by_attribute(people: list[dict], planets: list[dict]) -> dict[str, list[str]]:
    """attribute -> the value of every entity that has it: where wrong answers are drawn from."""
    values = {a: [p[a] for p in people] for a in PERSON_QUESTIONS}
    values |= {a: [p[a] for p in planets] for a in PLANET_QUESTIONS}
    return values


def _instruction_pool(rng: random.Random, split: _Split, tasks: list[dict]) -> list[dict]:
    """Alpaca samples, shuffled: QA about the pool people and pool planets, and the other tasks.
    Nothing about a domain planet: domain knowledge comes from the corpus alone."""
    instructions = [qa(q, e, a) for e, a, q in split.pool_facts()] + tasks
    rng.shuffle(instructions)
    return instructions


def _preference_pool(
    rng: random.Random, split: _Split, values: dict[str, list[str]], n: int
) -> list[dict]:
    """Up to `n` questions about the pool entities, each with the right value chosen and another
    value of the same attribute rejected."""
    pool_facts = split.pool_facts()
    return [
        {
            "prompt": q[a].format(name=e["name"]),
            "chosen": e[a],
            "rejected": rng.choice(sorted(set(values[a]) - {e[a]})),
        }
        for e, a, q in rng.sample(pool_facts, min(n, len(pool_facts)))
    ]


def _pretraining_text(
    rng: random.Random, split: _Split, texts: _Texts, tasks: list[dict]
) -> list[str]:
    """The base model's corpus, shuffled: every training bio and general planet document, mixed
    with QA about every general entity and the other tasks rendered as plain text."""
    general_qa = [qa(q, e, a) for e, a, q in split.pool_facts() + split.bench_facts()]
    pretrain = (
        [b for bs in texts.bios for b in bs]
        + texts.general_docs
        + [render_plain(s) for s in general_qa + tasks]
    )
    rng.shuffle(pretrain)
    return pretrain


def _benchmarks(
    rng: random.Random,
    split: _Split,
    values: dict[str, list[str]],
    heldout_bios: list[str],
    n_general: int,
) -> dict[str, list[dict]]:
    """WorldFiles field -> rows of each benchmark: QA about every fact of every domain planet, QA
    about up to `n_general` facts of the benchmark people and planets (each as multiple choice
    and as generation), and the held-out bios for perplexity."""
    bench_facts = split.bench_facts()
    general_items = rng.sample(bench_facts, min(n_general, len(bench_facts)))
    domain_items = facts(split.domain_planets, PLANET_QUESTIONS)
    # a dict display evaluates in order: the domain choices are drawn before the general ones
    return {
        "bench_domain_mc": [
            multiple_choice(rng, PLANET_QUESTIONS, p, a, values[a]) for p, a in domain_items
        ],
        "bench_domain_gen": [generation_item(PLANET_QUESTIONS, p, a) for p, a in domain_items],
        "bench_general_mc": [multiple_choice(rng, q, e, a, values[a]) for e, a, q in general_items],
        "bench_general_gen": [generation_item(q, e, a) for e, a, q in general_items],
        "bench_general_ppl": [{"text": t} for t in heldout_bios],
    }


def _probe_bios(rng: random.Random, people: list[dict], texts: _Texts) -> list[str]:
    """One more bio of each of `people`, unlike their training and held-out bios: the probe text
    on which KL(base || stage) is measured."""
    return [
        paraphrases(rng, bio, p, 1, avoid={*b, h})[0]
        for p, b, h in zip(people, texts.bios, texts.heldout_bios)
    ]


def _world_table(
    seed: int, size: str, people: list[dict], planets: list[dict], split: _Split
) -> dict:
    """The contents of world.json: seed, size, the entity tables and the names in each split."""

    def names(entities: list[dict]) -> list[str]:
        return [e["name"] for e in entities]

    return {
        "seed": seed,
        "size": size,
        "people": people,
        "planets": planets,
        "split": {
            "domain": names(split.domain_planets),
            "general_pool": names(split.pool_people + split.pool_planets),
            "general_benchmark": names(split.bench_people + split.bench_planets),
        },
    }


# ---- the files ------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def _write_files(
    folder: Path, jsonl: dict[str, list[dict]], probe_bios: list[str], world: dict
) -> WorldFiles:
    """Write `folder` (replaced as a whole, atomically): the rows of each jsonl file, keyed by
    its WorldFiles field, the probe text and world.json. Returns the paths."""
    with atomic_dir(Path(folder)) as tmp:
        files = WorldFiles.in_folder(tmp)
        for name, rows in jsonl.items():
            _write_jsonl(getattr(files, name), rows)
        files.probe.write_text("\n\n".join(probe_bios) + "\n", encoding="utf-8")
        files.world.write_text(
            json.dumps(world, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return WorldFiles.in_folder(Path(folder))


def write_world(folder: Path, seed: int = 0, size: str = "default") -> WorldFiles:
    """Generate the world for (`seed`, `size` in SIZES) and write it to `folder` (replaced as a
    whole, atomically). Returns the paths. Same seed and size: byte-identical files."""
    if size not in SIZES:
        raise ValueError(f"world size must be one of {sorted(SIZES)}, not {size!r}")
    sz, rng = SIZES[size], random.Random(seed)
    # Every step draws from the one `rng`, so the order of the steps is part of the output:
    # moving a step, or adding a draw to one, changes the files of every seed.
    people, planets = make_entities(rng, sz.people, sz.general_planets + sz.domain_planets)
    split = _split(people, planets, sz)
    texts = _paraphrased_texts(rng, people, split, sz)
    tasks = other_tasks(rng, sz.tasks_per_kind)
    values = _values_by_attribute(people, planets)
    instructions = _instruction_pool(rng, split, tasks)
    preferences = _preference_pool(rng, split, values, sz.preferences)
    pretrain = _pretraining_text(rng, split, texts, tasks)
    benchmarks = _benchmarks(rng, split, values, texts.heldout_bios, sz.general_bench)
    probe_bios = _probe_bios(rng, people[: sz.probe_bios], texts)
    jsonl = {
        "domain": [{"text": d} for d in texts.domain_docs],
        "instructions": instructions,
        "preferences": preferences,
        "general_pretrain": [{"text": t} for t in pretrain],
        **benchmarks,
    }
    return _write_files(folder, jsonl, probe_bios, _world_table(seed, size, people, planets, split))

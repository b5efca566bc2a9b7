"""The demo's synthetic world (design.md §7): seeded, deterministic, written in the input
formats of §5.

Two kinds of entities, each a row of attributes:
- general world: fictional *people* (birth year, birth city, university, field, employer), each
  described in several paraphrased bios (templates and sentence order vary, so a fact is stored
  as knowledge rather than as one string), plus question-answer instructions about them. The
  base learns everyone; the instruction pool asks about half of them, the general benchmarks
  about the other half;
- domain world: fictional *planets* (star, discovery year, moons, atmosphere, discoverer),
  described only in the domain corpus. Planets are split into `train` (their QA may be in the
  instruction pool, which makes knowledge extraction learnable) and `heldout` (asked about only
  in the benchmarks, never in any training file).

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
    DOMAIN_QUESTIONS,
    GENERAL_QUESTIONS,
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
    planets: int
    heldout_planets: int
    bios_per_person: int  # training paraphrases; one more per person is held out for perplexity
    docs_per_planet: int
    tasks_per_kind: int  # arithmetic, list reversal, sorting samples each
    preferences: int
    general_bench: int  # items of each general benchmark (multiple choice, generation)
    probe_bios: int


# fmt: off
SIZES = {
    "default": WorldSize(people=120, planets=200, heldout_planets=50, bios_per_person=4,
                         docs_per_planet=4, tasks_per_kind=100, preferences=400, general_bench=200,
                         probe_bios=40),
    "quick": WorldSize(people=60, planets=60, heldout_planets=20, bios_per_person=3,
                       docs_per_planet=3, tasks_per_kind=30, preferences=120, general_bench=60,
                       probe_bios=15),
}
# fmt: on


@dataclass(frozen=True)
class WorldFiles:
    """Paths of everything `write_world` writes; `world.json` holds the entity tables and the
    split."""

    folder: Path
    domain: Path  # {"text"}: planet documents, train and heldout planets
    instructions: Path  # Alpaca: QA about pool people, other tasks, QA about train planets
    preferences: Path  # {"prompt","chosen","rejected"}: pool people, right vs wrong answer
    # {"text"}: bios + QA about everyone + other tasks, plain (base model only)
    general_pretrain: Path
    bench_domain_mc: Path  # {"question","choices","answer"}: heldout planets
    bench_domain_gen: Path  # {"prompt","answers"}: heldout planets
    # benchmark people: known to the base, absent from the pools (retention)
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

    train_planets: list[dict]
    heldout_planets: list[dict]
    pool_people: list[dict]
    bench_people: list[dict]


def _split(people: list[dict], planets: list[dict], sz: WorldSize) -> _Split:
    """The last `sz.heldout_planets` planets are held out; the people are cut in two halves.

    The base is pretrained on QA about everyone; the instruction and preference pools ask only
    about the first half, and the general benchmarks only about the second half, so that general
    scores after alignment measure retention, not facts re-taught by the pool.
    """
    half = len(people) // 2
    return _Split(
        train_planets=planets[: -sz.heldout_planets],
        heldout_planets=planets[-sz.heldout_planets :],
        pool_people=people[:half],
        bench_people=people[half:],
    )


def _paraphrased_texts(
    rng: random.Random, people: list[dict], planets: list[dict], sz: WorldSize
) -> tuple[list[list[str]], list[str], list[str]]:
    """(the training bios of each person, one held-out bio per person that differs from all of
    that person's training bios, every planet's documents in one shuffled list)."""
    bios = [paraphrases(rng, bio, p, sz.bios_per_person) for p in people]
    heldout_bios = [paraphrases(rng, bio, p, 1, avoid=set(b))[0] for p, b in zip(people, bios)]
    docs = [doc for p in planets for doc in paraphrases(rng, planet_doc, p, sz.docs_per_planet)]
    rng.shuffle(docs)
    return bios, heldout_bios, docs


def _values_by_attribute(people: list[dict], planets: list[dict]) -> dict[str, list[str]]:
    """attribute -> the value of every entity that has it: where wrong answers are drawn from."""
    values = {a: [p[a] for p in people] for a in GENERAL_QUESTIONS}
    values |= {a: [p[a] for p in planets] for a in DOMAIN_QUESTIONS}
    return values


def _instruction_pool(rng: random.Random, split: _Split, tasks: list[dict]) -> list[dict]:
    """Alpaca samples, shuffled: QA about the pool people, the other tasks, QA about the train
    planets (never the held-out ones)."""
    instructions = (
        [qa(GENERAL_QUESTIONS, p, a) for p, a in facts(split.pool_people, GENERAL_QUESTIONS)]
        + tasks
        + [qa(DOMAIN_QUESTIONS, p, a) for p, a in facts(split.train_planets, DOMAIN_QUESTIONS)]
    )
    rng.shuffle(instructions)
    return instructions


def _preference_pool(
    rng: random.Random, people: list[dict], values: dict[str, list[str]], n: int
) -> list[dict]:
    """Up to `n` questions about `people`, each with the right value chosen and another value of
    the same attribute rejected."""
    pool_facts = facts(people, GENERAL_QUESTIONS)
    return [
        {
            "prompt": GENERAL_QUESTIONS[a].format(name=p["name"]),
            "chosen": p[a],
            "rejected": rng.choice(sorted(set(values[a]) - {p[a]})),
        }
        for p, a in rng.sample(pool_facts, min(n, len(pool_facts)))
    ]


def _pretraining_text(
    rng: random.Random, people: list[dict], bios: list[list[str]], tasks: list[dict]
) -> list[str]:
    """The base model's corpus, shuffled: every training bio, plus QA about everyone and the other
    tasks rendered as plain text."""
    general_qa = [qa(GENERAL_QUESTIONS, p, a) for p, a in facts(people, GENERAL_QUESTIONS)]
    pretrain = [b for bs in bios for b in bs] + [render_plain(s) for s in general_qa + tasks]
    rng.shuffle(pretrain)
    return pretrain


def _benchmarks(
    rng: random.Random,
    split: _Split,
    values: dict[str, list[str]],
    heldout_bios: list[str],
    n_general: int,
) -> dict[str, list[dict]]:
    """WorldFiles field -> rows of each benchmark: domain QA about every held-out planet, general
    QA about up to `n_general` facts of the benchmark people (each as multiple choice and as
    generation), and the held-out bios for perplexity."""
    bench_facts = facts(split.bench_people, GENERAL_QUESTIONS)
    general_items = rng.sample(bench_facts, min(n_general, len(bench_facts)))
    domain_items = facts(split.heldout_planets, DOMAIN_QUESTIONS)
    # a dict display evaluates in order: the domain choices are drawn before the general ones
    return {
        "bench_domain_mc": [
            multiple_choice(rng, DOMAIN_QUESTIONS, p, a, values[a]) for p, a in domain_items
        ],
        "bench_domain_gen": [generation_item(DOMAIN_QUESTIONS, p, a) for p, a in domain_items],
        "bench_general_mc": [
            multiple_choice(rng, GENERAL_QUESTIONS, p, a, values[a]) for p, a in general_items
        ],
        "bench_general_gen": [generation_item(GENERAL_QUESTIONS, p, a) for p, a in general_items],
        "bench_general_ppl": [{"text": t} for t in heldout_bios],
    }


def _probe_bios(
    rng: random.Random, people: list[dict], bios: list[list[str]], heldout_bios: list[str]
) -> list[str]:
    """One more bio of each of `people`, unlike their training and held-out bios: the probe text
    on which KL(base || stage) is measured."""
    return [
        paraphrases(rng, bio, p, 1, avoid={*b, h})[0] for p, b, h in zip(people, bios, heldout_bios)
    ]


def _world_table(
    seed: int, size: str, people: list[dict], planets: list[dict], split: _Split
) -> dict:
    """The contents of world.json: seed, size, the entity tables and the names in each split."""
    return {
        "seed": seed,
        "size": size,
        "people": people,
        "planets": planets,
        "split": {
            "train": [p["name"] for p in split.train_planets],
            "heldout": [p["name"] for p in split.heldout_planets],
            "general_pool": [p["name"] for p in split.pool_people],
            "general_benchmark": [p["name"] for p in split.bench_people],
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
    people, planets = make_entities(rng, sz.people, sz.planets)
    split = _split(people, planets, sz)
    bios, heldout_bios, docs = _paraphrased_texts(rng, people, planets, sz)
    tasks = other_tasks(rng, sz.tasks_per_kind)
    values = _values_by_attribute(people, planets)
    instructions = _instruction_pool(rng, split, tasks)
    preferences = _preference_pool(rng, split.pool_people, values, sz.preferences)
    pretrain = _pretraining_text(rng, people, bios, tasks)
    benchmarks = _benchmarks(rng, split, values, heldout_bios, sz.general_bench)
    probe_bios = _probe_bios(rng, people[: sz.probe_bios], bios, heldout_bios)
    jsonl = {
        "domain": [{"text": d} for d in docs],
        "instructions": instructions,
        "preferences": preferences,
        "general_pretrain": [{"text": t} for t in pretrain],
        **benchmarks,
    }
    return _write_files(folder, jsonl, probe_bios, _world_table(seed, size, people, planets, split))

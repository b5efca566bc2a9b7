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
from mixcpt.config import TemplateConfig
from mixcpt.data.render import render_plain_prompt, render_plain_response

# The stage-1 plain rendering the demo config uses, so the base is pretrained on QA in the very
# format that stage 1 and the plain-prompt evaluation will show it.
DEMO_TEMPLATE = TemplateConfig(
    instruction="Question: {instruction}\n", input="{input}\n", response="Answer: {response}"
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


SIZES = {
    "default": WorldSize(
        people=120,
        planets=200,
        heldout_planets=50,
        bios_per_person=4,
        docs_per_planet=4,
        tasks_per_kind=100,
        preferences=400,
        general_bench=200,
        probe_bios=40,
    ),
    "quick": WorldSize(
        people=60,
        planets=60,
        heldout_planets=20,
        bios_per_person=3,
        docs_per_planet=3,
        tasks_per_kind=30,
        preferences=120,
        general_bench=60,
        probe_bios=15,
    ),
}


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


# ---- the entities -----------------------------------------------------------------------------
PERSON_SYLLABLES = (
    "ka lo mi ra ten vo sa li dor mar el an bel cor fen gal hul is jor ner os pel ros tal ul "
    "ven wyn"
).split()
PLANET_SYLLABLES = "zor xa qua thu vex ix oph ny gly kry rho pyx ulm yth dra zen".split()
PLACE_SYLLABLES = "bram wick ast ford mere dun hol stead lin gate ber port sil hav tor ash".split()
STAR_SYLLABLES = "al be cas den eb fo gir hes ir jun kap lyr mo nu".split()
FIELDS = (
    "chemistry law medicine economics history architecture linguistics biology mathematics music "
    "philosophy geology journalism engineering psychology astronomy"
).split()
COMPANY_KINDS = "Labs Industries Systems Foods Motors Media Energy Bank".split()
GASES = [
    "methane",
    "nitrogen",
    "carbon dioxide",
    "argon",
    "hydrogen",
    "ammonia",
    "neon",
    "helium",
    "sulfur dioxide",
    "oxygen",
    "xenon",
    "chlorine",
]

# Sentence templates per attribute: {s} is the subject (name or pronoun), {name} the full name,
# {poss} the possessive pronoun, {v} the value.
BIO_SENTENCES = {
    "birth_year": [
        "{s} was born in {v}.",
        "{s} came into the world in {v}.",
        "The year {v} saw the birth of {name}.",
    ],
    "birth_city": [
        "{s} was born in the city of {v}.",
        "{s} spent {poss} early years in {v}.",
        "The hometown of {name} is {v}.",
    ],
    "university": [
        "{s} studied at {v}.",
        "{s} graduated from {v}.",
        "{s} received {poss} education at {v}.",
    ],
    "field": [
        "{s} specialized in {v}.",
        "{s} worked in the field of {v}.",
        "{s} devoted {poss} career to {v}.",
    ],
    "employer": ["{s} works for {v}.", "{s} is employed by {v}.", "{s} holds a position at {v}."],
}
DOC_SENTENCES = {
    "star": [
        "{s} orbits the star {v}.",
        "{s} travels around {v}, its parent star.",
        "The parent star of {name} is {v}.",
    ],
    "discovery_year": [
        "{s} was discovered in {v}.",
        "{s} was first observed in {v}.",
        "Astronomers found {name} in {v}.",
    ],
    "moons": ["{s} has {v} moons.", "{v} moons circle {name}.", "{s} is accompanied by {v} moons."],
    "atmosphere": [
        "The atmosphere of {name} is mostly {v}.",
        "{s} has an atmosphere rich in {v}.",
        "{s} is wrapped in clouds of {v}.",
    ],
    "discoverer": [
        "{s} was discovered by {v}.",
        "{v} is credited with discovering {name}.",
        "The discoverer of {name} was {v}.",
    ],
}
GENERAL_QUESTIONS = {
    "birth_year": "In what year was {name} born?",
    "birth_city": "In which city was {name} born?",
    "university": "Which university did {name} attend?",
    "field": "What field did {name} work in?",
    "employer": "Which company does {name} work for?",
}
DOMAIN_QUESTIONS = {
    "star": "Which star does the planet {name} orbit?",
    "discovery_year": "In what year was the planet {name} discovered?",
    "moons": "How many moons does the planet {name} have?",
    "atmosphere": "What is the atmosphere of the planet {name} mostly made of?",
    "discoverer": "Who discovered the planet {name}?",
}


class _Namer:
    """Invents unique capitalised names from syllables; no name is a substring of another, so a
    word search for one entity's name never matches a different entity."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def new(self, syllables: list[str], n_syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            name = "".join(
                self.rng.choice(syllables) for _ in range(self.rng.randint(*n_syllables))
            ).capitalize()
            if len(name) >= 4 and not any(name in t or t in name for t in self.taken):
                self.taken.add(name)
                return name

    def many(
        self, n: int, syllables: list[str], n_syllables: tuple[int, int] = (2, 3)
    ) -> list[str]:
        return [self.new(syllables, n_syllables) for _ in range(n)]


def _make_entities(rng: random.Random, size: WorldSize) -> tuple[list[dict], list[dict]]:
    """People and planets as dicts of attribute -> value (plus name, and gender for people)."""
    namer = _Namer(rng)
    first_names = namer.many(max(20, size.people // 4), PERSON_SYLLABLES, (2, 2))
    cities = namer.many(24, PLACE_SYLLABLES)
    universities = [f"{n} University" for n in namer.many(16, PLACE_SYLLABLES)]
    companies = [f"{n} {rng.choice(COMPANY_KINDS)}" for n in namer.many(24, PLACE_SYLLABLES)]
    stars = namer.many(20, STAR_SYLLABLES)
    discoverers = [
        f"{a} {b}"
        for a, b in zip(namer.many(24, STAR_SYLLABLES, (2, 2)), namer.many(24, PLACE_SYLLABLES))
    ]
    people = [
        {
            "name": f"{rng.choice(first_names)} {namer.new(PERSON_SYLLABLES)}",
            "gender": rng.choice("fm"),
            "birth_year": str(rng.randint(1900, 1999)),
            "birth_city": rng.choice(cities),
            "university": rng.choice(universities),
            "field": rng.choice(FIELDS),
            "employer": rng.choice(companies),
        }
        for _ in range(size.people)
    ]
    planets = [
        {
            "name": namer.new(PLANET_SYLLABLES, (3, 3)),
            "star": rng.choice(stars),
            "discovery_year": str(rng.randint(1950, 2019)),
            "moons": str(rng.randint(2, 13)),
            "atmosphere": rng.choice(GASES),
            "discoverer": rng.choice(discoverers),
        }
        for _ in range(size.planets)
    ]
    return people, planets


# ---- rendering ------------------------------------------------------------------------------
def _prose(
    rng: random.Random, entity: dict, sentences: dict[str, list[str]], pronoun: str, poss: str
) -> str:
    """One paraphrase: every attribute once, in random order, each from a random template; the
    first sentence names the entity, later ones use the name or the pronoun at random."""
    parts = []
    for i, attr in enumerate(rng.sample(list(sentences), len(sentences))):
        subject = entity["name"] if i == 0 or rng.random() < 0.5 else pronoun
        parts.append(
            rng.choice(sentences[attr]).format(
                s=subject, name=entity["name"], poss=poss, v=entity[attr]
            )
        )
    return " ".join(parts)


def _bio(rng: random.Random, person: dict) -> str:
    pronoun, poss = ("She", "her") if person["gender"] == "f" else ("He", "his")
    return _prose(rng, person, BIO_SENTENCES, pronoun, poss)


def _planet_doc(rng: random.Random, planet: dict) -> str:
    if rng.random() < 0.25:  # a catalogue entry now and then, as encyclopedic corpora mix styles
        attrs = rng.sample(list(DOC_SENTENCES), len(DOC_SENTENCES))
        entries = " ".join(f"{a.replace('_', ' ').capitalize()}: {planet[a]}." for a in attrs)
        return f"Planet {planet['name']}. {entries}"
    return _prose(rng, planet, DOC_SENTENCES, "It", "its")


def _paraphrases(
    rng: random.Random, render, entity: dict, n: int, avoid: set[str] = frozenset()
) -> list[str]:
    """`n` distinct paraphrases of `entity`, none in `avoid`."""
    out: list[str] = []
    for _ in range(50 * n):
        text = render(rng, entity)
        if text not in avoid and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not write {n} distinct paraphrases of {entity['name']}")


def _qa(questions: dict[str, str], entity: dict, attr: str) -> dict:
    return {
        "instruction": questions[attr].format(name=entity["name"]),
        "input": "",
        "output": entity[attr],
    }


def _other_tasks(rng: random.Random, n: int) -> list[dict]:
    """Simple non-knowledge instructions: addition, reversing a list, sorting numbers."""
    words = "apple river stone cloud lamp tiger violin garden copper window candle pepper".split()
    tasks = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        tasks.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)})
        items = rng.sample(words, rng.randint(3, 5))
        tasks.append(
            {
                "instruction": "Reverse the order of these words.",
                "input": ", ".join(items),
                "output": ", ".join(reversed(items)),
            }
        )
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        tasks.append(
            {
                "instruction": "Sort these numbers from smallest to largest.",
                "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums))),
            }
        )
    return tasks


def render_plain(sample: dict) -> str:
    """An Alpaca sample as one plain-text document, exactly as the demo's stage 1 renders it."""
    return render_plain_prompt(
        sample["instruction"], sample["input"], DEMO_TEMPLATE
    ) + render_plain_response(sample["output"], DEMO_TEMPLATE)


def _multiple_choice(
    rng: random.Random, questions: dict, entity: dict, attr: str, pool: list[str]
) -> dict:
    """Question with the right value and three other values of the same attribute, in random
    order."""
    wrong = rng.sample(sorted(set(pool) - {entity[attr]}), 3)
    choices = wrong + [entity[attr]]
    rng.shuffle(choices)
    return {
        "question": questions[attr].format(name=entity["name"]),
        "choices": choices,
        "answer": choices.index(entity[attr]),
    }


def _generation_item(questions: dict[str, str], entity: dict, attr: str) -> dict:
    """A question whose answer is the entity's value, to be generated rather than chosen."""
    return {"prompt": questions[attr].format(name=entity["name"]), "answers": [entity[attr]]}


def _facts(entities: list[dict], questions: dict[str, str]) -> list[tuple[dict, str]]:
    """(entity, attribute) for every entity and every attribute `questions` asks about."""
    return [(e, a) for e in entities for a in questions]


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
    bios = [_paraphrases(rng, _bio, p, sz.bios_per_person) for p in people]
    heldout_bios = [_paraphrases(rng, _bio, p, 1, avoid=set(b))[0] for p, b in zip(people, bios)]
    docs = [doc for p in planets for doc in _paraphrases(rng, _planet_doc, p, sz.docs_per_planet)]
    rng.shuffle(docs)
    return bios, heldout_bios, docs


def _values_by_attribute(people: list[dict], planets: list[dict]) -> dict[str, list[str]]:
    """attribute -> the value of every entity that has it: where wrong answers are drawn from."""
    values = {a: [p[a] for p in people] for a in GENERAL_QUESTIONS}
    values |= {a: [p[a] for p in planets] for a in DOMAIN_QUESTIONS}
    return values


def _instruction_pool(rng: random.Random, split: _Split, other_tasks: list[dict]) -> list[dict]:
    """Alpaca samples, shuffled: QA about the pool people, the other tasks, QA about the train
    planets (never the held-out ones)."""
    instructions = (
        [_qa(GENERAL_QUESTIONS, p, a) for p, a in _facts(split.pool_people, GENERAL_QUESTIONS)]
        + other_tasks
        + [_qa(DOMAIN_QUESTIONS, p, a) for p, a in _facts(split.train_planets, DOMAIN_QUESTIONS)]
    )
    rng.shuffle(instructions)
    return instructions


def _preference_pool(
    rng: random.Random, people: list[dict], values: dict[str, list[str]], n: int
) -> list[dict]:
    """Up to `n` questions about `people`, each with the right value chosen and another value of
    the same attribute rejected."""
    facts = _facts(people, GENERAL_QUESTIONS)
    return [
        {
            "prompt": GENERAL_QUESTIONS[a].format(name=p["name"]),
            "chosen": p[a],
            "rejected": rng.choice(sorted(set(values[a]) - {p[a]})),
        }
        for p, a in rng.sample(facts, min(n, len(facts)))
    ]


def _pretraining_text(
    rng: random.Random, people: list[dict], bios: list[list[str]], other_tasks: list[dict]
) -> list[str]:
    """The base model's corpus, shuffled: every training bio, plus QA about everyone and the other
    tasks rendered as plain text."""
    general_qa = [_qa(GENERAL_QUESTIONS, p, a) for p, a in _facts(people, GENERAL_QUESTIONS)]
    pretrain = [b for bs in bios for b in bs] + [render_plain(s) for s in general_qa + other_tasks]
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
    bench_facts = _facts(split.bench_people, GENERAL_QUESTIONS)
    general_items = rng.sample(bench_facts, min(n_general, len(bench_facts)))
    domain_items = _facts(split.heldout_planets, DOMAIN_QUESTIONS)
    # a dict display evaluates in order: the domain choices are drawn before the general ones
    return {
        "bench_domain_mc": [
            _multiple_choice(rng, DOMAIN_QUESTIONS, p, a, values[a]) for p, a in domain_items
        ],
        "bench_domain_gen": [_generation_item(DOMAIN_QUESTIONS, p, a) for p, a in domain_items],
        "bench_general_mc": [
            _multiple_choice(rng, GENERAL_QUESTIONS, p, a, values[a]) for p, a in general_items
        ],
        "bench_general_gen": [_generation_item(GENERAL_QUESTIONS, p, a) for p, a in general_items],
        "bench_general_ppl": [{"text": t} for t in heldout_bios],
    }


def _probe_bios(
    rng: random.Random, people: list[dict], bios: list[list[str]], heldout_bios: list[str]
) -> list[str]:
    """One more bio of each of `people`, unlike their training and held-out bios: the probe text
    on which KL(base || stage) is measured."""
    return [
        _paraphrases(rng, _bio, p, 1, avoid={*b, h})[0]
        for p, b, h in zip(people, bios, heldout_bios)
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
    people, planets = _make_entities(rng, sz)
    split = _split(people, planets, sz)
    bios, heldout_bios, docs = _paraphrased_texts(rng, people, planets, sz)
    other_tasks = _other_tasks(rng, sz.tasks_per_kind)
    values = _values_by_attribute(people, planets)
    instructions = _instruction_pool(rng, split, other_tasks)
    preferences = _preference_pool(rng, split.pool_people, values, sz.preferences)
    pretrain = _pretraining_text(rng, people, bios, other_tasks)
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

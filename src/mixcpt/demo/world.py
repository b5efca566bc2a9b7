"""The demo's synthetic world (design.md §7): seeded, deterministic, written in the input formats of §5.

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

`write_world(folder, seed, size)` writes every file; the same seed and size give byte-identical files.
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
    """Paths of everything `write_world` writes; `world.json` holds the entity tables and the split."""

    folder: Path
    domain: Path  # {"text"}: planet documents, train and heldout planets
    instructions: Path  # Alpaca: QA about pool people, other tasks, QA about train planets
    preferences: Path  # {"prompt","chosen","rejected"}: pool people, right vs wrong answer
    general_pretrain: (
        Path  # {"text"}: bios + QA about everyone + other tasks, plain (base model only)
    )
    bench_domain_mc: Path  # {"question","choices","answer"}: heldout planets
    bench_domain_gen: Path  # {"prompt","answers"}: heldout planets
    bench_general_mc: Path  # benchmark people: known to the base, absent from the pools (retention)
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
    """Question with the right value and three other values of the same attribute, in random order."""
    wrong = rng.sample(sorted(set(pool) - {entity[attr]}), 3)
    choices = wrong + [entity[attr]]
    rng.shuffle(choices)
    return {
        "question": questions[attr].format(name=entity["name"]),
        "choices": choices,
        "answer": choices.index(entity[attr]),
    }


# ---- the files ------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def write_world(folder: Path, seed: int = 0, size: str = "default") -> WorldFiles:
    """Generate the world for (`seed`, `size` in SIZES) and write it to `folder` (replaced as a whole,
    atomically). Returns the paths. Same seed and size: byte-identical files."""
    if size not in SIZES:
        raise ValueError(f"world size must be one of {sorted(SIZES)}, not {size!r}")
    sz, rng = SIZES[size], random.Random(seed)
    people, planets = _make_entities(rng, sz)
    train_planets, heldout_planets = planets[: -sz.heldout_planets], planets[-sz.heldout_planets :]

    bios = [_paraphrases(rng, _bio, p, sz.bios_per_person) for p in people]
    heldout_bios = [_paraphrases(rng, _bio, p, 1, avoid=set(b))[0] for p, b in zip(people, bios)]
    docs = [doc for p in planets for doc in _paraphrases(rng, _planet_doc, p, sz.docs_per_planet)]
    rng.shuffle(docs)

    # The base is pretrained on QA about everyone; the instruction and preference pools ask only
    # about the first half, and the general benchmarks only about the second half, so that
    # general scores after alignment measure retention, not facts re-taught by the pool.
    pool_people, bench_people = people[: len(people) // 2], people[len(people) // 2 :]
    general_facts = [(p, a) for p in people for a in GENERAL_QUESTIONS]
    pool_facts = [(p, a) for p in pool_people for a in GENERAL_QUESTIONS]
    other_tasks = _other_tasks(rng, sz.tasks_per_kind)
    domain_qa = [_qa(DOMAIN_QUESTIONS, p, a) for p in train_planets for a in DOMAIN_QUESTIONS]
    instructions = [_qa(GENERAL_QUESTIONS, p, a) for p, a in pool_facts] + other_tasks + domain_qa
    rng.shuffle(instructions)

    values = {a: [p[a] for p in people] for a in GENERAL_QUESTIONS}
    values |= {a: [p[a] for p in planets] for a in DOMAIN_QUESTIONS}
    preferences = [
        {
            "prompt": GENERAL_QUESTIONS[a].format(name=p["name"]),
            "chosen": p[a],
            "rejected": rng.choice(sorted(set(values[a]) - {p[a]})),
        }
        for p, a in rng.sample(pool_facts, min(sz.preferences, len(pool_facts)))
    ]

    general_qa = [_qa(GENERAL_QUESTIONS, p, a) for p, a in general_facts]
    pretrain = [b for bs in bios for b in bs] + [render_plain(s) for s in general_qa + other_tasks]
    rng.shuffle(pretrain)

    bench_facts = [(p, a) for p in bench_people for a in GENERAL_QUESTIONS]
    general_items = rng.sample(bench_facts, min(sz.general_bench, len(bench_facts)))
    domain_items = [(p, a) for p in heldout_planets for a in DOMAIN_QUESTIONS]
    gen_item = lambda qs, p, a: {"prompt": qs[a].format(name=p["name"]), "answers": [p[a]]}  # noqa: E731
    mc_item = lambda qs, p, a: _multiple_choice(rng, qs, p, a, values[a])  # noqa: E731

    with atomic_dir(Path(folder)) as tmp:
        files = WorldFiles.in_folder(tmp)
        _write_jsonl(files.domain, [{"text": d} for d in docs])
        _write_jsonl(files.instructions, instructions)
        _write_jsonl(files.preferences, preferences)
        _write_jsonl(files.general_pretrain, [{"text": t} for t in pretrain])
        _write_jsonl(
            files.bench_domain_mc, [mc_item(DOMAIN_QUESTIONS, p, a) for p, a in domain_items]
        )
        _write_jsonl(
            files.bench_domain_gen, [gen_item(DOMAIN_QUESTIONS, p, a) for p, a in domain_items]
        )
        _write_jsonl(
            files.bench_general_mc, [mc_item(GENERAL_QUESTIONS, p, a) for p, a in general_items]
        )
        _write_jsonl(
            files.bench_general_gen, [gen_item(GENERAL_QUESTIONS, p, a) for p, a in general_items]
        )
        _write_jsonl(files.bench_general_ppl, [{"text": t} for t in heldout_bios])
        probe_bios = [
            _paraphrases(rng, _bio, p, 1, avoid={*b, h})[0]
            for p, b, h in zip(people[: sz.probe_bios], bios, heldout_bios)
        ]
        files.probe.write_text("\n\n".join(probe_bios) + "\n", encoding="utf-8")
        world = {
            "seed": seed,
            "size": size,
            "people": people,
            "planets": planets,
            "split": {
                "train": [p["name"] for p in train_planets],
                "heldout": [p["name"] for p in heldout_planets],
                "general_pool": [p["name"] for p in pool_people],
                "general_benchmark": [p["name"] for p in bench_people],
            },
        }
        files.world.write_text(
            json.dumps(world, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return WorldFiles.in_folder(Path(folder))

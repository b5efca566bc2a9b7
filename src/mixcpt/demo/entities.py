"""The demo world's entities and how they are written about: invented names, people and planets
as rows of attributes, paraphrased prose, question templates, and the plain rendering of a
question-answer sample (`mixcpt.demo.world` assembles these into files and decides which
entities are general and which are domain).
"""

from __future__ import annotations

import random

from mixcpt.config import TemplateConfig
from mixcpt.data.render import render_plain_prompt, render_plain_response

# The stage-1 plain rendering the demo config uses, so the base is pretrained on QA in the very
# format that stage 1 and the plain-prompt evaluation will show it.
DEMO_TEMPLATE = TemplateConfig(
    instruction="Question: {instruction}\n", input="{input}\n", response="Answer: {response}"
)


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
PERSON_QUESTIONS = {
    "birth_year": "In what year was {name} born?",
    "birth_city": "In which city was {name} born?",
    "university": "Which university did {name} attend?",
    "field": "What field did {name} work in?",
    "employer": "Which company does {name} work for?",
}
PLANET_QUESTIONS = {
    "star": "Which star does the planet {name} orbit?",
    "discovery_year": "In what year was the planet {name} discovered?",
    "moons": "How many moons does the planet {name} have?",
    "atmosphere": "What is the atmosphere of the planet {name} mostly made of?",
    "discoverer": "Who discovered the planet {name}?",
}


class Namer:
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


def make_entities(
    rng: random.Random, n_people: int, n_planets: int
) -> tuple[list[dict], list[dict]]:
    """People and planets as dicts of attribute -> value (plus name, and gender for people); every
    name is unique and no name contains another."""
    namer = Namer(rng)
    first_names = namer.many(max(20, n_people // 4), PERSON_SYLLABLES, (2, 2))
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
        for _ in range(n_people)
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
        for _ in range(n_planets)
    ]
    return people, planets


# ---- rendering ------------------------------------------------------------------------------
def prose(
    rng: random.Random,
    entity: dict,
    sentences: dict[str, list[str]],
    pronoun: str | None,
    poss: str,
) -> str:
    """One paraphrase: every attribute once, in random order, each from a random template; the
    first sentence names the entity, later ones use the name or the pronoun at random (always the
    name when `pronoun` is None)."""
    parts = []
    for i, attr in enumerate(rng.sample(list(sentences), len(sentences))):
        named = pronoun is None or i == 0 or rng.random() < 0.5
        subject = entity["name"] if named else pronoun
        parts.append(
            rng.choice(sentences[attr]).format(
                s=subject, name=entity["name"], poss=poss, v=entity[attr]
            )
        )
    return " ".join(parts)


def bio(rng: random.Random, person: dict) -> str:
    pronoun, poss = ("She", "her") if person["gender"] == "f" else ("He", "his")
    return prose(rng, person, BIO_SENTENCES, pronoun, poss)


def planet_doc(rng: random.Random, planet: dict) -> str:
    if rng.random() < 0.25:  # a catalogue entry now and then, as encyclopedic corpora mix styles
        attrs = rng.sample(list(DOC_SENTENCES), len(DOC_SENTENCES))
        entries = " ".join(f"{a.replace('_', ' ').capitalize()}: {planet[a]}." for a in attrs)
        return f"Planet {planet['name']}. {entries}"
    # The name in every sentence, never "It": a fact stated next to the name is stored where a
    # question about that name can find it ("fullname" augmentation in Physics of Language Models
    # 3.1 raised QA accuracy on entities known only from their texts).
    return prose(rng, planet, DOC_SENTENCES, None, "its")


def paraphrases(
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


def qa(questions: dict[str, str], entity: dict, attr: str) -> dict:
    return {
        "instruction": questions[attr].format(name=entity["name"]),
        "input": "",
        "output": entity[attr],
    }


def other_tasks(rng: random.Random, n: int) -> list[dict]:
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


def multiple_choice(
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


def generation_item(questions: dict[str, str], entity: dict, attr: str) -> dict:
    """A question whose answer is the entity's value, to be generated rather than chosen."""
    return {"prompt": questions[attr].format(name=entity["name"]), "answers": [entity[attr]]}


def facts(entities: list[dict], questions: dict[str, str]) -> list[tuple[dict, str]]:
    """(entity, attribute) for every entity and every attribute `questions` asks about."""
    return [(e, a) for e in entities for a in questions]

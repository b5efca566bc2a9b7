"""General instruction and preference data, and general benchmarks, built offline from a real
licensed source: the WordNet 3.0 lexical database (Debian's `wordnet-base` package), plus simple
programmatic tasks whose answers are computed.

    apt-get install -y wordnet-base
    python examples/real/general_tasks.py --out examples/real/data

Tasks (instruction -> response, all answers real or computed, none invented):
    define     "Define the word X."             -> X's WordNet definition
    example    "Use the word X in a sentence."  -> a WordNet example sentence with X
    synonym    "Give a synonym of X."           -> another word of X's synset
    arithmetic "What is 37 + 45?"               -> 82
    sort       "Sort these words alphabetically: ..." -> the sorted words
    letters    "How many letters are in the word X?" -> the count
A preference pair takes the same prompt, the real answer as chosen and a wrong one as rejected:
another word's definition or example, a wrong sum or count, an unsorted order.

Synsets are split into training and held-out ones (a word's meanings are never in both); the
held-out part gives the benchmarks. Writes to --out:
    instructions.jsonl, preferences.jsonl   the general pool D_I, D_A
                              (Alpaca / prompt-chosen-rejected)
    bench_general_mc.jsonl    "Which is the meaning of X?", 4 held-out definitions (multiple choice)
    bench_general_gen.jsonl   the held-out instruction split with exact answers (generation)
    bench_general_ppl.jsonl   held-out glosses as short English paragraphs (bits per byte)
    probe.txt                 held-out glosses, for KL(base || stage)

Licence: WordNet 3.0, Copyright 2006 by Princeton University, under the WordNet 3.0 licence (use,
copy, modify and distribute for any purpose without fee, keeping the notice; see
/usr/share/doc/wordnet-base/copyright). Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from mixcpt.align.samples import write_samples  # JSONL, one object per line, unchanged

POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def read_synsets(wordnet: Path) -> list[dict]:
    """Every synset of data.{noun,verb,adj,adv}: {"pos", "words", "definition", "examples"}."""
    synsets = []
    for pos, pos_name in POS.items():
        for line in (wordnet / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            count = int(parts[3], 16)
            words = [
                re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]
            ]
            pieces = [p.strip() for p in gloss.strip().split(";")]
            definition = next((p for p in pieces if p and not p.startswith('"')), "")
            examples = [p.strip('"') for p in pieces if p.startswith('"') and p.endswith('"')]
            if definition and words:
                synsets.append(
                    {
                        "pos": pos_name,
                        "words": words,
                        "definition": definition,
                        "examples": examples,
                    }
                )
    return synsets


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def word_tasks(synset: dict, others: list[dict], rng: random.Random) -> list[dict]:
    """Instruction samples {instruction, input, output, rejected, task} about one synset's words."""
    word = rng.choice(synset["words"])
    other = rng.choice(others)
    while other["definition"] == synset["definition"]:  # a rejected answer is never also right
        other = rng.choice(others)
    tasks = [
        {
            "task": "define",
            "instruction": f'Define the word "{word}" ({synset["pos"]}).',
            "input": "",
            "output": sentence(synset["definition"]),
            "rejected": sentence(other["definition"]),
        }
    ]
    with_word = [e for e in synset["examples"] if re.search(rf"\b{re.escape(word)}\b", e)]
    other_examples = [
        e
        for s in rng.sample(others, min(20, len(others)))
        if s is not synset
        for e in s["examples"]
    ]
    if with_word and other_examples:
        tasks.append(
            {
                "task": "example",
                "instruction": f'Use the word "{word}" in a sentence.',
                "input": "",
                "output": sentence(with_word[0]),
                "rejected": sentence(rng.choice(other_examples)),
            }
        )
    synonyms = [w for w in synset["words"] if w != word]
    if synonyms:
        tasks.append(
            {
                "task": "synonym",
                "instruction": f'Give a synonym of the {synset["pos"]} "{word}".',
                "input": "",
                "output": synonyms[0],
                "answers": synonyms,
                "rejected": rng.choice(other["words"]),
            }
        )
    return tasks


def computed_task(rng: random.Random, words: list[str]) -> dict:
    """One programmatic task with its exact answer and a wrong one."""
    kind = rng.choice(["arithmetic", "sort", "letters"])
    if kind == "arithmetic":
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {
            "task": kind,
            "instruction": f"What is {a} {op} {b}?",
            "input": "",
            "output": str(answer),
            "rejected": str(answer + rng.choice([-10, -2, -1, 1, 2, 10])),
        }
    if kind == "sort":
        sample = rng.sample(words, 4)
        shuffled = sample[:]
        while shuffled == sorted(sample):
            rng.shuffle(shuffled)
        return {
            "task": kind,
            "instruction": "Sort these words alphabetically.",
            "input": ", ".join(sample),
            "output": ", ".join(sorted(sample)),
            "rejected": ", ".join(shuffled),
        }
    word = rng.choice(words)
    return {
        "task": kind,
        "instruction": f'How many letters are in the word "{word}"?',
        "input": "",
        "output": str(len(word)),
        "rejected": str(len(word) + rng.choice([-1, 1, 2])),
    }


def tasks_for(synsets: list[dict], rng: random.Random, computed_share: float) -> list[dict]:
    words = [w for s in synsets for w in s["words"] if w.isalpha() and 3 <= len(w) <= 12]
    tasks = [t for s in synsets for t in word_tasks(s, synsets, rng)]
    tasks += [computed_task(rng, words) for _ in range(int(len(tasks) * computed_share))]
    rng.shuffle(tasks)
    return tasks


def prompt_of(task: dict) -> str:
    return f"{task['instruction']}\n{task['input']}" if task["input"] else task["instruction"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet", default="/usr/share/wordnet", help="wordnet-base's data folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--train-synsets", type=int, default=3000, help="synsets behind the training pool"
    )
    p.add_argument(
        "--heldout-synsets", type=int, default=600, help="synsets behind the general benchmarks"
    )
    p.add_argument(
        "--computed-share", type=float, default=0.25, help="programmatic tasks per word task"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    wordnet = Path(args.wordnet)
    if not (wordnet / "data.noun").is_file():
        raise SystemExit(
            f"{wordnet}: WordNet data not found; install it with: apt-get install -y wordnet-base"
        )
    rng = random.Random(args.seed)
    synsets = read_synsets(wordnet)
    rng.shuffle(synsets)
    heldout = synsets[: args.heldout_synsets]
    train = synsets[args.heldout_synsets : args.heldout_synsets + args.train_synsets]
    train_tasks, test_tasks = (
        tasks_for(train, rng, args.computed_share),
        tasks_for(heldout, rng, args.computed_share),
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_samples(
        out / "instructions.jsonl",
        [{k: t[k] for k in ("instruction", "input", "output")} for t in train_tasks],
    )
    write_samples(
        out / "preferences.jsonl",
        [
            {"prompt": prompt_of(t), "chosen": t["output"], "rejected": t["rejected"]}
            for t in train_tasks
        ],
    )
    mc = []
    for s in heldout:
        wrong = rng.sample([o for o in heldout if o["definition"] != s["definition"]], 3)
        choices = [sentence(s["definition"]), *(sentence(o["definition"]) for o in wrong)]
        rng.shuffle(choices)
        mc.append(
            {
                "question": f'What does the {s["pos"]} "{s["words"][0]}" mean?',
                "choices": choices,
                "answer": choices.index(sentence(s["definition"])),
            }
        )
    write_samples(out / "bench_general_mc.jsonl", mc)
    write_samples(
        out / "bench_general_gen.jsonl",
        [
            {"prompt": prompt_of(t), "answers": t.get("answers", [t["output"]])}
            for t in test_tasks
            if t["task"] in ("arithmetic", "letters", "sort", "synonym")
        ],
    )
    glosses = [
        f"{s['words'][0]}: {sentence(s['definition'])}"
        + "".join(f" {sentence(e)}" for e in s["examples"])
        for s in heldout
    ]
    half = len(glosses) // 2
    write_samples(
        out / "bench_general_ppl.jsonl",
        [{"text": "\n".join(glosses[i : i + 8])} for i in range(0, half, 8)],
    )
    (out / "probe.txt").write_text("\n".join(glosses[half : half + 40]) + "\n", encoding="utf-8")
    print(
        f"wordnet: {len(train_tasks)} training tasks from {len(train)} synsets, "
        f"{len(heldout)} held-out synsets -> {out}"
    )


if __name__ == "__main__":
    main()

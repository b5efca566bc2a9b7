"""General-retention benchmarks from real text no one here wrote: the test data inside the gensim
wheel on PyPI (read as a zip file; gensim itself is never installed or imported).

    pip download --no-deps gensim==4.4.0 -d ~/.cache/mixcpt-real
    python examples/real/general_text.py --wheel ~/.cache/mixcpt-real/gensim-4.4.0-*.whl \
        --out examples/real/data

Sources in the wheel (gensim/test/test_data/):
    enwiki-latest-pages-articles1.xml-...-shortened.bz2  106 English Wikipedia articles (2016)
    lee_background.cor                                   300 Australian news articles (Lee corpus)
    questions-words.txt                                  Mikolov et al.'s 19,544 word analogies
                                                         (capitals, currencies, family, grammar)
Writes to --out:
    bench_general_text.jsonl   {"text", "source"}  passages of about --passage-chars characters,
                               half Wikipedia, half news, one per article (bits per byte)
    bench_general_analogy.jsonl  "Athens is to Greece as Baghdad is to what?", 4 choices from
                               the same analogy section, sections sampled evenly (multiple choice)
    probe_text.txt             other passages of the same articles, for KL(base || stage)

Licences: Wikipedia text is CC BY-SA 3.0; the Lee corpus and the analogy set ship with gensim
(LGPL-2.1) as test data. Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import bz2
import html
import random
import re
import zipfile
from pathlib import Path

from mixcpt.align.samples import write_samples  # JSONL, one object per line, unchanged

DATA = "gensim/test/test_data/"
WIKI = DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS = DATA + "lee_background.cor"
ANALOGIES = DATA + "questions-words.txt"
# [[File:...]], [[Image:...]], [[Category:...]], with the links inside a caption
EMBEDS = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
# what removed markup leaves behind ("a perilune of  and", "( )", " ,") or an entity
DAMAGED = re.compile(r"\s{2,}|&\w+;|\(\s*[,;]?\s*\)|\s[,.;:]|[{}|\[\]<>=]")


def wiki_articles(xml: str) -> list[str]:
    """The prose of each article (redirects dropped): wikitext with templates, tables, references,
    files, categories, headings and list lines removed, links reduced to their text."""
    articles = []
    for raw in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = html.unescape(html.unescape(raw))  # the XML escapes wikitext's own entities
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        for _ in range(3):  # nested templates and tables, innermost first
            text = re.sub(r"\{\{[^{}]*\}\}", "", text)
            text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
        text = EMBEDS.sub("", text)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
        text = re.sub(r"'{2,}", "", text)
        text = re.sub(r"<[^>]+>", "", text)
        prose = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not re.match(r"\s*[=*#:;|!{}]", line) and len(line) > 80
        ]
        if prose:
            articles.append("\n".join(prose))
    return articles


def passages(text: str, size: int) -> list[str]:
    """`text` cut at sentence ends into pieces of at least `size` characters that start with a
    capital letter and show none of the damage `DAMAGED` matches (others, and the last, shorter
    piece, dropped). Some traces of removed markup pass it: about 1 Wikipedia passage in 10
    keeps one, such as "( years ago)"; every model is scored on the same text."""
    out, current = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= size:
            if current[0].isupper() and not DAMAGED.search(current):
                out.append(current)
            current = ""
    return out


def analogy_items(lines: list[str], rng: random.Random, n: int) -> list[dict]:
    """`n` multiple-choice items, sections sampled round-robin: "A is to B as C is to what?",
    the answer D and 3 other answers of the same section (so every choice is the right kind of
    word: a country, a currency, a past tense)."""
    sections: dict[str, list[list[str]]] = {}
    name = ""
    for line in lines:
        if line.startswith(":"):
            name = line[1:].strip()
        elif line.strip():
            sections.setdefault(name, []).append(line.split())
    for rows in sections.values():
        rng.shuffle(rows)
    items, i = [], 0
    while len(items) < n and any(i < len(rows) for rows in sections.values()):
        for name in sorted(sections):
            rows = sections[name]
            if len(items) == n or i >= len(rows):
                continue
            a, b, c, d = rows[i]
            wrong = sorted({r[3] for r in rows} - {d, a, b, c})
            if len(wrong) < 3:  # a section too small to offer 3 wrong answers of its kind
                continue
            choices = [d, *rng.sample(wrong, 3)]
            rng.shuffle(choices)
            items.append(
                {
                    "question": f"{a} is to {b} as {c} is to what?",
                    "choices": choices,
                    "answer": choices.index(d),
                    "section": name,
                }
            )
        i += 1
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", required=True, help="the gensim wheel (pip download --no-deps)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--passages", type=int, default=240, help="text passages (half each source)")
    p.add_argument("--passage-chars", type=int, default=250)
    p.add_argument("--analogies", type=int, default=240)
    p.add_argument("--probe-passages", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    try:
        wheel = zipfile.ZipFile(args.wheel)
        xml = bz2.decompress(wheel.read(WIKI)).decode("utf-8")
        news = wheel.read(NEWS).decode("utf-8").splitlines()
        analogies = wheel.read(ANALOGIES).decode("utf-8").splitlines()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise SystemExit(
            f"{args.wheel}: not a gensim wheel with its test data ({e}); get it with: "
            "pip download --no-deps gensim==4.4.0 -d DIR"
        ) from e
    rng = random.Random(args.seed)
    per_article = {
        "wikipedia": [passages(a, args.passage_chars) for a in wiki_articles(xml)],
        "news": [passages(a, args.passage_chars) for a in news],
    }
    # one benchmark passage per article first (articles are independent draws), then the second
    # passage of every article long enough, and so on, until each source has its half
    bench, probe = [], []
    for source, arts in per_article.items():
        arts = [a for a in arts if a]
        rng.shuffle(arts)
        want, taken = args.passages // 2, []
        depth = 0
        while len(taken) < want and any(len(a) > depth for a in arts):
            taken += [(source, a[depth]) for a in arts if len(a) > depth][: want - len(taken)]
            depth += 1
        bench += [{"text": t, "source": s} for s, t in taken]
        used = {t for _, t in taken}
        rest = [t for a in arts for t in a if t not in used]
        probe += rng.sample(rest, min(args.probe_passages // 2, len(rest)))
    rng.shuffle(bench)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_samples(out / "bench_general_text.jsonl", bench)
    analogy = analogy_items(analogies, rng, args.analogies)
    write_samples(out / "bench_general_analogy.jsonl", analogy)
    (out / "probe_text.txt").write_text("\n".join(probe) + "\n", encoding="utf-8")
    counts = {s: sum(b["source"] == s for b in bench) for s in per_article}
    print(
        f"general text: {len(bench)} passages {counts}, {len(analogy)} analogies, "
        f"{len(probe)} probe passages -> {out}"
    )


if __name__ == "__main__":
    main()

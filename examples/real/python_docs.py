"""The domain corpus and domain benchmarks: Python 3.11's library reference, from Debian's
`python3.11-doc` package (HTML), as clean text with code blocks kept.

    apt-get install -y python3.11-doc
    python examples/real/python_docs.py --out examples/real/data

Each page of library/ is one document. Pages are split *by file* into training documents and
held-out documents (a page is never in both). Writes to --out:

    domain_train.jsonl         {"text", "source"}  the domain corpus D_K
    bench_domain_ppl.jsonl     {"text"}            held-out pages, in chunks, shuffled (perplexity)
    bench_domain_mc.jsonl      multiple choice about held-out pages: which module provides X,
                               which module is described as "..." (the model never trained on them)
    bench_domain_mc_seen.jsonl the same questions about training pages (knowledge CPT could inject)

Licence: the Python documentation is under the PSF licence (/usr/share/doc/python3.11/copyright).
Only the standard library's html.parser is used.
"""

from __future__ import annotations

import argparse
import random
import re
from html.parser import HTMLParser
from pathlib import Path

from mixcpt.align.samples import write_samples  # JSONL, one object per line, unchanged

BLOCK_TAGS = {
    "p",
    "div",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "dt",
    "dd",
    "dl",
    "ul",
    "ol",
    "table",
    "tr",
    "blockquote",
    "section",
    "br",
}
SKIP_TAGS = {"script", "style"}
OBJECT_KINDS = {
    "function",
    "class",
    "exception",
}  # <dl class="py function"> ...: the objects questions ask about


class SphinxPage(HTMLParser):
    """Text of a Sphinx page's main body; <pre> blocks verbatim, other whitespace collapsed.

    After `feed`: `text` (str), `title` (the h1 text), `objects` ([(kind, dotted name)]).
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.depth = 0  # <div> nesting inside the main body; 0 = outside it
        self.pre = 0
        self.skipping: list[str] = []  # open <script>, <style> or "¶" permalink <a> tags
        self.in_h1 = False
        self.title = ""
        self.kinds: list[str] = []  # kinds of the enclosing <dl class="py ...">
        self.objects: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        classes = (a.get("class") or "").split()
        if tag in SKIP_TAGS or (tag == "a" and "headerlink" in classes):
            self.skipping.append(tag)
        if tag == "pre":
            self.pre += 1
        if tag == "h1":
            self.in_h1 = True
        if tag == "dl":
            self.kinds.append(classes[1] if len(classes) > 1 and classes[0] == "py" else "")
        if tag == "dt" and a.get("id") and self.kinds and self.kinds[-1] in OBJECT_KINDS:
            self.objects.append((self.kinds[-1], a["id"]))
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag == "div":
            self.depth -= 1
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()
        if tag == "pre":
            self.pre -= 1
        if tag == "h1":
            self.in_h1 = False
        if tag == "dl" and self.kinds:
            self.kinds.pop()
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.skipping:
            return
        if self.pre:
            self.parts.append("\x00" + data + "\x00")  # marked: kept verbatim by `text`
        else:
            self.parts.append(re.sub(r"\s+", " ", data))
        if self.in_h1:
            self.title += data

    @property
    def text(self) -> str:
        """Paragraphs separated by blank lines; code blocks exactly as written."""
        raw = "".join(self.parts)
        pieces = raw.split("\x00")
        out = []
        for i, piece in enumerate(pieces):
            if i % 2:  # inside a <pre>
                out.append(piece)
            else:
                piece = re.sub(r" *\n *", "\n", piece)
                out.append(re.sub(r"\n{3,}", "\n\n", piece))
        return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip() + "\n"


def read_page(path: Path) -> dict:
    """{"source", "text", "module", "synopsis", "objects"} of one library page."""
    page = SphinxPage()
    page.feed(path.read_text(encoding="utf-8"))
    title = " ".join(page.title.split())
    module, _, synopsis = title.partition(" — ")
    return {
        "source": f"library/{path.name}",
        "text": page.text,
        "module": module.strip(),
        "synopsis": synopsis.strip(),
        "objects": page.objects,
    }


def chunks(text: str, size: int) -> list[str]:
    """`text` cut at paragraph boundaries into pieces of about `size` characters."""
    out, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    return out + ([current] if current else [])


def questions(
    pages: list[dict], modules: list[str], rng: random.Random, per_page: int
) -> list[dict]:
    """Multiple-choice items about `pages`: which module provides an object, which module a
    synopsis describes. Wrong choices are other modules of the library (`modules`)."""

    def item(question: str, answer: str) -> dict:
        choices = [answer, *rng.sample([m for m in modules if m != answer], 3)]
        rng.shuffle(choices)
        return {"question": question, "choices": choices, "answer": choices.index(answer)}

    items = []
    for page in pages:
        module = page["module"]
        if module not in modules:
            continue
        if page["synopsis"]:
            items.append(
                item(
                    f"Which module of the Python standard library is described as "
                    f'"{page["synopsis"]}"?',
                    module,
                )
            )
        own = [(kind, name) for kind, name in page["objects"] if name.startswith(module + ".")]
        for kind, name in rng.sample(own, min(per_page, len(own))):
            short = name.removeprefix(module + ".")
            items.append(
                item(
                    f"Which module of the Python standard library provides the {kind} `{short}`?",
                    module,
                )
            )
    rng.shuffle(items)
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--html", default="/usr/share/doc/python3.11/html", help="python3.11-doc's HTML folder"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--train-chars",
        type=int,
        default=90_000,
        help="characters of training pages to keep (random pages up to this size); 0: all",
    )
    p.add_argument(
        "--heldout-pages", type=int, default=40, help="library pages held out for the benchmarks"
    )
    p.add_argument("--ppl-chunk-chars", type=int, default=2000)
    p.add_argument("--questions-per-page", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    library = Path(args.html) / "library"
    if not library.is_dir():
        raise SystemExit(
            f"{library}: not found; install it with: apt-get install -y python3.11-doc"
        )
    pages = [read_page(path) for path in sorted(library.glob("*.html"))]
    # pages that document one module ("json — JSON encoder and decoder"); index pages have no
    # synopsis
    pages = [pg for pg in pages if pg["module"] and pg["synopsis"] and len(pg["text"]) > 1000]
    rng = random.Random(args.seed)
    rng.shuffle(pages)
    heldout, rest = pages[: args.heldout_pages], pages[args.heldout_pages :]
    train, size = [], 0
    for page in rest:
        if args.train_chars and size + len(page["text"]) > args.train_chars:
            continue
        train.append(page)
        size += len(page["text"])
    modules = sorted({pg["module"] for pg in pages if re.fullmatch(r"[\w.]+", pg["module"])})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_samples(
        out / "domain_train.jsonl", [{"text": pg["text"], "source": pg["source"]} for pg in train]
    )
    # shuffled, so that a benchmark `limit` takes chunks of every held-out page, and without the
    # short remnants (a title line alone) whose bits per byte say little
    ppl = [
        {"text": c}
        for pg in heldout
        for c in chunks(pg["text"], args.ppl_chunk_chars)
        if len(c) >= args.ppl_chunk_chars // 2
    ]
    rng.shuffle(ppl)
    write_samples(out / "bench_domain_ppl.jsonl", ppl)
    write_samples(
        out / "bench_domain_mc.jsonl", questions(heldout, modules, rng, args.questions_per_page)
    )
    write_samples(
        out / "bench_domain_mc_seen.jsonl", questions(train, modules, rng, args.questions_per_page)
    )
    print(
        f"python docs: {len(train)} training pages ({size:,} characters), "
        f"{len(heldout)} held-out pages -> {out}"
    )


if __name__ == "__main__":
    main()

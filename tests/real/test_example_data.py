"""The real example's data scripts (examples/real/): HTML docs -> clean text, WordNet -> tasks."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "real"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPHINX_PAGE = """<html><head><script>var x = 1;</script></head><body>
<div class="sphinxsidebar">Navigation noise</div>
<div class="body" role="main">
<h1><code>json</code> — JSON encoder and decoder<a class="headerlink" href="#m">¶</a></h1>
<p>Encode   and
decode JSON.</p>
<dl class="py function"><dt class="sig sig-object py" id="json.dumps">json.dumps(obj)\
<a class="headerlink" href="#d">¶</a></dt>
<dd><p>Serialize <em>obj</em>.</p></dd></dl>
<div class="highlight"><pre><span>&gt;&gt;&gt; </span>json.dumps([1,  2])
'[1, 2]'
</pre></div>
</div>
<div class="footer">Copyright</div>
</body></html>"""


def test_docs_page_keeps_body_text_and_code_verbatim(tmp_path):
    python_docs = _script("python_docs")
    path = tmp_path / "json.html"
    path.write_text(SPHINX_PAGE, encoding="utf-8")
    page = python_docs.read_page(path)
    assert page["module"] == "json" and page["synopsis"] == "JSON encoder and decoder"
    assert page["objects"] == [("function", "json.dumps")]
    text = page["text"]
    assert ">>> json.dumps([1,  2])\n'[1, 2]'\n" in text  # code: spaces and newlines as written
    assert "Encode and decode JSON." in text  # prose: whitespace collapsed
    for noise in ("¶", "var x", "Navigation", "Copyright"):
        assert noise not in text


def test_module_questions_have_the_right_answer_among_other_modules():
    python_docs = _script("python_docs")
    pages = [
        {
            "module": "json",
            "synopsis": "JSON encoder and decoder",
            "objects": [("function", "json.dumps")],
        }
    ]
    items = python_docs.questions(
        pages, ["json", "csv", "os", "re", "sys"], random.Random(0), per_page=1
    )
    assert len(items) == 2
    for item in items:
        assert item["choices"][item["answer"]] == "json" and len(set(item["choices"])) == 4


WORDNET_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE\n"
    "00005930 03 n 02 dwarf 0 midget 0 001 @ 00004475 n 0000 | "
    "a plant or animal that is atypically small; "
    '"the dwarf grew slowly"  \n'
)


def test_wordnet_synsets_give_definitions_examples_and_real_answers(tmp_path):
    general_tasks = _script("general_tasks")
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text(
            WORDNET_NOUN if pos == "noun" else "", encoding="utf-8"
        )
    [synset] = general_tasks.read_synsets(tmp_path)
    assert synset == {
        "pos": "noun",
        "words": ["dwarf", "midget"],
        "definition": "a plant or animal that is atypically small",
        "examples": ["the dwarf grew slowly"],
    }
    other = {
        "pos": "noun",
        "words": ["gavel"],
        "definition": "a small mallet",
        "examples": ["he banged the gavel"],
    }
    tasks = {t["task"]: t for t in general_tasks.word_tasks(synset, [other], random.Random(1))}
    assert tasks["define"]["output"] == "A plant or animal that is atypically small."
    assert tasks["define"]["rejected"] == "A small mallet."
    assert tasks["synonym"]["answers"] == [
        w for w in synset["words"] if w not in tasks["synonym"]["instruction"]
    ]


def test_computed_tasks_answer_correctly_and_reject_a_wrong_answer():
    general_tasks = _script("general_tasks")
    rng = random.Random(0)
    for _ in range(50):
        task = general_tasks.computed_task(rng, ["pear", "apple", "fig", "kiwi", "plum"])
        assert task["output"] != task["rejected"]
        if task["task"] == "arithmetic":
            a, op, b = task["instruction"].removeprefix("What is ").removesuffix("?").split()
            assert (
                int(task["output"])
                == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            )
        elif task["task"] == "sort":
            assert task["output"] == ", ".join(sorted(task["input"].split(", ")))


WIKI_XML = """<mediawiki><page><title>AccessibleComputing</title>
<text xml:space="preserve">#REDIRECT [[Computer accessibility]]</text></page>
<page><title>Anarchism</title><text xml:space="preserve">{{Redirect2|Anarchist|other uses}}
{{Infobox|name={{nested|x}}}}
'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] \
societies.&lt;ref&gt;Woodcock, &quot;Anarchism&quot;&lt;/ref&gt; It is often described as \
stateless, and its history is long and varied across many countries.
== History ==
* a list line that is long enough to be taken for prose if list lines were not dropped at all
Its ideas spread in the nineteenth century.[[File:Paris Commune.jpg|thumb|The [[Paris Commune]] \
of 1871]] The Paris Commune of 1871 was one moment.[[Category:Political philosophy]]
</text></page></mediawiki>"""


def test_wikipedia_markup_is_stripped_to_prose():
    general_text = _script("general_text")
    [article] = general_text.wiki_articles(WIKI_XML)  # the redirect is dropped
    assert article == (
        "Anarchism is a political philosophy that advocates self-governed societies. It is "
        "often described as stateless, and its history is long and varied across many countries.\n"
        "Its ideas spread in the nineteenth century. The Paris Commune of 1871 was one moment."
    )


def test_passages_end_at_sentences_and_skip_damaged_text():
    general_text = _script("general_text")
    text = (
        "The first sentence is here. The second one follows it. "
        "A perilune of  and an apolune of  were planned. The last one is short."
    )
    assert general_text.passages(text, 40) == [
        "The first sentence is here. The second one follows it."
    ]


def test_analogies_offer_the_answer_among_words_of_the_same_section():
    general_text = _script("general_text")
    lines = [
        ": capital-common-countries",
        "Athens Greece Baghdad Iraq",
        "Athens Greece Bern Switzerland",
        "Berlin Germany Cairo Egypt",
        "Berlin Germany Hanoi Vietnam",
        "Oslo Norway Rome Italy",
        ": family",
        "boy girl brother sister",
        "boy girl father mother",
        "he she king queen",
        "he she son daughter",
        "man woman uncle aunt",
    ]
    items = general_text.analogy_items(lines, random.Random(0), 4)
    assert [i["section"] for i in items] == ["capital-common-countries", "family"] * 2
    countries = {"Iraq", "Switzerland", "Egypt", "Vietnam", "Italy"}
    for item in items:
        words = item["question"].split()  # "A is to B as C is to what?"
        a, b, c = words[0], words[3], words[5]
        choices = set(item["choices"])
        assert len(choices) == 4 and not choices & {a, b, c}
        assert choices <= countries if item["section"] != "family" else not choices & countries
        answer = item["choices"][item["answer"]]
        assert f"{a} {b} {c} {answer}" in lines

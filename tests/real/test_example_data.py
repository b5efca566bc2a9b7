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

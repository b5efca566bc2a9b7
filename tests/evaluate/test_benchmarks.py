import json

import pytest

from mixcpt.config import BenchmarkConfig, TemplateConfig
from mixcpt.errors import InputError
from mixcpt.evaluate.benchmarks import (
    format_prompt,
    load_benchmark,
    normalize_answer,
    prompt_formats,
)


def _bench(tmp_path, kind, lines, **kw):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return BenchmarkConfig(name=kind, path=str(path), kind=kind, tag="general", **kw)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Paris", "paris"),
        ("  The  Eiffel   Tower. ", "eiffel tower"),
        ("an apple, a pear!", "apple pear"),
        ("Theatre anthem", "theatre anthem"),  # articles only as whole words
        ("It's 4:30 p.m.", "its 430 pm"),
        ("A\tB\nC", "b c"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


GOOD_MC = json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 1})


@pytest.mark.parametrize(
    "kind, bad, message",
    [
        ("multiple_choice", '{"question": "q", "choices": ["a"], "answer": 3}', "out of range"),
        ("multiple_choice", '{"question": "q", "choices": [], "answer": 0}', "empty"),
        ("multiple_choice", '{"choices": ["a"], "answer": 0}', "question"),
        ("multiple_choice", '{"question": "q", "choices": ["a"], "answer": "0"}', "answer"),
        ("multiple_choice", '{"question": "q", "choices": "ab", "answer": 0}', "choices"),
        ("multiple_choice", '{"question": "q", "choices": ["a"], "answer": 0', "malformed JSON"),
        ("generation", '{"prompt": "p"}', "answer"),
        ("generation", '{"prompt": "p", "answers": []}', "answer"),
        ("perplexity", '{"text": 3}', "text"),
        ("perplexity", '["text"]', "JSON object"),
    ],
)
def test_bad_benchmark_line_names_path_and_line(tmp_path, kind, bad, message):
    good = {
        "multiple_choice": GOOD_MC,
        "generation": '{"prompt": "p", "answer": "x"}',
        "perplexity": '{"text": "t"}',
    }
    bench = _bench(tmp_path, kind, [good[kind], good[kind], bad])
    with pytest.raises(InputError, match=message) as err:
        load_benchmark(bench)
    assert str(err.value).startswith(f"{bench.path}:3:")


def test_load_benchmark_normalises_generation_answers_and_applies_limit(tmp_path):
    lines = [
        '{"prompt": "p1", "answer": "x"}',
        '{"prompt": "p2", "answers": ["y", "z"]}',
        '{"prompt": "p3", "answer": "w"}',
    ]
    items = load_benchmark(_bench(tmp_path, "generation", lines, limit=2))
    assert items == [{"prompt": "p1", "answers": ["x"]}, {"prompt": "p2", "answers": ["y", "z"]}]


def test_empty_benchmark_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file is empty"):
        load_benchmark(_bench(tmp_path, "perplexity", [""]))


def test_auto_scores_every_stage_plain_and_aligned_stages_also_through_chat(
    tmp_path, tiny_tokenizer
):
    bench = _bench(tmp_path, "multiple_choice", [GOOD_MC])
    assert prompt_formats(bench, "base") == prompt_formats(bench, "cpt") == {"scores": "plain"}
    assert prompt_formats(bench, "sft") == {"scores": "plain", "chat_scores": "chat"}
    forced = bench.model_copy(update={"prompt_format": "chat"})
    assert prompt_formats(forced, "base") == prompt_formats(forced, "dpo") == {"scores": "chat"}
    ppl = _bench(tmp_path, "perplexity", ['{"text": "a"}'])
    assert prompt_formats(ppl, "dpo") == {"scores": "plain"}  # no prompt: nothing to format

    template = TemplateConfig()
    plain = format_prompt("Where?", "plain", tiny_tokenizer, template)
    chat = format_prompt("Where?", "chat", tiny_tokenizer, template)
    assert plain == "### Instruction:\nWhere?\n\n### Response:\n"
    assert chat == tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where?"}], add_generation_prompt=True, tokenize=False
    )

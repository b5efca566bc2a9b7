"""Benchmarks as data: reading and checking JSONL benchmark files, prompt formatting, answer
normalisation.

Item shapes, one JSON object per line:
    multiple_choice  {"question": str, "choices": [str, ...], "answer": int}
    generation       {"prompt": str, "answers": [str, ...]}   (or "answer": str)
    perplexity       {"text": str}
Any malformed line is an `InputError` naming `path:line`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mixcpt.config import BenchmarkConfig, TemplateConfig
from mixcpt.data.readers import read_jsonl
from mixcpt.data.render import render_plain_prompt
from mixcpt.errors import InputError

# The metric a benchmark is summarised by in tables, plots and retention deltas.
MAIN_METRIC = {
    "multiple_choice": "acc_norm",
    "generation": "exact_match",
    "perplexity": "bits_per_byte",
}
HIGHER_IS_BETTER = {"acc", "acc_norm", "exact_match", "contains"}
ALIGNED_STAGES = ("sft", "dpo")


def _check_item(item, kind: str) -> tuple[str, dict] | None:
    """Return None when `item` is a valid `kind` item, else the problem as a message."""
    if not isinstance(item, dict):
        return "expected a JSON object"
    if kind == "multiple_choice":
        if not isinstance(item.get("question"), str):
            return "field 'question' must be a string"
        choices = item.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            return "field 'choices' must be a list of strings"
        if not choices:
            return "field 'choices' is empty"
        answer = item.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            return "field 'answer' must be an integer index into 'choices'"
        if not 0 <= answer < len(choices):
            return f"answer index {answer} out of range for {len(choices)} choices"
    elif kind == "generation":
        if not isinstance(item.get("prompt"), str):
            return "field 'prompt' must be a string"
        answers = item.get("answers", [item["answer"]] if "answer" in item else None)
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            return "needs 'answers' (non-empty list of strings) or 'answer' (string)"
    elif not isinstance(item.get("text"), str):
        return "field 'text' must be a string"
    return None


def load_benchmark(bench: BenchmarkConfig) -> list[dict]:
    """Read and validate `bench.path` (first `bench.limit` items).

    Returns dicts normalised per kind: multiple_choice {question, choices, answer},
    generation {prompt, answers}, perplexity {text}. Raises `InputError(path, line, msg)`.
    """
    path = Path(bench.path)
    items = []
    for rec in read_jsonl(path):
        item, lineno = rec.fields, rec.line
        problem = _check_item(item, bench.kind)
        if problem:
            raise InputError(path, lineno, problem)
        if bench.kind == "generation":
            item = {"prompt": item["prompt"], "answers": item.get("answers", [item.get("answer")])}
        items.append(item)
        if bench.limit and len(items) >= bench.limit:
            break
    return items


def prompt_formats(bench: BenchmarkConfig, stage: str) -> dict[str, str]:
    """{row key: prompt format} that `bench` is scored in at `stage` ("base", "cpt", "sft",
    "dpo"). "auto": every stage in the plain rendering the base and stage 1 saw ("scores"), and
    the aligned stages also through the chat template ("chat_scores"), so that retention compares
    like with like and the format change is measured apart. "plain" or "chat": that format alone,
    at every stage. Perplexity has no prompt: "scores" only."""
    if bench.kind == "perplexity":
        return {"scores": "plain"}
    if bench.prompt_format != "auto":
        return {"scores": bench.prompt_format}
    if stage in ALIGNED_STAGES:
        return {"scores": "plain", "chat_scores": "chat"}
    return {"scores": "plain"}


def format_prompt(
    question: str,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    template: TemplateConfig,
) -> str:
    """The text a model is conditioned on: `fmt` "plain" is the stage-1 rendering of the question
    (`template`, an empty response), "chat" the chat template with a generation prompt."""
    if fmt == "plain":
        return render_plain_prompt(question, "", template)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, strip punctuation, drop articles, collapse
    whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())

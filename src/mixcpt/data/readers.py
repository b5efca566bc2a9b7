"""Streaming readers for the input formats of design.md §5.

Every reader is a generator that holds one record (or one parquet batch) at a time, so a corpus
larger than memory streams through. Records come with their file and line, and anything
malformed raises `InputError("path:line: what is wrong")`.

    domain text     .txt files (one document each) or folders of them; .jsonl / .parquet with a
                    text field; a `datasets` dataset (format: hf)
    instructions    Alpaca {"instruction", "input"?, "output"} or
                    chat {"messages": [{role, content}]}
    preferences     {"prompt", "chosen", "rejected"}, each a string or a list of messages
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixcpt.config import SourceConfig
from mixcpt.errors import InputError

ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    """One input record: where it came from and its fields."""

    path: str
    line: int | None
    fields: dict[str, Any]

    def error(self, message: str) -> InputError:
        return InputError(self.path, self.line, message)


def _files(src: SourceConfig) -> list[Path]:
    """The files of a source, sorted, so that the order (and every hash of it) is stable."""
    root = Path(src.path)
    if root.is_file():
        return [root]
    suffixes = {"txt": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}.get(
        src.format, (".txt", ".jsonl", ".json", ".parquet")
    )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise InputError(root, None, f"folder holds no {'/'.join(suffixes)} files")
    return files


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    return {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
        path.suffix, "txt"
    )


def _read_txt(path: Path) -> Iterator[Record]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(path, line, f"not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
    if not text.strip():
        raise InputError(path, None, "file is empty")
    yield Record(str(path), None, {"text": text})


def read_jsonl(path: str | Path) -> Iterator[Record]:
    """Each JSON object of a JSONL file with its line number, streamed; blank lines are skipped.

    Raises `InputError(path, line, ...)` for non-UTF-8 bytes, malformed JSON, a line that is not an
    object, or a file with no object at all.
    """
    path = Path(path)
    seen = False
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(path, line_no, "not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(
                    path, line_no, f"malformed JSON: {err.msg} (column {err.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield Record(str(path), line_no, obj)
    if not seen:
        raise InputError(path, None, "file is empty")


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise InputError(path, None, f"not a readable parquet file: {err}") from None
    if pf.metadata.num_rows == 0:
        raise InputError(path, None, "file is empty")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            row += 1
            yield Record(str(path), row, obj)  # "line" of a parquet file is its row number


def _read_hf(src: SourceConfig) -> Iterator[Record]:
    import datasets

    if Path(src.path).exists():
        ds = datasets.load_from_disk(src.path)
        ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split, streaming=True)
    for row, obj in enumerate(ds, start=1):
        yield Record(f"{src.path}[{src.split}]", row, dict(obj))


def read_records(src: SourceConfig) -> Iterator[Record]:
    """Every record of a source, streamed, in a stable order (files sorted by path)."""
    if src.format == "hf":
        yield from _read_hf(src)
        return
    for path in _files(src):
        fmt = _format_of(path, src.format)
        reader = {"txt": _read_txt, "jsonl": read_jsonl, "parquet": _read_parquet}[fmt]
        yield from reader(path)


# ---- field checks ------------------------------------------------------------------------


def _string(rec: Record, key: str, required: bool = True) -> str:
    value = rec.fields.get(key)
    if value is None:
        if required:
            raise rec.error(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise rec.error(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(rec: Record, key: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise rec.error(f"field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ROLES
        ):
            raise rec.error(
                f"{key}[{i}] must be {{'role': one of {list(ROLES)}, 'content': string}}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def domain_text(rec: Record, text_field: str) -> str:
    """The text of a domain record (a .txt file's whole content, or the configured field)."""
    key = "text" if rec.line is None else text_field  # a .txt file's record is the whole file
    text = _string(rec, key)
    if not text.strip():
        raise rec.error(f"field '{key}' is empty")
    return text


def instruction_messages(rec: Record) -> list[dict[str, str]]:
    """An instruction record (Alpaca or chat form) as a message list ending with the assistant turn.

    Alpaca's optional `input` is kept as a second paragraph of the user turn so no field is lost
    (the plain renderer, which has a place for it, reads it back from `alpaca_fields`).
    """
    if "messages" in rec.fields:
        msgs = _messages(rec, "messages", rec.fields["messages"])
        if msgs[-1]["role"] != "assistant":
            raise rec.error("the last message must be from the assistant (the response)")
        if not any(m["role"] == "user" for m in msgs):
            raise rec.error("messages hold no user turn")
        return msgs
    if "instruction" not in rec.fields and "output" not in rec.fields:
        raise rec.error("expected Alpaca fields 'instruction'/'output' or a 'messages' list")
    instruction, inp, output = (
        _string(rec, "instruction"),
        _string(rec, "input", False),
        _string(rec, "output"),
    )
    user = instruction + ("\n\n" + inp if inp else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def alpaca_fields(rec: Record) -> tuple[str, str, str] | None:
    """(instruction, input, output) of an Alpaca-form record, None for the chat form."""
    if "messages" in rec.fields:
        return None
    return _string(rec, "instruction"), _string(rec, "input", False), _string(rec, "output")


def preference_fields(rec: Record) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages ending with a user turn, chosen response, rejected response).

    `prompt` may be a string or a message list; `chosen`/`rejected` a string or a message list
    whose last message is the assistant's response.
    """
    prompt = rec.fields.get("prompt")
    if prompt is None:
        raise rec.error("missing field 'prompt'")
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(rec, "prompt", prompt)

    def response(key: str) -> str:
        value = rec.fields.get(key)
        if value is None:
            raise rec.error(f"missing field '{key}'")
        if isinstance(value, str):
            return value
        msgs = _messages(rec, key, value)
        if msgs[-1]["role"] != "assistant":
            raise rec.error(f"the last message of '{key}' must be from the assistant")
        return msgs[-1]["content"]

    return prompt_msgs, response("chosen"), response("rejected")

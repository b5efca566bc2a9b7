"""The general pool's samples on disk (JSONL) and the checks that decide whether one is usable.

Instruction rows: {"id", "source", "messages" (last turn from the assistant), "plain_prompt",
                   "plain_response"}.
Preference rows:  {"id", "source", "messages" (prompt turns, last from the user), "chosen",
                   "rejected", "plain_prompt"}.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from mixcpt.data.readers import read_jsonl
from mixcpt.errors import InputError

log = logging.getLogger(__name__)

POOL_FILES = {"instruction": "instructions.jsonl", "preference": "preferences.jsonl"}
LAST_ROLE = {"instruction": "assistant", "preference": "user"}
REQUIRED_FIELDS = {
    "instruction": ("id", "messages", "plain_prompt", "plain_response"),
    "preference": ("id", "messages", "chosen", "rejected", "plain_prompt"),
}


def read_samples(path: Path, kind: str) -> list[dict]:
    """Rows of a pool JSONL file of `kind` ("instruction" or "preference"), in file order.

    Raises `InputError(path, line, ...)` for a missing file, malformed JSON or a missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, f"{kind} file does not exist (has the previous stage run?)")
    rows = []
    if path.stat().st_size == 0:  # a pool with no samples of this kind (e.g. no preference sources)
        return rows
    for rec in read_jsonl(path):
        row, line_no = rec.fields, rec.line
        missing = [k for k in REQUIRED_FIELDS[kind] if k not in row]
        if missing:
            raise InputError(path, line_no, f"missing field(s) {', '.join(missing)}")
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise InputError(
                path, line_no, "'messages' must be a non-empty list of {role, content}"
            )
        last_role = row["messages"][-1].get("role")
        if last_role != LAST_ROLE[kind]:
            raise InputError(
                path,
                line_no,
                f"the last message is from {last_role!r}; "
                f"{kind} samples must end with one from {LAST_ROLE[kind]!r}",
            )
        rows.append(row)
    return rows


def write_samples(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL, one object per line, unchanged."""
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def skip_reason(row: dict, kind: str) -> str | None:
    """Why a sample cannot be trained on (None when it can): an empty response, or a preference
    pair whose chosen and rejected responses are identical (no preference signal, zero DPO
    gradient)."""
    if kind == "instruction":
        return "empty response" if not row["messages"][-1]["content"].strip() else None
    if not row["chosen"].strip() or not row["rejected"].strip():
        return "empty response"
    if row["chosen"].strip() == row["rejected"].strip():
        return "identical chosen and rejected"
    return None


def usable_indices(
    rows: list[dict], kind: str, source: str | Path
) -> tuple[list[int], dict[int, str]]:
    """Indices of the rows that pass `skip_reason`, and {index: reason} for the others, which are
    counted by reason in one warning naming `source`."""
    usable, skipped = [], {}
    for i, row in enumerate(rows):
        reason = skip_reason(row, kind)
        if reason is None:
            usable.append(i)
        else:
            skipped[i] = reason
    if skipped:
        counts = Counter(skipped.values())
        log.warning(
            "%s: skipped %d of %d %s samples (%s)",
            source,
            len(skipped),
            len(rows),
            kind,
            ", ".join(f"{counts[r]} with {r}" for r in sorted(counts)),
        )
    return usable, skipped


def usable_rows(path: Path, kind: str) -> list[dict]:
    """The rows of a selection or pool file that pass `skip_reason` (the others counted in one
    warning); an `InputError` naming the file when none does, as there is nothing to train on."""
    rows = read_samples(path, kind)
    usable, _ = usable_indices(rows, kind, path)
    if not usable:
        raise InputError(path, None, f"no usable {kind} samples to train on")
    return [rows[i] for i in usable]

import json
import re

import pytest

from mixcpt.align.samples import read_samples, usable_indices
from mixcpt.errors import InputError


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "malformed JSON"),
        (
            '{"id": "x", "messages": [{"role": "user", "content": "q"}]}',
            "missing field(s) plain_prompt, plain_response",
        ),
        (
            (
                '{"id": "x", "messages": [{"role": "user", "content": "q"}], '
                '"plain_prompt": "", "plain_response": ""}'
            ),
            (
                "the last message is from 'user'; "
                "instruction samples must end with one from 'assistant'"
            ),
        ),
    ],
)
def test_bad_pool_rows_name_file_and_line(tmp_path, pool_rows, bad_line, message):
    path = tmp_path / "instructions.jsonl"
    path.write_text(json.dumps(pool_rows[0][0]) + "\n" + bad_line + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}:2: {message}")):
        read_samples(path, "instruction")


def test_unusable_samples_are_listed_by_reason(pool_rows, caplog):
    usable, skipped = usable_indices(pool_rows[1], "preference", "prefs.jsonl")
    assert skipped == {8: "identical chosen and rejected"} and usable == list(range(8))
    assert (
        "prefs.jsonl: skipped 1 of 9 preference samples (1 with identical chosen and rejected)"
        in caplog.text
    )
    empty = {**pool_rows[1][0], "rejected": "  "}
    assert usable_indices([empty], "preference", "p")[1] == {0: "empty response"}

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixcpt.config import SourceConfig
from mixcpt.data.readers import (
    domain_text,
    instruction_messages,
    preference_fields,
    read_records,
)
from mixcpt.errors import InputError


def texts(src):
    return [domain_text(r, src.text_field) for r in read_records(src)]


def test_txt_folder_reads_each_file_as_one_document_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second doc\nwith two lines")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert texts(SourceConfig(path=str(tmp_path))) == ["first doc", "second doc\nwith two lines"]


def test_jsonl_with_custom_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert texts(SourceConfig(path=str(p), text_field="body")) == ["one", "two"]


def test_parquet_is_read_in_batches(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(2500)]}), p)
    out = texts(SourceConfig(path=str(p)))
    assert len(out) == 2500 and out[0] == "doc 0" and out[-1] == "doc 2499"


def test_hf_dataset_saved_on_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(tmp_path / "ds")
    assert texts(SourceConfig(path=str(tmp_path / "ds"), format="hf")) == ["x", "y"]


def test_reader_streams_without_loading_the_whole_file(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(1000)) + "not json\n")
    records = read_records(SourceConfig(path=str(p)))
    assert domain_text(next(records), "text") == "t0"  # the broken last line is not read yet


def _one(tmp_path, obj):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(obj) + "\n")
    return next(read_records(SourceConfig(path=str(p))))


def test_alpaca_and_chat_instruction_forms(tmp_path):
    msgs = instruction_messages(
        _one(tmp_path, {"instruction": "Add", "input": "1 2", "output": "3"})
    )
    assert msgs == [
        {"role": "user", "content": "Add\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert instruction_messages(_one(tmp_path, {"messages": chat})) == chat


def test_preferences_as_strings_or_messages(tmp_path):
    assert preference_fields(_one(tmp_path, {"prompt": "p", "chosen": "c", "rejected": "r"})) == (
        [{"role": "user", "content": "p"}],
        "c",
        "r",
    )
    rec = _one(
        tmp_path,
        {
            "prompt": [{"role": "user", "content": "p"}],
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
    )
    assert preference_fields(rec) == ([{"role": "user", "content": "p"}], "c", "r")


@pytest.mark.parametrize(
    "content, parse, message",
    [
        (b'{"text": "ok"}\n{"text": broken}\n', "domain", ":2: malformed JSON"),
        (b'{"text": "ok"}\n{"other": "x"}\n', "domain", ":2: missing field 'text'"),
        (b'{"text": 5}\n', "domain", ":1: field 'text' must be a string, got int"),
        (b'["a list"]\n', "domain", ":1: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "domain", ":2: not valid UTF-8"),
        (b"", "domain", "file is empty"),
        (b'{"instruction": "x"}\n', "instruction", ":1: missing field 'output'"),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}\n',
            "instruction",
            ":1: the last message must be",
        ),
        (
            b'{"messages": [{"role": "bot", "content": "x"}]}\n',
            "instruction",
            ":1: messages[0] must be",
        ),
        (b'{"prompt": "p", "chosen": "c"}\n', "preference", ":1: missing field 'rejected'"),
        (
            b'{"prompt": 3, "chosen": "c", "rejected": "r"}\n',
            "preference",
            ":1: field 'prompt' must be",
        ),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, parse, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    fn = {
        "domain": lambda r: domain_text(r, "text"),
        "instruction": instruction_messages,
        "preference": preference_fields,
    }[parse]
    with pytest.raises(InputError) as err:
        for rec in read_records(SourceConfig(path=str(p))):
            fn(rec)
    assert str(err.value).startswith(str(p)) and message in str(err.value)


def test_non_utf8_txt_reports_the_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(InputError, match=r"a\.txt:2: not valid UTF-8"):
        list(read_records(SourceConfig(path=str(p))))

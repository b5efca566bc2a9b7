"""Every malformed file and config of cases.yaml stops the CLI with exit code 2, one clear line
naming the file (and line or key), no traceback, and no half-written output folder (design.md §3,
§5)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mixcpt.cli import main
from mixcpt.runlock import LOCK_NAME

HERE = Path(__file__).parent
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer):
    """A copy of files/ beside `model` (tiny Llama + tokenizer), `small_model` (vocabulary of 64,
    no tokenizer) and `tokenizer_no_template` (the tokenizer without its chat template, as a base
    model's), plus the huge one-line file (generated: too big to keep in the repository)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(HERE / "files", root / "files")
    torch.manual_seed(0)
    for name, vocab in (("model", len(tiny_tokenizer)), ("small_model", 64)):
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
    tiny_tokenizer.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "tokenizer_no_template")
    (root / "tokenizer_no_template" / "chat_template.jinja").unlink()
    # 4 MB on one line, and its JSON string never closed
    (root / "files" / "huge_line.jsonl").write_text('{"text": "' + "word " * 800_000 + "\n")
    return root / "files"


def case_config(case: dict, files: Path) -> Path:
    """The config file a case runs: its own, or a good config around its bad source or benchmark."""
    if "config" in case:
        return files / case["config"]
    config = {
        "model": {
            "path": case.get("model", "../model"),
            "tokenizer": case.get("tokenizer", "../model"),
        },
        "data": {"domain": [{"path": "good.jsonl"}], "block_size": 32},
        "cpt": {"training": {"max_steps": 1, "per_device_batch_size": 2}},
    }
    if "source" in case:
        group, file = case["source"]["group"], case["source"]["file"]
        config["data"][group] = [{"path": file}]
    if "benchmark" in case:
        config["eval"] = {
            "benchmarks": [
                {
                    "name": "bench",
                    "tag": "domain",
                    "path": case["benchmark"]["file"],
                    "kind": case["benchmark"]["kind"],
                }
            ]
        }
    path = files / f"case-{case['id']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def half_written(out: Path) -> list[str]:
    """What a failed stage must not leave: temporary folders and files, or a stage folder."""
    left = [str(p) for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    return left + [str(out / arm) for arm in ("mixcpt", "baseline") if (out / arm).exists()]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    case, workspace, tmp_path, capsys, monkeypatch, mixcpt_cli
):
    out = tmp_path / "out"
    for var, value in case.get("env", {}).items():
        monkeypatch.setenv(var, value)
    if case.get("output") == "file":
        out.write_text("a file, not a folder")
    if "lock_holder" in case:  # the lock file another command left in the run folder
        holder = dict(case["lock_holder"], command="mixcpt run other.yaml", since="2025-01-01")
        holder["host"] = socket.gethostname() if holder["host"] == "this" else holder["host"]
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps(holder))
    argv = [case["stage"], str(case_config(case, workspace)), "--output", str(out)]
    if case.get("subprocess"):
        proc = mixcpt_cli(*argv, timeout=120)
        code, stderr = proc.returncode, proc.stderr
    else:
        code = main(argv)
        stderr = capsys.readouterr().err
        # In-process, tqdm's bars (enabled at import) share stderr: the message is the last line.
        stderr = stderr.replace("\r", "\n")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    expected = case["expect"] if isinstance(case["expect"], list) else [case["expect"]]
    assert all(fragment in lines[-1] for fragment in expected), lines[-1]
    assert lines[-1].startswith("mixcpt: error: ")
    errors = [line for line in lines if line.startswith("mixcpt:")]
    assert len(errors) == 1
    if case.get("subprocess"):
        assert len(lines) == 1, stderr  # with progress bars off, nothing but the message
    if case.get("check"):
        assert not out.exists()
    if case.get("output") != "file":
        assert half_written(out) == []
        if case["stage"] == "data":
            assert not (out / "data").exists()
    else:
        assert out.is_file()


def test_the_suite_is_large_enough_and_its_files_small():
    assert len(CASES) >= 25
    assert len({c["id"] for c in CASES}) == len(CASES)
    assert sum(1 for c in CASES if c.get("subprocess")) >= 3
    assert sum(p.stat().st_size for p in (HERE / "files").rglob("*") if p.is_file()) < 10_000

